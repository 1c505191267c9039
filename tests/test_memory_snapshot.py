"""The memory stage's snapshot over a long stream: the visual index goes to the object store in
sealed, content-addressed chunks, so the snapshot written at every commit carries only the open
tail and stays flat however long the stream runs; a restore reads the chunks back, verified."""

from __future__ import annotations

import hashlib
import uuid

import numpy as np
import pytest

from streamvqa import connect
from streamvqa.operators.io.records import KafkaRecord
from streamvqa.operators.kv import BlockMismatch
from streamvqa.pipelines.video_qa.memory import INDEX_CHUNK_FRAMES, MemoryStage, MemoryStageConfig
from streamvqa.schemas import VisualNote, encode

pytestmark = pytest.mark.stack


def _no_models():
    raise AssertionError("frames alone must not load the models")


def _note(sid: str, seq: int, rng: np.random.Generator) -> bytes:
    return encode(
        VisualNote(
            stream_id=sid,
            seq=seq,
            pts_us=seq * 1_000_000,
            wall_us=1_700_000_000_000_000 + seq * 1_000_000,
            tier="fuzzy",
            reason="below",
            score=0.1,
            threshold=0.5,
            tokens=16,
            memory_tokens=16 * seq,
            cached_fraction=0.5,
            feature=tuple(float(x) for x in rng.standard_normal(384)),
            content_hash=hashlib.sha256(f"{sid}/{seq}".encode()).hexdigest(),
            keyframe_key="",
            encode_ms=1.0,
        )
    )


@pytest.fixture()
def stage(stack_settings, endpoints) -> MemoryStage:
    return MemoryStage(
        _no_models,
        "answers",
        objects=connect.object_store(stack_settings, endpoints),
        config=MemoryStageConfig(expect_audio=False),
    )


def _feed(stage: MemoryStage, sid: str, frames: int, sizes: dict[int, int] | None = None):
    rng = np.random.default_rng(0)
    state = stage.initial_state(sid)
    for seq in range(frames):
        state, _ = stage.process(state, KafkaRecord("memory", 0, seq, sid.encode(), _note(sid, seq, rng), 0))
        if sizes is not None and seq % 50 == 0:
            sizes[seq] = len(stage.encode_state(state))
    return state


def test_the_snapshot_stays_flat_and_restores_the_whole_index(stage) -> None:
    sid = f"long-{uuid.uuid4().hex[:6]}"
    frames = 2 * INDEX_CHUNK_FRAMES + 300
    sizes: dict[int, int] = {}
    state = _feed(stage, sid, frames, sizes)
    blob = stage.encode_state(state)
    assert len(state.index_chunks) == 2
    assert all(k.startswith(f"streams/{sid}/memory/visual-index/") for k in state.index_chunks)
    # never more than one chunk's worth: the biggest snapshot is the one just before a chunk seals
    one_chunk = max(sizes[s] for s in sizes if s < INDEX_CHUNK_FRAMES)
    assert max(sizes.values()) <= one_chunk * 1.05
    assert len(blob) < one_chunk  # 300 open rows, not 1324

    again = stage.decode_state(blob)
    for column in ("seqs", "pts", "tiers", "scores", "tokens", "hashes"):
        assert getattr(again, column) == getattr(state, column), column
    assert again.seqs == list(range(frames))
    assert np.array_equal(again.features, state.features[:frames])
    # the restored state goes on where the first left off, sealing the same chunks
    assert stage.encode_state(again) == blob


def test_a_tampered_or_foreign_chunk_is_refused(stage, stack_settings, endpoints) -> None:
    run = uuid.uuid4().hex[:6]
    a, b = f"sa-{run}", f"sb-{run}"  # same length: a forged key fits the header
    state_a = _feed(stage, a, INDEX_CHUNK_FRAMES + 10)
    blob_a = stage.encode_state(state_a)
    state_b = _feed(stage, b, INDEX_CHUNK_FRAMES + 10)
    stage.encode_state(state_b)

    # a state of stream A that names B's chunk (a crafted snapshot) is refused
    forged = blob_a.replace(state_a.index_chunks[0].encode(), state_b.index_chunks[0].encode())
    with pytest.raises(BlockMismatch, match="names"):
        stage.decode_state(forged)
    # a chunk whose bytes changed in the store is detected by its hash, not used
    objects = connect.object_store(stack_settings, endpoints)
    data = bytearray(objects.get(state_a.index_chunks[0]))
    data[-1] ^= 0xFF
    objects.put(state_a.index_chunks[0], bytes(data))
    with pytest.raises(BlockMismatch, match="content hash"):
        stage.decode_state(blob_a)


def test_the_manifest_lists_the_most_recent_frames(stage, monkeypatch) -> None:
    """Rewritten at every answer: over weeks of a stream it must not grow without end (nor past
    the schema's entry limit, which would fail every answer)."""
    from streamvqa.pipelines.video_qa import memory as memory_module
    from streamvqa.schemas import MemoryManifest, decode

    monkeypatch.setattr(memory_module, "MANIFEST_MAX_ENTRIES", 100)
    state = _feed(stage, f"weeks-{uuid.uuid4().hex[:6]}", 250)
    manifest = memory_module.manifest_of(state)
    assert [f.seq for f in manifest.frames] == list(range(150, 250))
    assert manifest.total_tokens == 16 * 250  # the count covers everything
    assert decode(encode(manifest), MemoryManifest) == manifest
