"""The demo report: figures, thumbnails and an HTML page that escapes its text."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from streamvqa.report import (
    EvidencePoint,
    FramePoint,
    Keyframe,
    QuestionPoint,
    ReportData,
    Scene,
    SpeechSpan,
    human_bytes,
    overlaps,
    write_report,
)

S = 1_000_000  # microseconds per second


def tiny_jpeg(shade: int) -> bytes:
    pixels = np.full((12, 16, 3), shade, dtype=np.uint8)
    pixels[:, :8, 0] = 255 - shade
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG")
    return buf.getvalue()


def sample_data() -> ReportData:
    frames = tuple(
        FramePoint(
            seq=i,
            pts_us=i * S // 2,
            tier="clear" if i % 7 == 0 else "fuzzy",
            reason="warmup" if i < 4 else "score",
            score=None if i < 3 else 0.5 + 0.3 * np.sin(i / 5),
            threshold=None if i < 5 else 0.7,
            tokens=64,
            memory_tokens=64 * (i + 1),
            cached_fraction=0.5,
            encode_ms=3.0,
            keyframe_key=f"streams/cam-1/frames/{i:08d}",
        )
        for i in range(60)
    )
    questions = (
        QuestionPoint(
            query_id="q-1",
            text="What is <b>on</b> the table?",
            asked_at_us=20 * S,
            has_image=True,
            answer="A red cup & a <i>book</i>",
            evidence=(EvidencePoint(12 * S, 15_500_000, 0.83), EvidencePoint(2 * S, 3 * S, 0.4)),
            latency=(("retrieve", 12.5), ("prefill", 40.0), ("decode", 80.0)),
            expected=(14 * S, 18 * S),
            image_jpeg=tiny_jpeg(90),
        ),
        QuestionPoint(
            query_id="q-2",
            text="Who spoke first?",
            asked_at_us=28 * S,
            has_image=False,
            answer="The host",
            evidence=(EvidencePoint(1 * S, 4 * S, 0.6),),
            latency=(("retrieve", 8.0), ("decode", 50.0)),
            expected=(20 * S, 25 * S),
        ),
        QuestionPoint(
            query_id="q-3",
            text="Anything else?",
            asked_at_us=29 * S,
            has_image=False,
            answer="No",
            evidence=(),
            latency=(),
        ),
    )
    return ReportData(
        stream_id="cam-1",
        frames=frames,
        speech=(
            SpeechSpan(1 * S, 4 * S, "Welcome to the show, today we look at cups"),
            SpeechSpan(16 * S, 19 * S, "ok"),
        ),
        questions=questions,
        scenes=(Scene("kitchen", 0, 15 * S), Scene("studio <2>", 15 * S, 30 * S)),
        keyframes=(
            Keyframe(0, 0, tiny_jpeg(30)),
            Keyframe(40, 20 * S, tiny_jpeg(120)),
            Keyframe(59, 31 * S, tiny_jpeg(200)),
        ),
        kv_tiers={"gpu": 3 * 1024**2, "cpu": 512 * 1024, "disk": 0, "object": 7 * 1024**2},
        visual_token_bytes=1536,
        dead_letters=(("decode_error", "frame 17: <truncated>"),),
        summary={"duration": "30.0 s", "frames": "60"},
    )


def assert_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 0
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.width > 0 and img.height > 0


def question_row(page: str, text: str) -> str:
    start = page.index(text)
    return page[start : page.index("</tr>", start)]


def test_report_writes_figures_thumbnails_and_escaped_html(tmp_path: Path) -> None:
    out = tmp_path / "report"
    path = write_report(sample_data(), out)
    assert path == out / "report.html"
    page = path.read_text(encoding="utf-8")

    for name in ("timeline.png", "memory.png", "latency.png"):
        assert_png(out / name)
        assert f'src="{name}"' in page

    # Text is escaped: no raw markup from the data reaches the page.
    assert "<b>" not in page and "<i>" not in page
    assert "What is &lt;b&gt;on&lt;/b&gt; the table?" in page
    assert "A red cup &amp; a &lt;i&gt;book&lt;/i&gt;" in page
    assert "Who spoke first?" in page and "The host" in page
    assert "studio &lt;2&gt;" in page and "frame 17: &lt;truncated&gt;" in page
    assert "Welcome to the show" in page
    assert "cam-1" in page and "30.0 s" in page

    for seq in (0, 40, 59):
        rel = f"keyframes/{seq:06d}.jpg"
        assert (out / rel).is_file()
        assert f'src="{rel}"' in page
    assert (out / "keyframes/000040.jpg").read_bytes() == sample_data().keyframes[1].jpeg
    # Grouped per scene [start, end); keyframe 59 lies after both scenes, under "other".
    headings = ("<h3>kitchen</h3>", "<h3>studio &lt;2&gt;</h3>", "<h3>other</h3>")
    kitchen, studio, other = (page.index(h) for h in headings)
    assert kitchen < page.index("keyframes/000000.jpg") < studio < page.index("keyframes/000040.jpg") < other
    assert other < page.index("keyframes/000059.jpg")

    assert (out / "questions/q-1.jpg").is_file()
    q1 = question_row(page, "What is &lt;b&gt;")
    assert "[image]" in q1 and 'src="questions/q-1.jpg"' in q1
    assert "12.0\u201315.5 s (0.83)" in q1
    assert "\u2713" in q1 and "\u2717" not in q1
    assert "132" in q1  # latency total 12.5 + 40 + 80
    q2 = question_row(page, "Who spoke first?")
    assert "\u2717" in q2 and "\u2713" not in q2
    q3 = question_row(page, "Anything else?")
    assert "\u2013</span>" in q3


def test_empty_report_renders(tmp_path: Path) -> None:
    path = write_report(
        ReportData(
            stream_id="empty <1>",
            frames=(),
            speech=(),
            questions=(),
            scenes=(),
            keyframes=(),
            kv_tiers={},
            visual_token_bytes=0,
            dead_letters=(),
            summary={},
        ),
        tmp_path / "out",
    )
    page = path.read_text(encoding="utf-8")
    for name in ("timeline.png", "memory.png", "latency.png"):
        assert_png(tmp_path / "out" / name)
    assert "empty &lt;1&gt;" in page
    assert "no questions" in page and "no keyframes" in page and "no dead letters" in page


def test_overlap_and_units() -> None:
    assert overlaps((EvidencePoint(0, 10, 1.0),), None) is None
    assert overlaps((EvidencePoint(0, 10, 1.0),), (5, 20)) is True
    assert overlaps((EvidencePoint(0, 10, 1.0),), (10, 20)) is False  # half-open: touching is no overlap
    assert overlaps((), (0, 1)) is False
    assert human_bytes(512) == "512 B"
    assert human_bytes(1536) == "1.5 KiB"
    assert human_bytes(3 * 1024**2) == "3.0 MiB"
