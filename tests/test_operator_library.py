"""docs/operators.md stays true to the code: every dotted name it cites resolves, and the operators
it says keep explicit state have the serialisation methods it names. Imports only (no models)."""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

import pytest

# Importing the Serve deployments imports Ray, whose pydantic models warn on import.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray")

DOC = Path(__file__).resolve().parents[1] / "docs" / "operators.md"
# A whole code span that is a dotted Python path under streamvqa: `streamvqa.a.b.Name`.
DOTTED = re.compile(r"`(streamvqa(?:\.[A-Za-z_][A-Za-z0-9_]*)+)`")

# (class or protocol, methods that (de)serialise its explicit state, which of them are classmethods)
STATEFUL = [
    ("streamvqa.operators.curvature.CurveStreamState", ("to_bytes", "from_bytes"), ("from_bytes",)),
    ("streamvqa.operators.curvature.CurveStream", ("init_state", "step", "restore"), ()),
    ("streamvqa.operators.vision.STCCacheState", ("to_bytes", "from_bytes"), ("from_bytes",)),
    ("streamvqa.operators.vision.STCCachedEncoder", ("snapshot", "restore"), ()),
    ("streamvqa.operators.vision.STCPruneState", ("to_bytes", "from_bytes"), ("from_bytes",)),
    ("streamvqa.operators.vision.STCPruner", ("init_state", "prune"), ()),
    ("streamvqa.operators.audio.VadState", ("to_bytes", "from_bytes"), ("from_bytes",)),
    ("streamvqa.operators.audio.VoiceActivity", ("initial_state", "process", "process_chunk", "flush"), ()),
    ("streamvqa.operators.audio.SpeechToText", ("initial_state", "process", "process_chunk", "flush"), ()),
    ("streamvqa.operators.lm.memory.StreamKV", ("to_bytes", "from_bytes"), ("from_bytes",)),
    ("streamvqa.operators.io.snapshots.Snapshot", ("to_bytes", "from_bytes"), ("from_bytes",)),
    ("streamvqa.operators.io.exactly_once.Progress", ("to_bytes", "from_bytes"), ("from_bytes",)),
    (
        "streamvqa.operators.io.exactly_once.StreamProcessor",
        ("initial_state", "process", "encode_state", "decode_state"),
        (),
    ),
    (
        "streamvqa.pipelines.examples.keyframes.KeyframeProcessor",
        ("initial_state", "process", "encode_state", "decode_state"),
        (),
    ),
    ("streamvqa.operators.serve.stages.EncoderStage", ("snapshot", "restore"), ()),
    *[
        (
            f"streamvqa.pipelines.video_qa.{stage}",
            ("initial_state", "process", "encode_state", "decode_state"),
            (),
        )
        for stage in ("FrameStage", "AudioStage", "QueryStage", "MemoryStage")
    ],
    ("streamvqa.pipelines.video_qa.MemoryStage", ("tick",), ()),
    ("streamvqa.pipelines.video_qa.frames.FrameStageState", ("to_bytes",), ()),
    ("streamvqa.pipelines.video_qa.audio.AudioStageState", ("to_bytes",), ()),
]

# Functions the doc names as a state's byte form (the KV block has no methods: codec functions).
CODECS = [
    "streamvqa.operators.kv.encode_block",
    "streamvqa.operators.kv.decode_block",
    "streamvqa.operators.kv.encode_summary",
    "streamvqa.operators.kv.decode_summary",
]

# Registry names the doc lists for build_encoder.
ENCODERS = {
    "dinov2-s-imgfocus",
    "stc-dinov2-s-imgfocus",
    "hf-clip",
    "hf-siglip",
    "hf-qwen2.5-vl",
    "hf-vision",
}

PACKAGES = ["io", "vision", "curvature", "kv", "lm", "audio", "serve"]


def _doc() -> str:
    return DOC.read_text(encoding="utf-8")


def resolve(dotted: str) -> object:
    """Import the longest importable module prefix of ``dotted`` and getattr the rest."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        name = ".".join(parts[:i])
        try:
            obj = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name is not None and (name == err.name or name.startswith(err.name + ".")):
                continue  # this prefix is not a module: try a shorter one
            raise  # a module that exists but fails to import
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(dotted)


def _names() -> list[str]:
    return sorted(set(DOTTED.findall(_doc())))


def test_doc_cites_names() -> None:
    names = _names()
    assert len(names) > 50, names  # the regex still finds the doc's import paths


@pytest.mark.parametrize("dotted", _names())
def test_every_cited_name_resolves(dotted: str) -> None:
    try:
        resolve(dotted)
    except (ImportError, AttributeError) as err:
        pytest.fail(f"docs/operators.md cites `{dotted}`, which does not resolve: {err!r}")


@pytest.mark.parametrize(("dotted", "methods", "classmethods"), STATEFUL, ids=[row[0] for row in STATEFUL])
def test_stateful_operators_have_their_serialisation_methods(
    dotted: str, methods: tuple[str, ...], classmethods: tuple[str, ...]
) -> None:
    doc = _doc()
    short = dotted.rsplit(".", 1)[1]
    assert f"`{dotted}`" in doc or short in doc, f"{dotted} is not documented in docs/operators.md"
    cls = resolve(dotted)
    assert inspect.isclass(cls), dotted
    for method in methods:
        assert callable(getattr(cls, method, None)), f"{dotted} has no {method}()"
        assert method in doc, f"docs/operators.md does not mention {method}()"
    for method in classmethods:
        assert isinstance(inspect.getattr_static(cls, method), classmethod), (
            f"{dotted}.{method} is not a classmethod"
        )


@pytest.mark.parametrize("dotted", CODECS)
def test_codec_functions_exist(dotted: str) -> None:
    assert f"`{dotted}`" in _doc()
    assert callable(resolve(dotted))


def test_registered_encoders_are_the_documented_ones() -> None:
    from streamvqa.operators.vision import available_encoders

    assert set(available_encoders()) == ENCODERS
    doc = _doc()
    for name in ENCODERS:
        assert f"`{name}`" in doc, name


def test_every_operator_package_has_a_section() -> None:
    doc = _doc()
    for package in PACKAGES:
        assert f"`streamvqa.operators.{package}`" in doc, package
    assert "pipelines/examples/keyframes.py" in doc
    assert (DOC.parents[1] / "pipelines" / "examples" / "keyframes.py").is_file()


def test_resolve_rejects_missing_names() -> None:
    with pytest.raises(AttributeError):
        resolve("streamvqa.operators.curvature.NoSuchOperator")
    with pytest.raises((ImportError, AttributeError)):
        resolve("streamvqa.no_such_module.Thing")
