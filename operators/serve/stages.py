"""The model stages as plain Python objects (no Ray): what a Serve replica and an in-process
Beam model handler both run, so the two paths compute the same thing.

- :class:`EncoderStage`: uint8 RGB frames of a stream in, pooled feature + patch tokens out
  (numpy). With an STC-Cacher encoder the stream's reference cache carries across calls and is
  snapshotted to the object store (``streams/<id>/serve/encoder-cache/<config>/state``).
- :class:`LMStage`: the KV memory (:class:`~streamvqa.operators.lm.memory.KVMemory`): open a
  stream, prefill chunks, answer questions with retrieval. After every call that changes a
  stream, its :class:`StreamKV` is checkpointed to ``streams/<id>/serve/lm-state/<model>/state``
  (blocks are written through to the object tier first), so a process that does not hold the
  stream in memory reloads it from there.

Both keep at most ``max_streams`` streams in memory (least recently used dropped: they come back
from the object store). Calls carry a sequence number (``seq`` for prefill, ``frame_index`` for
frames): a prefill whose ``seq`` was already applied is not applied twice (a retried call after
a replica died between its checkpoint and its reply), and a process whose in-memory copy of a
stream is behind the checkpoint (the stream ran elsewhere meanwhile) reloads it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from streamvqa.storage.keys import stream_prefix
from streamvqa.storage.object_store import ObjectNotFound, ObjectStore, S3Endpoint

log = logging.getLogger("streamvqa.serve")

TINY_TEST = "tiny-test"
_LM_STATE_FORMAT = b"streamvqa.serve.lm/1"


class StageError(RuntimeError):
    """A stage call that cannot be served (stream not open, out of order, bad input)."""


# ---------------------------------------------------------------------------------- store
@dataclass(frozen=True)
class StoreConfig:
    """Where per-stream state goes. ``s3=None``: nowhere durable (state lives in the process)."""

    s3: S3Endpoint | None = None
    bucket: str = "streamvqa"
    gpu_bytes: int = 256 << 20
    cpu_bytes: int = 1 << 30

    @classmethod
    def from_settings(cls, settings, endpoints=None) -> StoreConfig:
        """The object store of ``settings`` (embedded stack or cluster; see streamvqa.connect)."""
        from streamvqa import connect

        endpoints = endpoints or connect.resolve_endpoints(settings)
        return cls(s3=endpoints.s3, bucket=settings.s3.bucket)

    def object_store(self) -> ObjectStore | None:
        return None if self.s3 is None else ObjectStore(self.s3, self.bucket)

    def kv_store(self):
        """gpu -> cpu [-> object store, written through: a block is durable once put() returns]."""
        from streamvqa.operators.kv import standard_store

        objects = self.object_store()
        return standard_store(
            gpu_bytes=self.gpu_bytes,
            cpu_bytes=self.cpu_bytes,
            object_store=objects,
            write_through=objects is not None,
        )


def _get(objects: ObjectStore | None, key: str) -> bytes | None:
    if objects is None:
        return None
    try:
        return objects.get(key)
    except (ObjectNotFound, KeyError):
        return None


# -------------------------------------------------------------------------------- encoder
@dataclass(frozen=True)
class EncoderStageConfig:
    """A vision encoder from a registry name (or ``tiny-test``: a small random-weight ViT).

    ``path``: local weights (a registry backend's ``path=``; for ``tiny-test`` a
    ``torch.save`` d state dict of the ViT). ``stc``: :class:`STCCacheConfig` fields: the
    encoder runs the STC-Cacher with per-stream caches (``tiny-test`` only, or the DINOv2 port
    when ``encoder`` is ``stc-dinov2-s-imgfocus``). ``snapshot_every``: snapshot a stream's
    cache to the object store every this many calls of it (0: only on :meth:`EncoderStage.snapshot`).
    """

    encoder: str = TINY_TEST
    path: str | None = None
    device: str = "cpu"
    stc: dict | None = None
    seed: int = 0
    image_size: int = 32
    max_streams: int = 64
    snapshot_every: int = 1
    store: StoreConfig = field(default_factory=StoreConfig)
    options: dict = field(default_factory=dict)  # more keyword arguments for build_encoder


def tiny_vit_encoder(config: EncoderStageConfig):
    """A small DINOv2-layout ViT (random weights from ``seed``, or ``path``), plain or STC-cached."""
    from streamvqa.operators.vision import Dinov2Encoder, Preprocess, STCCacheConfig, STCCachedEncoder
    from streamvqa.operators.vision.vit import ViT, ViTConfig

    patch = 8
    cfg = ViTConfig(embed_dim=32, depth=2, num_heads=2, patch_size=patch, pos_grid=config.image_size // patch)
    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(config.seed)
        vit = ViT(cfg)
        with torch.no_grad():  # zeros in ViT's init: give every parameter some signal
            for p in vit.parameters():
                p.add_(torch.randn_like(p) * 0.02)
    finally:
        torch.random.set_rng_state(gen_state)
    if config.path:
        vit.load_state_dict(torch.load(config.path, map_location="cpu", weights_only=True))
    pre = Preprocess(size=(config.image_size, config.image_size))
    if config.stc is not None:
        return STCCachedEncoder(
            vit,
            STCCacheConfig(**config.stc),
            max_streams=config.max_streams,
            preprocess=pre,
            device=config.device,
        )
    return Dinov2Encoder(vit, preprocess=pre, device=config.device)


class EncoderStage:
    """Frames of streams in, numpy features out; per-stream STC caches snapshotted to the store."""

    def __init__(self, config: EncoderStageConfig) -> None:
        from streamvqa.operators.vision import STCCachedEncoder, build_encoder

        self.config = config
        if config.encoder == TINY_TEST:
            self.encoder = tiny_vit_encoder(config)
        else:
            kwargs = dict(config.options, device=config.device)
            if config.path:
                kwargs["path"] = config.path
            if config.stc is not None:
                kwargs.update(config.stc)
            self.encoder = build_encoder(config.encoder, **kwargs)
        self.cached = isinstance(self.encoder, STCCachedEncoder)
        self.objects = config.store.object_store()
        self._calls: dict[str, int] = {}
        # per stream, the last call's (frame_index, frames digest) keys and results: a call made
        # again (a client that timed out and retried while the first one ran) gets the same
        # answer instead of running against a cache that has already moved past its frames
        self._last: dict[str, tuple[list[tuple[int, str]], list[dict]]] = {}
        self._lock = threading.Lock()  # one forward at a time (the encoder keeps per-call state)

    # ------------------------------------------------------------------ state
    def snapshot_key(self, stream_id: str) -> str:
        fp = self.encoder.config.fingerprint() if self.cached else ""
        return f"{stream_prefix(stream_id)}serve/encoder-cache/{hashlib.sha256(fp.encode()).hexdigest()[:12]}/state"

    def snapshot(self, stream_id: str) -> str | None:
        """Write the stream's cache to the object store; returns the key (None: nothing to write)."""
        if not self.cached or self.objects is None:
            return None
        key = self.snapshot_key(stream_id)
        self.objects.put(key, self.encoder.snapshot(stream_id))
        return key

    def restore(self, stream_id: str) -> bool:
        """Load the stream's cache from the object store; False when there is none."""
        if not self.cached:
            return False
        blob = _get(self.objects, self.snapshot_key(stream_id))
        if blob is None:
            return False
        self.encoder.restore(blob, stream_id)
        return True

    def has_stream(self, stream_id: str) -> bool:
        return self.cached and stream_id in self.encoder.streams

    def load_stream(self, stream_id: str) -> None:
        """Make sure the stream's cache is in memory (restored from the store when it is not)."""
        stream_prefix(stream_id)
        if self.cached and not self.has_stream(stream_id):
            self.restore(stream_id)

    def drop_stream(self, stream_id: str) -> None:
        if self.cached:
            self.encoder.drop_stream(stream_id)
        self._calls.pop(stream_id, None)
        self._last.pop(stream_id, None)

    # ------------------------------------------------------------------ encoding
    def encode(self, stream_id: str, frames: np.ndarray, frame_index: int | None = None) -> dict:
        """``(B, H, W, 3)`` uint8 frames of one stream, in time order -> pooled ``(B, D)``,
        patch tokens ``(B, N, D)`` (float32 numpy) and the grid."""
        return self.encode_many([(stream_id, frames, frame_index)])[0]

    def encode_many(self, requests: Sequence[tuple[str, np.ndarray, int | None]]) -> list[dict]:
        """Several calls at once (a Serve batch). A plain encoder runs every frame in one forward;
        an STC-cached one runs each stream's frames together, streams in order of arrival."""
        for stream_id, frames, _ in requests:
            stream_prefix(stream_id)
            if not isinstance(frames, np.ndarray) or frames.ndim != 4 or frames.dtype != np.uint8:
                raise StageError(f"stream {stream_id!r}: expected (B, H, W, 3) uint8 frames")
        with self._lock:
            if not self.cached:
                return self._split(self._encode(np.concatenate([f for _, f, _ in requests])), requests)
            out: list[dict | None] = [None] * len(requests)
            order: OrderedDict[str, list[int]] = OrderedDict()
            for i, (stream_id, _, _) in enumerate(requests):
                order.setdefault(stream_id, []).append(i)
            for stream_id, rows in order.items():
                keys = _call_keys([requests[i] for i in rows])
                last = self._last.get(stream_id)
                if keys is not None and last is not None and last[0] == keys:
                    parts = last[1]  # the same call again: the same result, the cache untouched
                else:
                    self._sync_stream(stream_id, requests[rows[0]][2])
                    frames = np.concatenate([requests[i][1] for i in rows])
                    parts = self._split(self._encode(frames, stream_id), [requests[i] for i in rows])
                    if keys is not None:
                        self._last[stream_id] = (keys, parts)
                    self._after_call(stream_id)
                for i, part in zip(rows, parts, strict=True):
                    out[i] = part
            return out  # type: ignore[return-value]

    def _sync_stream(self, stream_id: str, frame_index: int | None) -> None:
        if not self.has_stream(stream_id):
            self.restore(stream_id)
        elif frame_index is not None and self.encoder.state(stream_id).frames != frame_index:
            # The stream ran elsewhere meanwhile: take the latest snapshot.
            self.restore(stream_id)
        if frame_index is not None and self.has_stream(stream_id):
            have = self.encoder.state(stream_id).frames
            if have != frame_index:
                log.warning("stream %s: frame %d given, cache at frame %d", stream_id, frame_index, have)

    def _after_call(self, stream_id: str) -> None:
        n = self._calls[stream_id] = self._calls.get(stream_id, 0) + 1
        every = self.config.snapshot_every
        if every > 0 and n % every == 0:
            self.snapshot(stream_id)

    def _encode(
        self, frames: np.ndarray, stream_id: str | None = None
    ) -> tuple[np.ndarray, np.ndarray, list]:
        out = self.encoder.encode(frames, stream_id=stream_id) if self.cached else self.encoder.encode(frames)
        patches, pooled = out.numpy()
        return pooled, patches, list(out.grid)

    @staticmethod
    def _split(encoded, requests) -> list[dict]:
        pooled, patches, grid = encoded
        parts, at = [], 0
        for _, frames, _ in requests:
            n = len(frames)
            parts.append({"pooled": pooled[at : at + n], "patch_tokens": patches[at : at + n], "grid": grid})
            at += n
        return parts


def _call_keys(requests) -> list[tuple[int, str]] | None:
    """(frame_index, digest of the frames) per request; None when a request has no index (its
    position in the stream is unknown, so it cannot be recognised as a repeat)."""
    if any(index is None for _, _, index in requests):
        return None
    return [(int(index), hashlib.sha256(frames.tobytes()).hexdigest()) for _, frames, index in requests]


# ------------------------------------------------------------------------------------- LM
@dataclass(frozen=True)
class LMStageConfig:
    """A decoder LM loaded from a local folder (``save_pretrained`` layout) over a KV memory.

    ``memory``: :class:`KVMemoryConfig` fields. ``model_id``: the id its KV blocks are stored
    under (default: the folder path, as transformers names it).
    """

    model_path: str
    model_id: str | None = None
    device: str = "cpu"
    dtype: str = "float32"
    memory: dict = field(default_factory=dict)
    max_streams: int = 64
    store: StoreConfig = field(default_factory=StoreConfig)


@dataclass
class _Stream:
    state: Any  # StreamKV
    seq: int  # last applied prefill seq (0: just opened)


def _load_lm(config: LMStageConfig):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(config.model_path, dtype=getattr(torch, config.dtype))
    model = model.to(config.device).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(config.model_path)
    except (OSError, ValueError, TypeError):
        tokenizer = None  # a test model without one: token ids only
    return model, tokenizer


class LMStage:
    """Open / prefill / answer per stream over one KV memory; every change checkpointed."""

    def __init__(self, config: LMStageConfig) -> None:
        from streamvqa.operators.lm.memory import KVMemory, KVMemoryConfig
        from streamvqa.operators.lm.model import DecoderAdapter

        self.config = config
        model, tokenizer = _load_lm(config)
        adapter = DecoderAdapter(model, model_id=config.model_id)
        self.objects = config.store.object_store()
        self.store = config.store.kv_store()
        self.memory = KVMemory(
            adapter, self.store, tokenizer=tokenizer, config=KVMemoryConfig(**config.memory)
        )
        self.model_id = self.memory.model_id
        self._streams: OrderedDict[str, _Stream] = OrderedDict()
        self._lock = threading.RLock()

    def close(self) -> None:
        self.store.close()

    # ------------------------------------------------------------------ checkpoints
    def state_key(self, stream_id: str) -> str:
        from streamvqa.operators.kv import model_slug

        return f"{stream_prefix(stream_id)}serve/lm-state/{model_slug(self.model_id)}/state"

    def _checkpoint(self, stream_id: str, entry: _Stream) -> None:
        if self.objects is None:
            return
        head = json.dumps({"seq": entry.seq}).encode()
        blob = _LM_STATE_FORMAT + struct.pack("<I", len(head)) + head + entry.state.to_bytes()
        self.objects.put(self.state_key(stream_id), blob)

    def _load(self, stream_id: str) -> _Stream | None:
        from streamvqa.operators.lm.memory import StreamKV

        blob = _get(self.objects, self.state_key(stream_id))
        if blob is None:
            return None
        if not blob.startswith(_LM_STATE_FORMAT):
            raise StageError(f"stream {stream_id!r}: checkpoint is not a serve LM state")
        at = len(_LM_STATE_FORMAT)
        (n,) = struct.unpack_from("<I", blob, at)
        head = json.loads(blob[at + 4 : at + 4 + n])
        return _Stream(StreamKV.from_bytes(blob[at + 4 + n :], self.store), int(head["seq"]))

    def _remember(self, stream_id: str, entry: _Stream) -> None:
        self._streams[stream_id] = entry
        self._streams.move_to_end(stream_id)
        while len(self._streams) > self.config.max_streams:
            self._streams.popitem(last=False)

    def has_stream(self, stream_id: str) -> bool:
        return stream_id in self._streams

    def load_stream(self, stream_id: str, after_seq: int | None = None) -> _Stream:
        """The stream, from memory or (not there, or behind ``after_seq``) from its checkpoint."""
        stream_prefix(stream_id)
        with self._lock:
            entry = self._streams.get(stream_id)
            if entry is None or (after_seq is not None and entry.seq < after_seq):
                entry = self._load(stream_id)
                if entry is None:
                    raise StageError(f"stream {stream_id!r} is not open (no state in memory or in the store)")
                self._remember(stream_id, entry)
            self._streams.move_to_end(stream_id)
            return entry

    def drop_stream(self, stream_id: str) -> None:
        with self._lock:
            self._streams.pop(stream_id, None)

    # ------------------------------------------------------------------ calls
    def open(
        self,
        stream_id: str,
        system_prompt: str | Sequence[int] | None = None,
        start_us: int = 0,
        *,
        reset: bool = False,
    ) -> dict:
        """Open a stream (its sink: the system prompt). A stream that is already open (in memory or
        checkpointed) is left as it is (``opened: False``: a retried open resets nothing) unless
        ``reset``, which starts it over."""
        with self._lock:
            if not reset:
                try:
                    entry = self.load_stream(stream_id)
                    return {"stream_id": stream_id, "seq": entry.seq, "opened": False}
                except StageError:
                    pass
            entry = _Stream(self.memory.open(stream_id, _prompt(system_prompt), start_us=start_us), 0)
            self._checkpoint(stream_id, entry)
            self._remember(stream_id, entry)
            return {"stream_id": stream_id, "seq": 0, "opened": True}

    def prefill(
        self,
        stream_id: str,
        seq: int | None,
        start_us: int,
        end_us: int,
        *,
        text: str | None = None,
        tokens: Sequence[int] | None = None,
    ) -> dict:
        """Append a chunk (text or token ids) covering ``[start_us, end_us]``.

        ``seq``: the chunk's number in the stream (1, 2, ...); a chunk whose number was already
        applied is skipped (``applied: False``), so a retried call is applied once.
        """
        if (text is None) == (tokens is None):
            raise StageError("prefill needs text or tokens (one of them)")
        with self._lock:
            entry = self.load_stream(stream_id, None if seq is None else seq - 1)
            if seq is not None and seq <= entry.seq:
                return self._prefill_result(stream_id, entry, applied=False)
            if text is not None:
                entry.state = self.memory.prefill_text(entry.state, text, start_us, end_us)
            else:
                assert tokens is not None  # one of text and tokens (checked above)
                entry.state = self.memory.prefill_tokens(entry.state, list(tokens), start_us, end_us)
            entry.seq = seq if seq is not None else entry.seq + 1
            self._checkpoint(stream_id, entry)
            return self._prefill_result(stream_id, entry, applied=True)

    def prefill_text(
        self, stream_id: str, text: str, start_us: int, end_us: int, seq: int | None = None
    ) -> dict:
        return self.prefill(stream_id, seq, start_us, end_us, text=text)

    @staticmethod
    def _prefill_result(stream_id: str, entry: _Stream, *, applied: bool) -> dict:
        return {
            "stream_id": stream_id,
            "seq": entry.seq,
            "applied": applied,
            "window_tokens": entry.state.window_tokens,
            "spilled_blocks": len(entry.state.index),
        }

    def answer(
        self,
        stream_id: str,
        query_id: str,
        question: str | Sequence[int],
        *,
        after_seq: int | None = None,
        max_new_tokens: int | None = None,
    ) -> dict:
        """Answer from the stream's memory (retrieval + greedy decoding); the memory is unchanged.
        ``after_seq``: the answer must see at least that many chunks (reload if behind)."""
        with self._lock:
            entry = self.load_stream(stream_id, after_seq)
            answer = self.memory.answer(entry.state, _prompt(question), max_new_tokens=max_new_tokens)
        return {
            "stream_id": stream_id,
            "query_id": query_id,
            "seq": entry.seq,
            "text": answer.text,
            "token_ids": list(answer.token_ids),
            "evidence": [asdict(e) for e in answer.evidence],
            "window_range_us": list(answer.window_range_us) if answer.window_range_us else None,
            "unusable": [list(u) for u in answer.unusable],
            "context_tokens": answer.context_tokens,
            "timings_ms": dict(answer.timings_ms),
        }


def _prompt(value):
    if value is None or isinstance(value, str):
        return value
    return torch.as_tensor(list(value), dtype=torch.int64)


__all__ = [
    "TINY_TEST",
    "EncoderStage",
    "EncoderStageConfig",
    "LMStage",
    "LMStageConfig",
    "StageError",
    "StoreConfig",
    "tiny_vit_encoder",
]
