"""TieredStore: a chain of tiers (GPU -> CPU -> disk -> object store) with byte budgets and LRU.

- ``put`` stores a block in the fastest tier it fits in (the top one normally). When
  a tier goes over ``high_watermark`` x budget, its least recently used blocks are
  demoted to the next tier in the background (write-behind), one thread pool per
  boundary. A block being demoted stays readable where it was, and stays accounted
  there, until its copy below is complete.
- A tier's accounted bytes (resident blocks + reservations for blocks on their way
  in) never exceed its budget: space is reserved before a block is written. When the
  top tier is full, ``put`` waits for write-behind to make room (backpressure), so
  the memory the store holds is bounded by the budgets however long a stream runs.
  It gives up with :class:`BackpressureTimeout` after ``backpressure_timeout_s``, and
  with :class:`WriteBehindError` when the background writes it waits on fail.
- ``get`` returns the block from the fastest tier holding it and, when promotion is on,
  copies it into the top tier. Memory tiers hold a block exclusively (a promoted block
  leaves the CPU tier); persistent tiers keep their copy (nothing is rewritten when the
  block is demoted again).
- ``prefetch`` loads blocks into a fast tier in the background; ``get`` of a key being
  prefetched waits for it instead of reading twice.
- ``write_through=True`` writes every block to the last tier before ``put`` returns;
  ``sync`` makes chosen (or all) blocks durable at any time; ``flush`` waits for every
  background write; ``close`` flushes, then stops the threads.
- The last tier is unbounded (budget ``None``): a block demoted out of it would be lost.
  The store keeps no per-block state for it, so its own memory is bounded by the
  budgets of the other tiers, not by the length of the stream.

Locking: one condition variable guards all bookkeeping; no I/O happens under it. A key
being moved (put, demotion, promotion, deletion, sync) is "claimed", so at most one
move per key runs at a time; reads never claim (a read that races a move retries).
Waits only ever go downwards (tier i waits for room in tier i+1, the last tier never
waits), so the pools cannot deadlock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from typing import Any, cast

from .block import BlockSummary, KVBlock
from .errors import (
    BackpressureTimeout,
    BlockCorrupt,
    BlockNotFound,
    KVStoreError,
    StoreClosed,
    WriteBehindError,
)
from .keys import BlockKey
from .tier import ByteTier, Tier

log = logging.getLogger("streamvqa.kv")


@dataclass
class TierStats:
    hits: int = 0  # reads served by this tier
    puts: int = 0  # new blocks stored here by put()
    demoted_in: int = 0
    demoted_out: int = 0
    promoted_in: int = 0
    corrupt: int = 0  # reads that found corrupt bytes (the copy is dropped unless this is the last tier)


@dataclass
class _BoundaryErrors:
    count: int = 0
    messages: deque = field(default_factory=lambda: deque(maxlen=20))


class TieredStore:
    """Blocks in a chain of tiers, fastest first. Thread-safe."""

    def __init__(
        self,
        tiers: Sequence[tuple[Tier, int | None]],
        *,
        promote: bool = True,
        write_through: bool = False,
        high_watermark: float = 0.9,
        demote_workers: int | Sequence[int] = 2,
        fetch_workers: int = 4,
        backpressure_timeout_s: float = 120.0,
    ) -> None:
        if not tiers:
            raise ValueError("a store needs at least one tier")
        names = [tier.name for tier, _ in tiers]
        if len(set(names)) != len(names):
            raise ValueError(f"tier names must be unique, got {names}")
        budgets = [budget for _, budget in tiers]
        if budgets[-1] is not None:
            raise ValueError(
                "the last tier must be unbounded (budget None): blocks demoted out of it would be lost"
            )
        for name, budget in zip(names[:-1], budgets[:-1], strict=True):
            if isinstance(budget, bool) or not isinstance(budget, int) or budget <= 0:
                raise ValueError(f"tier {name!r} needs a positive byte budget, got {budget!r}")
        if not 0 < high_watermark <= 1:
            raise ValueError(f"high_watermark must be in (0, 1], got {high_watermark}")
        n = len(tiers)
        if isinstance(demote_workers, int):
            demote_workers = [demote_workers] * (n - 1)
        if len(demote_workers) != n - 1 or min(demote_workers, default=1) < 1:
            raise ValueError(f"need {n - 1} positive demote_workers counts, got {demote_workers}")
        self.tiers: list[Tier] = [tier for tier, _ in tiers]
        self.budgets: list[int | None] = budgets
        self.promote = promote
        self.write_through = write_through
        self.high_watermark = high_watermark
        self.backpressure_timeout_s = backpressure_timeout_s
        self._n = n
        self._cond = threading.Condition(threading.Lock())
        self._lru: list[OrderedDict[BlockKey, int]] = [OrderedDict() for _ in range(n - 1)]
        self._used = [0] * (n - 1)  # resident + reserved bytes per bounded tier
        self._peak = [0] * (n - 1)
        self._leaving = [0] * (n - 1)  # bytes with a demotion out of the tier in flight
        self._claimed: set[BlockKey] = set()
        self._durable: set[BlockKey] = set()  # tracked keys known to be in the last tier
        self._deletes = 0
        self._moves = 0  # bumped whenever a key's set of bounded tiers changes (readers retry on it)
        self._inflight = 0
        self._prefetching: dict[BlockKey, Future] = {}
        self._errors = [_BoundaryErrors() for _ in range(n - 1)]  # demotion failures, by source tier
        self._errors_reported = 0
        self._stats = [TierStats() for _ in range(n)]
        self._closing = False
        self._demoters = [
            ThreadPoolExecutor(max_workers=w, thread_name_prefix=f"kv-demote-{names[i]}")
            for i, w in enumerate(demote_workers)
        ]
        self._fetcher = ThreadPoolExecutor(max_workers=max(1, fetch_workers), thread_name_prefix="kv-fetch")
        # Resume what bounded persistent tiers already hold (a disk tier after a restart).
        with self._cond:
            for i in range(n - 1):
                for key, size in self.tiers[i].scan():
                    self._lru[i][key] = size
                    self._used[i] += size
                self._peak[i] = self._used[i]
                self._after_insert(i)

    # ------------------------------------------------------------------ public API
    def put(self, block: KVBlock) -> BlockKey:
        """Store ``block``; returns its key. Waits (backpressure) while the target tier is full."""
        self._check_open()
        key = block.key()
        self._claim(key)
        try:
            with self._cond:
                held = self._held(key)
                if held:  # content-addressed: the same block is already here
                    self._lru[held[0]].move_to_end(key)
                    return key
            last = self._n - 1
            target, item, size = self._fit(block, 0)
            if self.write_through and target != last:
                self.tiers[last].put(key, block)  # durable before put() returns
            if target == last:
                self.tiers[last].put(key, item)
            else:
                self._reserve(target, size)
                try:
                    self.tiers[target].put(key, item)
                except BaseException:
                    self._unreserve(target, size)
                    raise
                with self._cond:
                    self._lru[target][key] = size
                    self._moves += 1
                    if self.write_through:
                        self._durable.add(key)
                    self._after_insert(target)
                    self._cond.notify_all()
            with self._cond:
                self._stats[target].puts += 1
            return key
        finally:
            self._release(key)

    def get(self, key: BlockKey, *, promote: bool | None = None) -> KVBlock:
        """The block (verified) from the fastest tier holding it; promoted to the top tier when
        ``promote`` (default: the store's setting). Raises BlockNotFound / BlockCorrupt."""
        self._check_open()
        with self._cond:
            pending = self._prefetching.get(key)
        if pending is not None:
            wait_futures([pending])  # its outcome does not matter: read below either way
        promote = self.promote if promote is None else promote
        return self._fetch(key, 0 if promote else None)

    def get_many(self, keys: Sequence[BlockKey], *, promote: bool | None = None) -> list[KVBlock]:
        """Blocks of ``keys`` in order, fetched concurrently (raises the first error)."""
        self._check_open()
        promote = self.promote if promote is None else promote
        futures = [self._fetcher.submit(self._fetch, key, 0 if promote else None) for key in keys]
        return [future.result() for future in futures]

    def get_summary(self, key: BlockKey) -> BlockSummary:
        """Metadata and per-layer mean keys, without reading the block where a tier can avoid it.
        Neither promotes nor counts as a use for LRU."""
        self._check_open()
        return self._fetch(key, None, summary=True)

    def summaries(self, stream_id: str, model_id: str | None = None) -> list[BlockSummary]:
        """Summaries of every block of a stream (and model), in key order, fetched concurrently:
        how retrieval rebuilds its index of mean keys after a restart."""
        self._check_open()
        futures = [
            self._fetcher.submit(self._fetch, key, None, summary=True)
            for key in self.keys(stream_id, model_id)
        ]
        return [future.result() for future in futures]

    def prefetch(self, keys: Iterable[BlockKey], *, tier: int = 0) -> list[Future]:
        """Start loading ``keys`` into tier ``tier`` (default: the top one) in the background."""
        self._check_open()
        if not 0 <= tier < self._n:
            raise ValueError(f"no tier {tier}")
        futures = []
        for key in keys:
            with self._cond:
                held = self._held(key)
                future = self._prefetching.get(key)
                if future is None and held and held[0] <= tier:
                    future = Future()
                    future.set_result(None)
                if future is None:
                    # A failed prefetch is only a hint that did not work: its future says why.
                    future = self._submit(self._fetcher, None, self._prefetch_one, key, tier)
                    self._prefetching[key] = future
            futures.append(future)
        return futures

    def contains(self, key: BlockKey) -> bool:
        self._check_open()
        with self._cond:
            if self._held(key):
                return True
        return self.tiers[-1].contains(key)

    def where(self, key: BlockKey) -> list[str]:
        """Names of the tiers holding ``key`` (fastest first)."""
        with self._cond:
            held = self._held(key)
        names = [self.tiers[i].name for i in held]
        if self.tiers[-1].contains(key):
            names.append(self.tiers[-1].name)
        return names

    def delete(self, key: BlockKey) -> None:
        """Remove the block from every tier (waits for a move of it to finish first)."""
        self._check_open()
        self._claim(key)
        try:
            with self._cond:
                self._deletes += 1
                held = [(i, self._lru[i].pop(key)) for i in self._held(key)]
                self._moves += 1
                self._durable.discard(key)
            for i, size in held:
                self.tiers[i].delete(key)
                with self._cond:
                    self._used[i] -= size
                    self._cond.notify_all()
            self.tiers[-1].delete(key)
        finally:
            with self._cond:
                # Counted at both ends: a read that overlapped any part of the delete sees a change
                # and does not promote what it read (it would resurrect the block).
                self._deletes += 1
                self._claimed.discard(key)
                self._cond.notify_all()

    def delete_stream(self, stream_id: str, model_id: str | None = None) -> int:
        """Delete every block of a stream (and model) from every tier; returns how many."""
        keys = self.keys(stream_id, model_id)
        for key in keys:
            self.delete(key)
        return len(keys)

    def keys(self, stream_id: str | None = None, model_id: str | None = None) -> list[BlockKey]:
        """Every key held by any tier (of one stream, and model), sorted by stream, model, index."""
        self._check_open()
        found: set[BlockKey] = set()
        with self._cond:
            for lru in self._lru:
                found.update(
                    k
                    for k in lru
                    if (stream_id is None or k.stream_id == stream_id)
                    and (model_id is None or k.model_id == model_id)
                )
        found.update(self.tiers[-1].keys(stream_id, model_id))
        return sorted(found)

    def sync(self, keys: Iterable[BlockKey] | None = None) -> None:
        """Make blocks durable: copy each (all, by default) that is not yet in the last tier there.
        Blocks stay where they are. Raises WriteBehindError if a copy fails."""
        self._check_open()
        wanted = None if keys is None else set(keys)
        with self._cond:
            todo = [
                key
                for lru in self._lru
                for key in lru
                if key not in self._durable and (wanted is None or key in wanted)
            ]
        futures = [self._fetcher.submit(self._persist, key) for key in dict.fromkeys(todo)]
        failures = [f.exception() for f in futures if f.exception() is not None]
        if failures:
            raise WriteBehindError(
                f"{len(failures)} of {len(futures)} blocks could not be made durable: {failures[0]}"
            )

    def flush(self, timeout_s: float | None = None) -> None:
        """Wait until every background write (demotion, prefetch) has finished; raise
        WriteBehindError if any failed since the last flush, BackpressureTimeout if they have not
        finished within ``timeout_s`` (a tier stuck without failing)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._cond:
            while self._inflight:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise BackpressureTimeout(
                        f"{self._inflight} background operations still running after {timeout_s} s"
                    )
                self._cond.wait(remaining)
            total = sum(e.count for e in self._errors)
            if total > self._errors_reported:
                new = total - self._errors_reported
                self._errors_reported = total
                latest = [m for e in self._errors for m in e.messages][-3:]
                raise WriteBehindError(f"{new} background operations failed; latest: {latest}")

    def close(self, *, sync: bool = False, timeout_s: float | None = None) -> None:
        """Finish every pending write (and with ``sync``, make every block durable), then stop.
        Blocks left only in memory tiers are dropped; those on disk or in the object store stay.
        With ``timeout_s``, gives up waiting (BackpressureTimeout) and abandons what is still
        pending, like a crash would."""
        if self._closing:
            return
        drained = False
        try:
            if sync:
                self.sync()
            self.flush(timeout_s)
            drained = True
        finally:
            self._closing = True
            for pool in [*self._demoters, self._fetcher]:
                pool.shutdown(wait=drained, cancel_futures=not drained)
            for tier in self.tiers:
                tier.close()

    def __enter__(self) -> TieredStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def stats(self) -> dict:
        """Per tier: budget, accounted bytes (resident + reserved), resident bytes, peak, blocks,
        and counters; plus background work in flight and failures."""
        with self._cond:
            out: dict[str, Any] = {}
            for i, tier in enumerate(self.tiers):
                bounded = i < self._n - 1
                out[tier.name] = {
                    "budget": self.budgets[i],
                    "accounted": self._used[i] if bounded else None,
                    "resident": tier.nbytes,
                    "peak": self._peak[i] if bounded else None,
                    "blocks": len(self._lru[i]) if bounded else None,
                    **vars(self._stats[i]),
                }
            out["inflight"] = self._inflight
            out["failures"] = sum(e.count for e in self._errors)
            return out

    def accounted(self, tier: int) -> int:
        """Bytes accounted to bounded tier ``tier`` right now (never above its budget)."""
        with self._cond:
            return self._used[tier]

    def peak(self, tier: int) -> int:
        """Highest accounted bytes bounded tier ``tier`` ever reached."""
        with self._cond:
            return self._peak[tier]

    # ------------------------------------------------------------------ internals
    def _check_open(self) -> None:
        if self._closing:
            raise StoreClosed("the KV store is closed")

    def _held(self, key: BlockKey) -> list[int]:
        """Bounded tiers holding ``key``, fastest first (lock held)."""
        return [i for i in range(self._n - 1) if key in self._lru[i]]

    def _claim(self, key: BlockKey) -> None:
        with self._cond:
            while key in self._claimed:
                self._cond.wait()
            self._claimed.add(key)

    def _release(self, key: BlockKey) -> None:
        with self._cond:
            self._claimed.discard(key)
            self._cond.notify_all()

    def _fit(self, item, start: int):
        """The first tier at or after ``start`` the item fits in: (index, prepared item, bytes)."""
        for i in range(start, self._n):
            prepared = self.tiers[i].prepare(item)
            size = self.tiers[i].footprint(prepared)
            budget = self.budgets[i]
            if budget is None or size <= budget:
                return i, prepared, size
            item = prepared  # keep an encoding for the next byte tier
        raise AssertionError("the last tier is unbounded")

    def _reserve(self, i: int, size: int, *, wait_forever: bool = False) -> None:
        """Account ``size`` bytes to tier ``i``, waiting for write-behind to make room: at most
        ``backpressure_timeout_s`` for callers; background demotions wait until room is made or a
        demotion they depend on fails (so a slow tier delays them, it does not fail them)."""
        budget = self.budgets[i]
        assert budget is not None and size <= budget
        deadline = float("inf") if wait_forever else time.monotonic() + self.backpressure_timeout_s
        with self._cond:
            failures_before = sum(e.count for e in self._errors[i:])
            while self._used[i] + size > budget:
                self._schedule_demotions(i, self._used[i] + size - budget)
                failures = sum(e.count for e in self._errors[i:])
                if failures != failures_before:
                    latest = [m for e in self._errors[i:] for m in e.messages][-1:]
                    raise WriteBehindError(
                        f"tier {self.tiers[i].name!r} is full and demoting out of it failed: {latest}"
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise BackpressureTimeout(
                        f"tier {self.tiers[i].name!r} stayed full ({self._used[i]} of {budget} bytes) for "
                        f"{self.backpressure_timeout_s} s"
                    )
                self._cond.wait(min(remaining, 1.0))
            self._used[i] += size
            self._peak[i] = max(self._peak[i], self._used[i])

    def _unreserve(self, i: int, size: int) -> None:
        with self._cond:
            self._used[i] -= size
            self._cond.notify_all()

    def _after_insert(self, i: int) -> None:
        """Start write-behind when tier ``i`` is above its watermark (lock held)."""
        budget = self.budgets[i]
        if budget is not None:
            threshold = self.high_watermark * budget
            if self._used[i] > threshold:
                self._schedule_demotions(i, int(self._used[i] - threshold) + 1)

    def _schedule_demotions(self, i: int, need: int) -> None:
        """Demote least recently used blocks of tier ``i`` until ``need`` bytes are leaving (lock held)."""
        if self._leaving[i] >= need:
            return
        for key, size in self._lru[i].items():
            if self._leaving[i] >= need:
                break
            if key in self._claimed:
                continue
            self._claimed.add(key)
            self._leaving[i] += size
            self._submit(self._demoters[i], i, self._demote, key, i, size)

    def _submit(self, pool: ThreadPoolExecutor, boundary: int | None, fn, *args) -> Future:
        """Run ``fn`` in ``pool`` as background work, counted for flush (lock held). Failures of
        demotions (``boundary`` = the tier they leave) are recorded for flush and backpressure."""

        def run():
            try:
                return fn(*args)
            except BaseException as err:
                if boundary is not None:
                    self._record_failure(boundary, fn.__name__, args[0], err)
                else:
                    log.warning("KV store: %s %s failed: %s", fn.__name__.strip("_"), args[0], err)
                raise
            finally:
                with self._cond:
                    self._inflight -= 1
                    self._cond.notify_all()

        self._inflight += 1
        try:
            return pool.submit(run)
        except BaseException:
            self._inflight -= 1
            raise

    def _record_failure(self, boundary: int, what: str, key, err: BaseException) -> None:
        message = f"{what.strip('_')} {key}: {type(err).__name__}: {err}"
        log.error("KV store: %s", message)
        with self._cond:
            errors = self._errors[boundary]
            errors.count += 1
            errors.messages.append(message)
            self._cond.notify_all()

    def _demote(self, key: BlockKey, i: int, size: int) -> None:
        """Move ``key`` from tier ``i`` to the next tier that takes it (claimed by the scheduler)."""
        source = self.tiers[i]
        done = False
        try:
            try:
                block = None
                for j in range(i + 1, self._n):
                    with self._cond:
                        already = (j < self._n - 1 and key in self._lru[j]) or (
                            j == self._n - 1 and key in self._durable
                        )
                    if already:
                        break
                    if block is None:
                        both_bytes = isinstance(source, ByteTier) and isinstance(self.tiers[j], ByteTier)
                        block = source.get_encoded(key) if both_bytes else source.get(key)
                    item = self.tiers[j].prepare(block)
                    dsize = self.tiers[j].footprint(item)
                    budget = self.budgets[j]
                    if budget is not None and dsize > budget:
                        block = item
                        continue  # too big for that tier: try the next one
                    if j < self._n - 1:
                        self._reserve(j, dsize, wait_forever=True)
                    try:
                        self.tiers[j].put(key, item)
                    except BaseException:
                        if j < self._n - 1:
                            self._unreserve(j, dsize)
                        raise
                    break
            except (BlockCorrupt, BlockNotFound) as err:  # nothing valid to move: forget this copy
                self._drop_corrupt(key, i, size, err)
                done = True
                raise
            with self._cond:
                if j < self._n - 1:
                    if already:
                        self._lru[j].move_to_end(key)
                    else:
                        self._lru[j][key] = dsize
                    self._stats[j].demoted_in += not already
                elif not already:
                    self._stats[j].demoted_in += 1
                self._lru[i].pop(key, None)
                self._moves += 1
                self._stats[i].demoted_out += 1
                if j == self._n - 1 or not self._held(key):
                    self._durable.discard(key)  # untracked from here on
            source.delete(key)
            with self._cond:
                self._used[i] -= size
                self._leaving[i] -= size
                self._claimed.discard(key)
                done = True
                if j < self._n - 1:
                    self._after_insert(j)
                self._cond.notify_all()
        finally:
            if not done:  # failed: the block stays where it was, a later demotion retries
                with self._cond:
                    self._leaving[i] -= size
                    self._claimed.discard(key)
                    self._cond.notify_all()

    def _drop_corrupt(self, key: BlockKey, i: int, size: int, err: KVStoreError) -> None:
        """Forget a corrupt (or vanished) copy in bounded tier ``i``; the caller claimed the key and
        counted ``size`` as leaving."""
        log.error("KV store: dropping unreadable copy of %s in tier %s: %s", key, self.tiers[i].name, err)
        with self._cond:
            self._lru[i].pop(key, None)
            self._moves += 1
            self._stats[i].corrupt += 1
            if not self._held(key):
                self._durable.discard(key)
        try:
            self.tiers[i].delete(key)
        finally:
            with self._cond:
                self._used[i] -= size
                self._leaving[i] -= size
                self._claimed.discard(key)
                self._cond.notify_all()

    def _fetch(self, key: BlockKey, promote_to: int | None, *, summary: bool = False):
        """Read from the fastest tier holding ``key``, falling back past corrupt copies. A pass that
        finds nothing while blocks were moving is repeated: the block may have moved under it."""
        corrupt: dict[int, BlockCorrupt] = {}
        last = self._n - 1
        for _ in range(64):
            with self._cond:
                held = self._held(key)
                deletes_seen = self._deletes
                moves_seen = self._moves
            for j in [*held, last]:
                if j in corrupt:
                    continue
                tier = self.tiers[j]
                try:
                    value = tier.get_summary(key) if summary else tier.get(key)
                except BlockNotFound:
                    continue
                except BlockCorrupt as err:
                    corrupt[j] = err
                    self._on_corrupt_read(key, j, err)
                    continue
                if summary:
                    return value
                with self._cond:
                    if j < last and key in self._lru[j]:
                        self._lru[j].move_to_end(key)
                    self._stats[j].hits += 1
                if promote_to is not None and j > promote_to:
                    value = self._install(
                        key, cast(KVBlock, value), j, promote_to, deletes_seen
                    )  # not a summary
                return value
            with self._cond:
                if self._moves == moves_seen:
                    break  # nothing moved while we looked: it is not there
        if corrupt:
            raise next(iter(corrupt.values()))
        raise BlockNotFound(f"no tier holds {key}")

    def _on_corrupt_read(self, key: BlockKey, j: int, err: BlockCorrupt) -> None:
        log.error("KV store: corrupt copy of %s in tier %s: %s", key, self.tiers[j].name, err)
        with self._cond:
            if j == self._n - 1 or key not in self._lru[j] or key in self._claimed:
                self._stats[j].corrupt += 1
                return  # the last tier's copy is left as evidence; a busy key is left alone
            size = self._lru[j].pop(key)
            self._moves += 1
            self._claimed.add(key)
            self._leaving[j] += size  # _drop_corrupt takes it back off
        self._drop_corrupt(key, j, size, err)

    def _install(self, key: BlockKey, block: KVBlock, source: int, target: int, deletes_seen: int) -> KVBlock:
        """Copy a block just read from tier ``source`` into faster tier ``target`` (a promotion).
        Returns the block as held there, or the block as read when the promotion did not happen."""
        tier = self.tiers[target]
        item = tier.prepare(block)
        size = tier.footprint(item)
        budget = self.budgets[target]
        if budget is not None and size > budget:
            return block
        with self._cond:
            held = self._held(key)
            if held and held[0] <= target:
                return block
        try:
            self._reserve(target, size)  # holding nothing: cannot deadlock with demotions
        except KVStoreError as err:
            log.warning("KV store: not promoting %s: %s", key, err)
            return block
        with self._cond:
            held = self._held(key)
            deleted = self._deletes != deletes_seen and not held
            if key in self._claimed or deleted or (held and held[0] <= target):
                self._used[target] -= size
                self._cond.notify_all()
                return block
            self._claimed.add(key)
        try:
            tier.put(key, item)
        except BaseException:
            self._unreserve(target, size)
            self._release(key)
            raise
        with self._cond:
            self._lru[target][key] = size
            self._moves += 1
            self._stats[target].promoted_in += 1
            if source == self._n - 1:
                self._durable.add(key)
            # Memory tiers hold a block exclusively; persistent tiers keep their copy.
            dropped = [
                (j, self._lru[j].pop(key))
                for j in self._held(key)
                if j != target and not self.tiers[j].persistent
            ]
        for j, dsize in dropped:
            self.tiers[j].delete(key)
            with self._cond:
                self._used[j] -= dsize
        with self._cond:
            self._claimed.discard(key)
            self._after_insert(target)
            self._cond.notify_all()
        return item if isinstance(item, KVBlock) else block

    def _prefetch_one(self, key: BlockKey, target: int) -> None:
        try:
            self._fetch(key, target)
        finally:
            with self._cond:
                self._prefetching.pop(key, None)

    def _persist(self, key: BlockKey) -> None:
        """Copy a tracked block into the last tier (for sync)."""
        self._claim(key)
        try:
            with self._cond:
                held = self._held(key)
                if not held or key in self._durable:
                    return  # deleted, or demoted into the last tier meanwhile
            source = self.tiers[held[0]]
            last = self.tiers[-1]
            both_bytes = isinstance(source, ByteTier) and isinstance(last, ByteTier)
            last.put(key, source.get_encoded(key) if both_bytes else source.get(key))
            with self._cond:
                if self._held(key):
                    self._durable.add(key)
        finally:
            self._release(key)


def standard_store(
    *,
    gpu_bytes: int,
    cpu_bytes: int,
    disk_dir=None,
    disk_bytes: int | None = None,
    object_store=None,
    fsync: bool = False,
    **options,
) -> TieredStore:
    """The usual chain: gpu -> cpu [-> disk] [-> object store]. The last tier present is
    unbounded (``disk_bytes`` applies only when an object store follows the disk)."""
    from .disk_tier import DiskTier
    from .memory_tier import cpu_tier, gpu_tier
    from .object_tier import ObjectTier

    chain: list[tuple[Tier, int | None]] = [(gpu_tier(), gpu_bytes), (cpu_tier(), cpu_bytes)]
    if disk_dir is not None:
        if object_store is not None and disk_bytes is None:
            raise ValueError("a disk tier followed by an object store needs disk_bytes")
        chain.append((DiskTier(disk_dir, fsync=fsync), disk_bytes if object_store is not None else None))
    if object_store is not None:
        chain.append((ObjectTier(object_store), None))
    if len(chain) == 2:
        chain[-1] = (chain[-1][0], None)  # gpu -> cpu only: the cpu tier is the unbounded last one
    return TieredStore(chain, **options)
