"""Calls into an in-process model with a deadline and bounded retries.

A model call in a stage can fail (an out-of-memory, a driver error, a bug on one odd input) or
hang (a wedged device, a pathological input). :class:`ModelGuard` runs each call in a worker
thread and waits for it at most ``timeout_s``; a call that raises or overruns is retried after a
backoff, up to ``attempts`` times, each retry preceded by the caller's ``rollback`` (which undoes
whatever the failed call may have changed: the STC cache of the stream, for instance). When the
attempts run out it raises :class:`ModelCallFailed`, a :class:`~streamvqa.schemas.SchemaError`
with the reason ``model_failed``: the exactly-once task dead-letters the record with that reason
and goes on with the next one, so other records and other streams are not held up.

A call that overran is abandoned, not killed (Python cannot stop a thread): it keeps the model
until it returns. Calls on one model are serialised (one lock), so a retry never runs beside an
abandoned call; it waits for the lock within its own deadline. If the lock does not come back
the model is wedged: :class:`ModelWedged` fails the run, and the record is counted against (the
exactly-once task dead-letters it as ``processing_failed`` after a few runs, each of which starts
with fresh models). Errors of the infrastructure (object store, broker, network: see
:func:`~streamvqa.operators.io.exactly_once.is_outage`) are never retried here: they go up as
they are, and the run is run again without counting them against the record.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any

from streamvqa.schemas import SchemaError

log = logging.getLogger("streamvqa.model")


@dataclass(frozen=True)
class CallPolicy:
    """``timeout_s``: the deadline of one attempt; ``attempts``: tries per call (>= 1);
    ``backoff_s``: the wait before the first retry, doubled for each further one."""

    timeout_s: float = 60.0
    attempts: int = 3
    backoff_s: float = 0.2

    def __post_init__(self) -> None:
        if self.timeout_s <= 0 or self.attempts < 1 or self.backoff_s < 0:
            raise ValueError(f"invalid call policy {self}")


class ModelCallFailed(SchemaError):
    """The model failed on this input in every attempt: the record is dead-lettered."""

    reason = "model_failed"


class ModelWedged(RuntimeError):
    """A call overran its deadline and never gave the model back: the run must start afresh."""


class ModelGuard:
    """Deadline, retries and serialisation for the calls into one model (``name`` is for the
    messages). ``call(fn, rollback=...)`` returns ``fn()``'s result or raises as described in
    the module docstring."""

    def __init__(
        self,
        name: str,
        policy: CallPolicy | None = None,
        is_outage: Callable[[BaseException], bool] | None = None,
    ) -> None:
        if is_outage is None:
            from streamvqa.operators.io.exactly_once import is_outage as default_is_outage

            is_outage = default_is_outage
        self.name, self.policy, self.is_outage = name, policy or CallPolicy(), is_outage
        self._lock = threading.Lock()
        self._worker: _Worker | None = None
        self.failures = 0  # attempts that raised or overran, over the guard's life
        self.abandoned = 0  # attempts that overran

    def _start(self, *args) -> Future:
        """``_attempt(*args)`` on the guard's worker thread (a daemon: an abandoned call must not
        keep the process from exiting). One long-lived worker, not a thread per call: the
        allocator keeps per-thread arenas, and a new thread for every call made the pipeline's
        memory creep. A worker whose call overran is retired (it ends after that call) and the
        next attempt gets a new one."""
        if self._worker is None:
            self._worker = _Worker(f"model-{self.name}")
        return self._worker.submit(lambda: self._attempt(*args))

    def _retire_worker(self) -> None:
        assert self._worker is not None  # retired only after _start gave it a call
        self._worker.retire()
        self._worker = None

    def call(
        self, fn: Callable[[], Any], *, rollback: Callable[[], None] | None = None, what: str = ""
    ) -> Any:
        """``fn()`` under the policy; ``rollback()`` runs (holding the model) before each retry;
        ``what`` names the input in the messages (e.g. ``frame 12 of cam-1``)."""
        policy = self.policy
        errors: list[str] = []
        label = f"{self.name}{f' on {what}' if what else ''}"
        for attempt in range(1, policy.attempts + 1):
            if attempt > 1:
                time.sleep(policy.backoff_s * 2 ** (attempt - 2))
            got_model, given_up = threading.Event(), threading.Event()
            future = self._start(fn, rollback if attempt > 1 else None, got_model, given_up)
            deadline = time.monotonic() + policy.timeout_s
            if not got_model.wait(policy.timeout_s):
                given_up.set()  # if the model comes back later, this attempt does not run
                self._retire_worker()
                raise ModelWedged(
                    f"{label}: an abandoned call has held the model for more than {policy.timeout_s:g} s "
                    f"({'; '.join(errors)})"
                )
            try:
                return future.result(timeout=max(0.0, deadline - time.monotonic()))
            except FutureTimeout:
                self.abandoned += 1
                self._retire_worker()  # busy with the overrun call: later attempts need another
                errors.append(f"attempt {attempt}: no result within {policy.timeout_s:g} s")
            except SchemaError:
                raise  # the input is bad, not the model: retrying cannot help
            except Exception as err:
                if self.is_outage(err):
                    raise
                errors.append(f"attempt {attempt}: {type(err).__name__}: {err}"[:300])
            self.failures += 1
            log.warning(
                "%s failed (%s)%s",
                label,
                errors[-1],
                f"; retry {attempt}/{policy.attempts - 1}" if attempt < policy.attempts else "; giving up",
            )
        # the last attempt may still hold the model: the next input must find it free
        if not self._lock.acquire(timeout=policy.timeout_s):
            raise ModelWedged(f"{label}: the last abandoned call still holds the model ({'; '.join(errors)})")
        self._lock.release()
        raise ModelCallFailed(f"{label} failed {policy.attempts} times: {'; '.join(errors)}")

    def _attempt(self, fn, rollback, got_model: threading.Event, given_up: threading.Event):
        if not self._lock.acquire(timeout=self.policy.timeout_s):
            return None  # the caller has given up (ModelWedged)
        try:
            if given_up.is_set():
                return None
            got_model.set()
            if rollback is not None:
                rollback()
            return fn()
        finally:
            self._lock.release()


class _Worker:
    """A daemon thread running submitted calls one after another."""

    def __init__(self, name: str) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._run, name=name, daemon=True).start()

    def submit(self, fn: Callable[[], Any]) -> Future:
        future: Future = Future()
        self._queue.put((fn, future))
        return future

    def retire(self) -> None:
        """End after the calls already submitted."""
        self._queue.put(None)

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            fn, future = item
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as err:  # handed to the caller
                    future.set_exception(err)
