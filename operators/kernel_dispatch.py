"""Choosing between a Triton kernel and its PyTorch reference (shared by STC and KV scoring).

``backend="auto"`` takes the value of the module's environment variable (``torch`` or
``triton``) when set, else Triton for CUDA tensors when Triton imports, PyTorch otherwise.
``backend="triton"`` on CPU tensors only works under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch


def cdiv(a: int, b: int) -> int:
    """Ceiling division (grid sizes)."""
    return -(-a // b)


def choose_backend(
    tensor: torch.Tensor, backend: str, *, env_var: str, what: str, triton_available: Callable[[], bool]
) -> str:
    """'triton' or 'torch' for an operation on ``tensor``."""
    if backend == "auto":
        backend = os.environ.get(env_var, "auto")
    if backend == "auto":
        return "triton" if tensor.is_cuda and triton_available() else "torch"
    if backend not in ("torch", "triton"):
        raise ValueError(f"unknown {what} backend {backend!r} (auto, torch, triton)")
    if backend == "triton" and not triton_available():
        raise RuntimeError("backend='triton' but triton does not import")
    return backend
