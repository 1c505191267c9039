"""The model ports: what the pipeline's stages call, as small typed protocols.

A stage owns its streams' state (its snapshot is the only copy); a model behind a port is
stateless: what it needs of a stream comes in with the call and what changed goes back out,
``(state, outputs)``. Each port has an in-process implementation and a Ray Serve handle
implementation, chosen by ``settings.pipeline.models`` (``"local"`` or ``"serve"``):

====================  ===========================================  ==========================================
port                  in process                                   on Ray Serve
====================  ===========================================  ==========================================
:class:`EncoderPort`  ``operators.vision.port.LocalEncoderPort``   ``operators.serve.ports.ServeEncoderPort``
:class:`SpeechPort`   ``operators.audio.SpeechToText``             ``operators.serve.ports.ServeSpeechPort``
:class:`MemoryPort`   ``operators.lm.memory.KVMemory``             ``operators.serve.ports.ServeMemoryPort``
====================  ===========================================  ==========================================

The STC-Cacher's per-stream reference is the one piece of encoder state: it travels as an
explicit :class:`STCReference` value that the frame stage keeps in its state. Its derived cache
(a full ViT forward of the reference frame, 14-19 MB per stream at 224 px) is rebuilt from the
frame it names when it is missing (after a restore, on another process, after a failed call),
and is never serialised.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    import torch

    from streamvqa.operators.audio import TranscriptSegment, VadState
    from streamvqa.operators.kv import TieredStore
    from streamvqa.operators.lm.memory import Answer, StreamKV
    from streamvqa.schemas import AudioChunk


# ------------------------------------------------------------------------------ encoder
@dataclass(frozen=True)
class ReferenceFrame:
    """Where a reference frame's payload is: an object key under its stream's prefix (content
    addressed), with what decodes it."""

    key: str
    codec: str
    width: int
    height: int


@dataclass
class STCReference:
    """One stream's STC-Cacher reference, as a value the frame stage's state owns.

    ``frame``: the reference frame (None before the first frame). ``frames``,
    ``since_reference``, ``references``: the cacher's counters. ``cache``: the derived cache of
    ``frame`` (an ``STCCacheState`` in process; None when it has to be rebuilt): an encoder
    port may update it in place and returns the value; if a call raises, the port leaves
    ``cache`` None, so the next call rebuilds it from ``frame`` (never from a half-updated one).
    Only ``frame`` and the counters are serialised (:meth:`to_dict`).
    """

    frame: ReferenceFrame | None = None
    frames: int = 0
    since_reference: int = 0
    references: int = 0
    cache: Any = None

    def to_dict(self) -> dict:
        f = self.frame
        return {
            "frame": None if f is None else [f.key, f.codec, f.width, f.height],
            "counters": [self.frames, self.since_reference, self.references],
        }

    @classmethod
    def from_dict(cls, d: dict) -> STCReference:
        f = d["frame"]
        frames, since, refs = d["counters"]
        return cls(None if f is None else ReferenceFrame(*f), int(frames), int(since), int(refs))


@dataclass(frozen=True)
class Encoded:
    """One frame encoded: pooled feature ``(D,)`` float32, patch tokens ``(N, D)`` float32 on
    the CPU in row-major ``grid`` order, whether the frame became the stream's reference and
    the fraction of token-layer work the STC-Cacher reused for it (0 for a plain encoder)."""

    pooled: np.ndarray
    patch_tokens: torch.Tensor
    grid: tuple[int, int]
    reference: bool = False
    cached_fraction: float = 0.0


@runtime_checkable
class EncoderPort(Protocol):
    """uint8 RGB ``(H, W, 3)`` frames of a stream in, :class:`Encoded` out.

    ``cached``: an STC-cached encoder; its ``encode`` takes the stream's reference (None for a
    new stream) and the frame's own :class:`ReferenceFrame` (where its payload is or will be
    stored: it becomes the reference's ``frame`` if this frame becomes the reference) and
    returns the new reference. A plain encoder takes and returns None."""

    name: str
    grid: tuple[int, int]
    cached: bool

    def encode(
        self,
        stream_id: str,
        pixels: np.ndarray,
        reference: STCReference | None = None,
        frame: ReferenceFrame | None = None,
    ) -> tuple[STCReference | None, Encoded]: ...


# ------------------------------------------------------------------------------- speech
@runtime_checkable
class SpeechPort(Protocol):
    """Audio chunks of a stream in, finished utterances' transcripts out; the VAD state
    (its open segment included) is explicit."""

    def initial_state(self, stream_id: str) -> VadState: ...

    def process_chunk(
        self, state: VadState, chunk: AudioChunk
    ) -> tuple[VadState, list[TranscriptSegment]]: ...

    def open_since_us(self, state: VadState) -> int | None: ...


# ------------------------------------------------------------------------------- memory
@runtime_checkable
class MemoryPort(Protocol):
    """The language model over a stream's KV memory (:class:`StreamKV`, explicit state)."""

    model_id: str
    store: TieredStore  # where spilled blocks live (a StreamKV's index names them)

    def open(self, stream_id: str, system_prompt: Any = None, *, start_us: int = 0) -> StreamKV: ...

    def prefill_text(self, state: StreamKV, text: str, start_us: int, end_us: int) -> StreamKV: ...

    def spill(self, state: StreamKV, keep_tokens: int = 0) -> StreamKV: ...

    def answer(self, state: StreamKV, question: Any, *, max_new_tokens: int | None = None) -> Answer: ...


__all__ = ["Encoded", "EncoderPort", "MemoryPort", "ReferenceFrame", "STCReference", "SpeechPort"]
