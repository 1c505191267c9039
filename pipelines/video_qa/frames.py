"""FrameStage: decode/validate -> vision encoder with the STC cache -> CurveStream routing ->
STC pruning -> keyframes to the object store -> a VisualNote per frame on the memory topic.

State per stream (snapshotted with the input offsets): the CurveStream state, the pruner's
running mean, the last sequence number and the STC-Cacher's reference *by frame*: the reference
cache (19 MB per stream at 224 px) is a full forward of one frame, so the state keeps that frame
(its payload in the object store, content-addressed, written when the frame becomes the
reference) and the cacher's counters; a restarted worker rebuilds the exact cache from it, and
the features after a restart equal an uninterrupted run's.
"""

from __future__ import annotations

import inspect
import json
import struct
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from streamvqa.media import encode_jpeg
from streamvqa.operators.curvature.operator import CurveStream, CurveStreamConfig, CurveStreamState
from streamvqa.operators.curvature.records import FrameInput
from streamvqa.operators.io.records import KafkaRecord, Output, scoped_id
from streamvqa.operators.model_guard import CallPolicy, ModelCallFailed, ModelGuard
from streamvqa.operators.vision.stc_prune import STCPruneConfig, STCPruner, STCPruneState
from streamvqa.schemas import Frame, Limits, VisualNote
from streamvqa.schemas.errors import InvalidField
from streamvqa.storage.keys import content_hash, object_key

from .common import decode_keyed, note, wall_us

_STATE = b"streamvqa.frame-stage/1"


@dataclass
class FrameStageState:
    curve: CurveStreamState
    prune: STCPruneState
    last_seq: int = -1
    frames: int = 0
    keyframes: int = 0
    stream_id: str = ""
    # the STC reference: (object key, codec, width, height) of its frame, and the cacher's counters
    reference: tuple[str, str, int, int] | None = None
    stc_counters: tuple[int, int, int] = (0, 0, 0)  # frames, since_reference, references
    restored: bool = field(default=False, compare=False)  # decoded from a snapshot: rebuild the cache

    def to_bytes(self) -> bytes:
        head = json.dumps(
            {
                "last_seq": self.last_seq,
                "frames": self.frames,
                "keyframes": self.keyframes,
                "stream_id": self.stream_id,
                "reference": self.reference,
                "stc_counters": self.stc_counters,
            }
        ).encode()
        curve, prune = self.curve.to_bytes(), self.prune.to_bytes()
        return _STATE + struct.pack("<III", len(head), len(curve), len(prune)) + head + curve + prune


def pixels_of(frame: Frame) -> np.ndarray:
    """uint8 RGB (H, W, 3) of a frame; a payload that does not decode, or whose size is not the
    record's, is a bad record (checked from the image header, before decoding the pixels)."""
    if frame.codec == "rgb24":
        return np.frombuffer(frame.payload, np.uint8).reshape(frame.height, frame.width, 3)
    return decode_image(frame.payload, "payload", (frame.width, frame.height))


def decode_image(
    data: bytes, field: str, size: tuple[int, int] | None = None, max_pixels: int = 8192 * 8192
) -> np.ndarray:
    """uint8 RGB of a JPEG/PNG; raises ``InvalidField`` (a dead letter) for anything else."""
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if size is not None and (width, height) != tuple(size):
                raise InvalidField(f"{field} is {width}x{height}, the record says {size[0]}x{size[1]}", field)
            if width * height > max_pixels:
                raise InvalidField(f"{field} is {width}x{height}, more than {max_pixels} pixels", field)
            return np.asarray(image.convert("RGB"))
    except InvalidField:
        raise
    except Exception as err:  # PIL raises many kinds for a corrupt image
        raise InvalidField(f"{field} does not decode as an image: {err}", field) from err


@dataclass
class FrameStage:
    """Per stream: encode, route, prune and note each new frame; keyframes to the object store.

    ``encoder``: a :class:`~streamvqa.operators.vision.VisionEncoder`; with an STC-cached one
    (``stc-dinov2-s-imgfocus``) each stream's reference cache carries across frames.
    ``store``: an object store for keyframes (None: keyframes are not stored).
    """

    encoder: Any  # duck-typed: a VisionEncoder, with the STC methods when cached
    memory_topic: str
    store: Any | None = None  # put(key, data) / get(key), like streamvqa.storage.ObjectStore
    curvature: CurveStreamConfig = field(default_factory=CurveStreamConfig)
    pruning: STCPruneConfig = field(default_factory=STCPruneConfig)
    limits: Limits = field(default_factory=Limits)
    calls: CallPolicy = field(default_factory=CallPolicy)
    name: str = "frames"

    def __post_init__(self) -> None:
        self.guard = ModelGuard("encoder", self.calls)
        grid = tuple(self.encoder.grid)
        if self.curvature.grid != grid:
            self.curvature = CurveStreamConfig(
                **{**self.curvature.to_dict(), "grid": grid, "clear_tokens": grid[0] * grid[1]}
            )
        self.router = CurveStream(self.curvature)
        self.pruner = STCPruner(self.pruning)
        self._per_stream = "stream_id" in inspect.signature(self.encoder.encode).parameters

    # -- state -------------------------------------------------------------------
    def initial_state(self, stream_id: str) -> FrameStageState:
        return FrameStageState(self.router.init_state(), self.pruner.init_state(), stream_id=stream_id)

    def encode_state(self, state: FrameStageState) -> bytes:
        return state.to_bytes()

    def decode_state(self, data: bytes) -> FrameStageState:
        if not data.startswith(_STATE):
            raise ValueError("not a frame stage state")
        at = len(_STATE)
        n_head, n_curve, n_prune = struct.unpack_from("<III", data, at)
        at += 12
        head = json.loads(data[at : at + n_head])
        at += n_head
        curve = self.router.restore(data[at : at + n_curve])
        prune = STCPruneState.from_bytes(data[at + n_curve : at + n_curve + n_prune])
        reference = tuple(head["reference"]) if head.get("reference") else None
        return FrameStageState(
            curve,
            prune,
            head["last_seq"],
            head["frames"],
            head["keyframes"],
            stream_id=head.get("stream_id", ""),
            reference=reference,
            stc_counters=tuple(head.get("stc_counters", (0, 0, 0))),
            restored=True,
        )

    # -- processing --------------------------------------------------------------
    def process(self, state: FrameStageState, record: KafkaRecord) -> tuple[FrameStageState, list[Output]]:
        frame = decode_keyed(record, Frame, self.limits)  # SchemaError -> dead letter
        pixels = pixels_of(frame)  # a corrupt frame is a dead letter, even with a seq already seen
        if frame.seq <= state.last_seq:
            return state, []  # a duplicate, or late: the stream has moved on
        t0 = time.perf_counter()
        try:
            encoded = self.guard.call(
                lambda: self._encode(frame.stream_id, pixels, state),
                what=f"frame {frame.seq} of {frame.stream_id}",
                rollback=(lambda: self._rebuild_cache(frame.stream_id, state)) if self._per_stream else None,
            )
        except ModelCallFailed:
            state.restored = True  # the failed calls may have changed the stream's cache: rebuild it
            raise  # the frame is dead-lettered; the stream goes on as if it had not come
        encode_ms = (time.perf_counter() - t0) * 1000
        stats = getattr(self.encoder, "last_stats", None) or []
        cached = float(stats[-1].skipped_fraction) if stats else 0.0
        if self._per_stream:
            self._note_cache(frame, state, bool(stats and stats[-1].reference))
        pooled = encoded.pooled[0].float().cpu().numpy().astype(np.float32)
        digest = content_hash(frame.payload)
        step = self.router.step(state.curve, FrameInput(frame.seq, frame.pts_us, pooled, content_hash=digest))
        decision = step.decision
        state.last_seq, state.frames = frame.seq, state.frames + 1
        if decision is None:  # the router had seen this seq (state restored past it)
            return state, []
        kept = self.pruner.prune(
            state.prune, encoded.patch_tokens.float().cpu(), encoded.grid, tiers=[decision.tier]
        )
        key = ""
        if decision.tier == "clear" and self.store is not None:
            jpeg = frame.payload if frame.codec == "jpeg" else encode_jpeg(pixels)
            key = object_key(frame.stream_id, "keyframes", f"{frame.seq:010d}", jpeg)
            self.store.put(key, jpeg)  # content-addressed: writing it again after a replay is harmless
            state.keyframes += 1
        visual = VisualNote(
            stream_id=frame.stream_id,
            seq=frame.seq,
            pts_us=frame.pts_us,
            wall_us=wall_us(record),
            tier=decision.tier,
            reason=decision.reason,
            score=_finite_or_none(decision.score),
            threshold=_finite_or_none(decision.threshold),
            tokens=len(kept[0]),
            memory_tokens=decision.memory_tokens,
            cached_fraction=min(1.0, max(0.0, cached)),
            feature=tuple(float(x) for x in pooled),
            keyframe_key=key,
            content_hash=digest,
            encode_ms=encode_ms,
        )
        return state, [
            note(self.memory_topic, scoped_id(frame.stream_id, "frame", frame.seq), visual, record)
        ]

    def _sync_cache(self, stream_id: str, state: FrameStageState) -> None:
        """Make the encoder's cache of the stream the state's: rebuilt from the reference frame
        after a restore (or when the encoder dropped the stream), fresh for a new stream."""
        if not state.restored and stream_id in self.encoder.streams:
            return
        state.restored = False
        if state.reference is None:
            self.encoder.set_state(stream_id, self.encoder.new_state())
            return
        if self.store is None:
            raise RuntimeError("the frame stage needs an object store to restore its STC reference")
        key, codec, width, height = state.reference
        ref = Frame(
            stream_id=stream_id,
            seq=0,
            pts_us=0,
            codec=codec,
            width=width,
            height=height,
            payload=self.store.get(key),
        )
        frames, since, refs = state.stc_counters
        self.encoder.set_state(
            stream_id,
            self.encoder.reference_state(
                pixels_of(ref), frames=frames, since_reference=since, references=refs
            ),
        )

    def _rebuild_cache(self, stream_id: str, state: FrameStageState) -> None:
        """Before a retried encode: the stream's cache as the state says (a failed call may have
        moved it on)."""
        state.restored = True
        self._sync_cache(stream_id, state)

    def _note_cache(self, frame: Frame, state: FrameStageState, reference: bool) -> None:
        if reference and self.store is not None:
            key = object_key(frame.stream_id, "stc-reference", f"{frame.seq:010d}", frame.payload)
            self.store.put(key, frame.payload)  # content-addressed: harmless to write again
            state.reference = (key, frame.codec, frame.width, frame.height)
        st = self.encoder.state(frame.stream_id)
        state.stc_counters = (st.frames, st.since_reference, st.references)

    def _encode(self, stream_id: str, pixels: np.ndarray, state: FrameStageState):
        with torch.inference_mode():
            if self._per_stream:  # an STC-cached encoder: the stream's reference cache
                self._sync_cache(stream_id, state)
                return self.encoder.encode(pixels[None], stream_id=stream_id)
            return self.encoder.encode(pixels[None])


def _finite_or_none(value: float) -> float | None:
    return float(value) if value is not None and np.isfinite(value) else None
