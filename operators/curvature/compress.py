"""Fuzzy-memory compression: a frame's patch tokens -> a few tokens, with their grid positions.

Two compressors, named by a spec string (config field ``fuzzy``):

- ``pool:RxC`` (default ``pool:4x4``): average-pool the patch grid to R x C
  cells (adaptive bins when the grid does not divide evenly). 16 x 16 -> 16 tokens.
- ``prune:N``: keep the N patch tokens least similar (cosine) to the frame's
  mean token, the most distinctive ones, in raster order (the selection rule of
  STC-Pruner without its multi-scale kernel; that pruner can replace it).

Every token keeps its position (row, col) in patch units (the centre of the
patch or pooled cell), so a language-model stage can place it. Merging two
fuzzy entries (overflow policy ``merge``) averages pooled grids weighted by the
frames each represents, or re-selects the N most distinctive tokens of the
union for ``prune``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TokenBlock:
    """Tokens of one memory entry: (n, D) values and (n, 2) positions (row, col) in patch units."""

    tokens: np.ndarray
    positions: np.ndarray

    def __post_init__(self) -> None:
        if self.tokens.ndim != 2 or self.positions.shape != (len(self.tokens), 2):
            raise ValueError(f"bad token block shapes {self.tokens.shape}, {self.positions.shape}")

    def __len__(self) -> int:
        return len(self.tokens)

    def to_dict(self) -> dict:
        return {"tokens": self.tokens, "positions": self.positions}

    @classmethod
    def from_dict(cls, d: dict) -> TokenBlock:
        return cls(tokens=d["tokens"], positions=d["positions"])


def grid_positions(grid: tuple[int, int]) -> np.ndarray:
    rows, cols = grid
    r, c = np.meshgrid(np.arange(rows, dtype=np.float32), np.arange(cols, dtype=np.float32), indexing="ij")
    return np.stack([r.ravel() + 0.5, c.ravel() + 0.5], axis=1)


def full_block(tokens: np.ndarray, grid: tuple[int, int], dtype: np.dtype) -> TokenBlock:
    """The clear-memory payload: every patch token, raster order."""
    tokens = np.asarray(tokens)
    if tokens.shape[0] != grid[0] * grid[1]:
        raise ValueError(f"{tokens.shape[0]} tokens do not fill a {grid[0]}x{grid[1]} grid")
    return TokenBlock(np.array(tokens, dtype=dtype, copy=True), grid_positions(grid))


def _bins(size: int, out: int) -> list[tuple[int, int]]:
    return [((i * size) // out, -((-(i + 1) * size) // out)) for i in range(out)]


class PoolCompressor:
    def __init__(self, rows: int = 4, cols: int = 4) -> None:
        if rows < 1 or cols < 1:
            raise ValueError("pool grid must be at least 1x1")
        self.rows, self.cols = rows, cols
        self.spec = f"pool:{rows}x{cols}"

    def n_tokens(self, grid: tuple[int, int]) -> int:
        return self.rows * self.cols

    def compress(self, tokens: np.ndarray, grid: tuple[int, int], dtype: np.dtype) -> TokenBlock:
        gh, gw = grid
        if self.rows > gh or self.cols > gw:
            raise ValueError(f"cannot pool a {gh}x{gw} grid to {self.spec}")
        x = np.asarray(tokens, dtype=np.float32).reshape(gh, gw, -1)
        rb, cb = _bins(gh, self.rows), _bins(gw, self.cols)
        if gh % self.rows == 0 and gw % self.cols == 0:  # even bins: one reshape-mean
            pooled = x.reshape(self.rows, gh // self.rows, self.cols, gw // self.cols, -1).mean(axis=(1, 3))
            pos = np.array(
                [((r0 + r1) / 2.0, (c0 + c1) / 2.0) for r0, r1 in rb for c0, c1 in cb], dtype=np.float32
            )
            return TokenBlock(pooled.reshape(self.rows * self.cols, -1).astype(dtype, copy=False), pos)
        out = np.empty((self.rows * self.cols, x.shape[-1]), dtype=np.float32)
        pos = np.empty((self.rows * self.cols, 2), dtype=np.float32)
        for i, (r0, r1) in enumerate(rb):
            for j, (c0, c1) in enumerate(cb):
                out[i * self.cols + j] = x[r0:r1, c0:c1].mean(axis=(0, 1))
                pos[i * self.cols + j] = ((r0 + r1) / 2.0, (c0 + c1) / 2.0)
        return TokenBlock(out.astype(dtype, copy=False), pos)

    def merge(self, a: TokenBlock, wa: int, b: TokenBlock, wb: int) -> TokenBlock:
        mixed = (a.tokens.astype(np.float32) * wa + b.tokens.astype(np.float32) * wb) / float(wa + wb)
        return TokenBlock(mixed.astype(a.tokens.dtype), a.positions.copy())


def _most_distinct(tokens: np.ndarray, n: int) -> np.ndarray:
    """Indices (ascending) of the n tokens with the lowest cosine similarity to the mean token."""
    x = tokens.astype(np.float32)
    mean = x.mean(axis=0)
    sim = (x @ mean) / (np.linalg.norm(x, axis=1) * np.linalg.norm(mean) + 1e-12)
    keep = np.argsort(sim, kind="stable")[:n]
    return np.sort(keep)


class PruneCompressor:
    def __init__(self, n: int = 16) -> None:
        if n < 1:
            raise ValueError("prune must keep at least one token")
        self.n = n
        self.spec = f"prune:{n}"

    def n_tokens(self, grid: tuple[int, int]) -> int:
        return self.n

    def compress(self, tokens: np.ndarray, grid: tuple[int, int], dtype: np.dtype) -> TokenBlock:
        tokens = np.asarray(tokens)
        if self.n > len(tokens):
            raise ValueError(f"cannot keep {self.n} of {len(tokens)} tokens")
        keep = _most_distinct(tokens, self.n)
        return TokenBlock(np.array(tokens[keep], dtype=dtype), grid_positions(grid)[keep])

    def merge(self, a: TokenBlock, wa: int, b: TokenBlock, wb: int) -> TokenBlock:
        tokens = np.concatenate([a.tokens, b.tokens])
        positions = np.concatenate([a.positions, b.positions])
        keep = _most_distinct(tokens, self.n)
        return TokenBlock(tokens[keep].copy(), positions[keep].copy())


Compressor = PoolCompressor | PruneCompressor


def make_compressor(spec: str) -> Compressor:
    """``pool:4x4`` / ``prune:16`` -> a compressor."""
    m = re.fullmatch(r"pool:(\d+)x(\d+)", spec)
    if m:
        return PoolCompressor(int(m.group(1)), int(m.group(2)))
    m = re.fullmatch(r"prune:(\d+)", spec)
    if m:
        return PruneCompressor(int(m.group(1)))
    raise ValueError(f"unknown fuzzy compression {spec!r}: use 'pool:RxC' or 'prune:N'")
