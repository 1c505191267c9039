"""Beam adapter: a keyed stateful DoFn running one :class:`CurveStream` state per stream id.

    decisions = (
        keyed_frames                                  # PCollection[(stream_id, FrameInput)]
        | beam.ParDo(CurveStreamDoFn(config))
        .with_outputs(CurveStreamDoFn.MEMORY, CurveStreamDoFn.ERRORS, main="decisions")
    )
    decisions.decisions   # (stream_id, Decision) per routed frame
    decisions.memory      # (stream_id, MemoryEvent): admit / downgrade / evict / merge
    decisions.errors      # (stream_id, seq, reason): frames refused (bad feature, foreign state)

The state of each stream is the operator's own blob (``CurveStreamState.to_bytes``)
in a ``ReadModifyWriteState``: read, step, write, per element. No timers (they
are not reliable on FnApiRunner) and no fusion break. Elements of one stream
must arrive in ``seq`` order (Kafka keeps a stream's frames ordered in its
partition); late or re-delivered frames are skipped by the operator and counted
in the ``curvestream/skipped`` metric, so a replay after a restart is idempotent.

The decoded state of the streams this worker saw last is cached (keyed by
stream id, validated by comparing the stored bytes), so the common case skips
decoding; the blob is still written after every element. With ``keep_tokens``
the state also holds every resident frame's tokens (budget x D x 4 bytes): set it
only for small budgets; by default the DoFn routes and accounts (index mode)
and downstream stages fetch tokens by (stream, seq).
"""

from __future__ import annotations

from collections import OrderedDict

import apache_beam as beam
from apache_beam.coders import BytesCoder
from apache_beam.metrics import Metrics
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec

from .operator import CurveStream, CurveStreamConfig, CurveStreamState
from .records import FrameInput


class CurveStreamDoFn(beam.DoFn):
    MEMORY = "memory"
    ERRORS = "errors"
    STATE = ReadModifyWriteStateSpec("curvestream", BytesCoder())

    def __init__(self, config: CurveStreamConfig | None = None, cache_streams: int = 1024) -> None:
        self.config = config or CurveStreamConfig()
        self.cache_streams = cache_streams

    def setup(self) -> None:
        self.op = CurveStream(self.config)
        self._cache: OrderedDict[str, tuple[bytes, CurveStreamState]] = OrderedDict()
        self._frames = Metrics.counter("curvestream", "frames")
        self._clear = Metrics.counter("curvestream", "clear")
        self._skipped = Metrics.counter("curvestream", "skipped")
        self._errors = Metrics.counter("curvestream", "errors")
        self._evicted = Metrics.counter("curvestream", "evicted")
        self._memory_tokens = Metrics.distribution("curvestream", "memory_tokens")

    def _load(self, stream_id: str, blob: bytes | None) -> CurveStreamState:
        if not blob:
            return self.op.init_state()
        hit = self._cache.get(stream_id)
        if hit is not None and hit[0] == blob:
            return hit[1]
        return self.op.restore(blob)

    def process(self, element: tuple[str, FrameInput], state=beam.DoFn.StateParam(STATE)):
        stream_id, frame = element
        stored = state.read()
        try:
            st = self._load(stream_id, stored)
            out = self.op.step(st, frame)
        except (ValueError, TypeError) as exc:
            # A malformed frame (wrong feature size, NaN, bad tokens) or a state written under
            # another config: the stored state stays as it was, the frame goes to ``errors``.
            self._cache.pop(stream_id, None)
            self._errors.inc()
            yield beam.pvalue.TaggedOutput(self.ERRORS, (stream_id, getattr(frame, "seq", None), repr(exc)))
            return
        blob = st.to_bytes()
        state.write(blob)
        self._cache[stream_id] = (blob, st)
        self._cache.move_to_end(stream_id)
        while len(self._cache) > self.cache_streams:
            self._cache.popitem(last=False)
        if out.decision is None:
            self._skipped.inc()
            return
        self._frames.inc()
        if out.decision.tier == "clear":
            self._clear.inc()
        self._memory_tokens.update(out.decision.memory_tokens)
        yield stream_id, out.decision
        for event in out.events:
            if event.kind == "evict":
                self._evicted.inc()
            yield beam.pvalue.TaggedOutput(self.MEMORY, (stream_id, event))


class RouteFrames(beam.PTransform):
    """``(stream_id, FrameInput)`` -> tagged outputs ``decisions``, ``memory`` and ``errors``."""

    def __init__(self, config: CurveStreamConfig | None = None) -> None:
        super().__init__()
        self.config = config

    def expand(self, frames):
        return frames | "CurveStream" >> beam.ParDo(CurveStreamDoFn(self.config)).with_outputs(
            CurveStreamDoFn.MEMORY, CurveStreamDoFn.ERRORS, main="decisions"
        )
