"""Online K-sigma threshold: running mean + k * running std of the score over a sliding window.

:class:`RollingStats` keeps the last ``window`` values in a ring buffer and
updates mean and M2 (sum of squared deviations) with Welford's add / replace
steps, O(1) per value. Replacing values in a sliding window lets rounding error
accumulate, and badly so when the window leaves a stretch of huge values (the
update then subtracts large, nearly equal numbers). So the update also keeps a
running bound on the error it may have made, and the statistics are recomputed
exactly from the buffer (two-pass, ``math.fsum``) every ``window`` replacements
and whenever that bound exceeds 1e-10 of the statistics: O(1) amortised, with
a relative error that stays below ~1e-10 (checked against numpy in the tests,
including values around 1e6 with tiny spread and jumps from 1e8 back to 1).
``window=None`` keeps cumulative statistics over the whole stream.

The standard deviation is the population one (ddof = 0) of the values in the
window. :class:`KSigmaThreshold` gives +inf until ``min_samples`` values have
been seen (warm-up: nothing exceeds it) and floors the std at ``std_floor`` so
a constant score (a frozen stream) does not turn every rounding wobble into an
outlier. With ``clip`` the statistics take min(score, threshold) after warm-up
(winsorised), so frequent outliers (a cut-dense stream) do not inflate the std
that sets the threshold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

_EPS = 2.0**-52
#: recompute exactly once the bound on the accumulated rounding error exceeds this relative size
_REL = 1e-10


@dataclass
class RollingStats:
    window: int | None = 64
    buf: list[float] = field(default_factory=list)
    head: int = 0  # next slot to overwrite once the buffer is full
    n: int = 0
    mean: float = 0.0
    m2: float = 0.0
    replaced: int = 0  # replacements since the last exact recomputation
    err_mean: float = 0.0  # running bounds on the rounding error accumulated by replacements
    err_m2: float = 0.0

    def __post_init__(self) -> None:
        if self.window is not None and self.window < 1:
            raise ValueError(f"window must be >= 1 or None, got {self.window}")

    def push(self, x: float) -> None:
        x = float(x)
        if not math.isfinite(x):
            raise ValueError(f"cannot add a non-finite value {x!r} to the statistics")
        w = self.window
        if w is None or self.n < w:
            if w is not None:
                self.buf.append(x)
            self.n += 1
            delta = x - self.mean
            self.mean += delta / self.n
            self.m2 += delta * (x - self.mean)
        else:
            old = self.buf[self.head]
            self.buf[self.head] = x
            self.head = (self.head + 1) % w
            step = (x - old) / w
            new_mean = self.mean + step
            term = (x - old) * (x - new_mean + old - self.mean)
            self.err_mean += _EPS * (abs(self.mean) + abs(step) + abs(x) + abs(old))
            self.err_m2 += _EPS * (abs(self.m2) + abs(term) * 4.0 + (abs(x) + abs(old)) * abs(step) * w)
            self.m2 += term
            self.mean = new_mean
            self.replaced += 1
            # Exact recomputation every window, and at once when the error bound stops being small
            # next to the values themselves (a window leaving a regime of huge values, say).
            if (
                self.replaced >= w
                or self.err_m2 > _REL * self.m2
                or self.err_mean > _REL * (abs(self.mean) + math.sqrt(max(self.m2, 0.0) / w))
            ):
                self._recompute()
        if self.m2 < 0.0:
            self.m2 = 0.0

    def _recompute(self) -> None:
        self.mean = math.fsum(self.buf) / self.n
        self.m2 = math.fsum((v - self.mean) ** 2 for v in self.buf)
        self.replaced = 0
        self.err_mean = self.err_m2 = 0.0

    @property
    def var(self) -> float:
        return self.m2 / self.n if self.n else 0.0

    @property
    def std(self) -> float:
        return math.sqrt(self.var)

    def values(self) -> list[float]:
        """The values in the window, oldest first."""
        if self.window is None:
            raise ValueError("cumulative statistics keep no values")
        return self.buf[self.head :] + self.buf[: self.head]

    def to_dict(self) -> dict:
        return {
            "window": self.window,
            "buf": list(self.buf),
            "head": self.head,
            "n": self.n,
            "mean": self.mean,
            "m2": self.m2,
            "replaced": self.replaced,
            "err": [self.err_mean, self.err_m2],
        }

    @classmethod
    def from_dict(cls, d: dict) -> RollingStats:
        return cls(
            window=d["window"],
            buf=[float(v) for v in d["buf"]],
            head=int(d["head"]),
            n=int(d["n"]),
            mean=float(d["mean"]),
            m2=float(d["m2"]),
            replaced=int(d["replaced"]),
            err_mean=float(d["err"][0]),
            err_m2=float(d["err"][1]),
        )


@dataclass
class KSigmaThreshold:
    k: float = 2.0
    min_samples: int = 4
    std_floor: float = 1e-4
    stats: RollingStats = field(default_factory=RollingStats)
    #: add min(score, threshold) to the statistics once warmed up (winsorising), so the outliers
    #: the threshold is meant to find do not inflate the std that sets it
    clip: bool = False

    def __post_init__(self) -> None:
        if self.min_samples < 1:
            raise ValueError("min_samples must be >= 1")
        if self.stats.window is not None and self.min_samples > self.stats.window:
            raise ValueError(
                f"min_samples ({self.min_samples}) cannot exceed the window ({self.stats.window})"
            )
        if self.std_floor < 0:
            raise ValueError("std_floor must be >= 0")

    @property
    def ready(self) -> bool:
        return self.stats.n >= self.min_samples

    def value(self) -> float:
        """The current threshold: mean + k * max(std, std_floor), +inf during warm-up."""
        if not self.ready:
            return math.inf
        return self.stats.mean + self.k * max(self.stats.std, self.std_floor)

    def push(self, score: float) -> None:
        if self.clip and self.ready:
            score = min(score, self.value())
        self.stats.push(score)
