"""Beam RunInference model handlers for the model stages: in-process or on a Serve cluster.

    handler = handler_from_settings("lm", lm_config, client)   # local or remote, by configuration
    results = requests | RunInference(handler)                  # PredictionResult(example, inference)

Elements are :class:`FrameBatch` (encoder) and :class:`LMRequest` (language model); the
inference is the stage's result dict. Both handlers run the same :mod:`.stages` code, so the
pipeline gives the same outputs with models in-process (:class:`LocalEncoderHandler`,
:class:`LocalLMHandler`: the embedded default) or on Serve (:class:`RemoteEncoderHandler`,
:class:`RemoteLMHandler`).

Remote calls go through a Serve deployment handle with the stream id as multiplexed model id
(cache affinity). A call that fails because a replica died or was unavailable is retried
(bounded, exponential backoff); when the attempts run out it raises :class:`RemoteStageError`
naming the query or stream: an element is never dropped silently. Errors of the stage itself
(:class:`~.stages.StageError`: stream not open, bad input) are not retried.

Within one ``run_inference`` batch, calls of one stream go in order (one at a time) and calls of
different streams run concurrently.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from apache_beam.ml.inference.base import ModelHandler, PredictionResult
from pydantic import BaseModel, Field

from .stages import EncoderStage, EncoderStageConfig, LMStage, LMStageConfig, StageError

log = logging.getLogger("streamvqa.serve")


class ServeClientSettings(BaseModel):
    """Where the model stages run (``mode``) and how remote calls behave.

    ``address``: the Ray cluster's GCS address (``host:port``); None: the local cluster of
    ``streamvqa serve up`` under ``data_dir``.
    """

    mode: Literal["local", "remote"] = "local"
    address: str | None = None
    data_dir: str | None = None
    encoder_app: str = "streamvqa-encoder"
    lm_app: str = "streamvqa-lm"
    attempts: int = Field(default=4, ge=1)
    backoff_s: float = Field(default=0.5, ge=0)
    max_backoff_s: float = Field(default=8.0, ge=0)
    call_timeout_s: float = Field(default=120.0, gt=0)


class RemoteStageError(RuntimeError):
    """A remote stage call that failed after its retries (names the query or stream)."""


@dataclass(frozen=True)
class FrameBatch:
    """Consecutive frames of one stream: ``(B, H, W, 3)`` uint8; ``frame_index``: of the first."""

    stream_id: str
    frames: np.ndarray
    frame_index: int | None = None


@dataclass(frozen=True)
class LMRequest:
    """One call of the LM stage: ``open``, ``prefill`` (text or tokens) or ``answer``."""

    kind: Literal["open", "prefill", "answer"]
    stream_id: str
    query_id: str | None = None
    seq: int | None = None
    start_us: int = 0
    end_us: int = 0
    text: str | None = None
    tokens: Sequence[int] | None = None
    question: Any = None  # text or token ids
    system_prompt: Any = None
    after_seq: int | None = None
    max_new_tokens: int | None = None
    reset: bool = False  # open: start an open stream over

    @property
    def label(self) -> str:
        return (
            f"query {self.query_id!r} of stream {self.stream_id!r}"
            if self.query_id
            else f"stream {self.stream_id!r}"
        )


def _waves(items: Sequence, stream_of: Callable[[Any], str]) -> list[list[int]]:
    """Indices in waves: the k-th item of every stream in wave k (a stream's items stay in order)."""
    per_stream: OrderedDict[str, list[int]] = OrderedDict()
    for i, item in enumerate(items):
        per_stream.setdefault(stream_of(item), []).append(i)
    depth = max((len(v) for v in per_stream.values()), default=0)
    return [[v[k] for v in per_stream.values() if k < len(v)] for k in range(depth)]


def call_lm_stage(stage: LMStage, req: LMRequest) -> dict:
    """One :class:`LMRequest` on an in-process stage."""
    if req.kind == "open":
        return stage.open(req.stream_id, req.system_prompt, req.start_us, reset=req.reset)
    if req.kind == "prefill":
        return stage.prefill(
            req.stream_id, req.seq, req.start_us, req.end_us, text=req.text, tokens=req.tokens
        )
    if req.kind == "answer":
        return stage.answer(
            req.stream_id,
            req.query_id or "",
            req.question,
            after_seq=req.after_seq,
            max_new_tokens=req.max_new_tokens,
        )
    raise StageError(f"unknown LM request kind {req.kind!r}")


# ------------------------------------------------------------------------------ in-process
class LocalEncoderHandler(ModelHandler[FrameBatch, PredictionResult, EncoderStage]):
    """The encoder stage in the Beam worker process."""

    def __init__(self, config: EncoderStageConfig) -> None:
        super().__init__()
        self.config = config

    def load_model(self) -> EncoderStage:
        return EncoderStage(self.config)

    def run_inference(
        self, batch: Sequence[FrameBatch], model: EncoderStage, inference_args: dict | None = None
    ) -> Iterable[PredictionResult]:
        out = model.encode_many([(e.stream_id, e.frames, e.frame_index) for e in batch])
        return [PredictionResult(e, r) for e, r in zip(batch, out, strict=True)]

    def share_model_across_processes(self) -> bool:
        return False


class LocalLMHandler(ModelHandler[LMRequest, PredictionResult, LMStage]):
    """The LM stage in the Beam worker process."""

    def __init__(self, config: LMStageConfig) -> None:
        super().__init__()
        self.config = config

    def load_model(self) -> LMStage:
        return LMStage(self.config)

    def run_inference(
        self, batch: Sequence[LMRequest], model: LMStage, inference_args: dict | None = None
    ) -> Iterable[PredictionResult]:
        return [PredictionResult(req, call_lm_stage(model, req)) for req in batch]


# ---------------------------------------------------------------------------------- remote
def _retryable() -> tuple[type[BaseException], ...]:
    import ray.exceptions as rex
    from ray.serve import exceptions as sex

    names = ("RayActorError", "ActorDiedError", "ActorUnavailableError", "GetTimeoutError", "ObjectLostError")
    kinds: list[type[BaseException]] = [getattr(rex, n) for n in names if hasattr(rex, n)]
    for n in ("BackPressureError", "DeploymentUnavailableError", "ReplicaUnavailableError"):
        if hasattr(sex, n):
            kinds.append(getattr(sex, n))
    kinds.append(TimeoutError)
    return tuple(kinds)


class ServeClient:
    """Calls into a Serve application with stream affinity and bounded retries."""

    def __init__(self, settings: ServeClientSettings, app: str) -> None:
        from ray import serve

        from . import local

        self.settings = settings
        self.app = app
        if settings.address is not None:
            local.connect(address=settings.address)
        else:
            from pathlib import Path

            local.connect(Path(settings.data_dir or ".data"))
        self.handle = serve.get_app_handle(app)
        self.retryable = _retryable()
        info = self._call("info", None, f"app {app!r}", (), {}, timeout_s=max(60.0, settings.call_timeout_s))
        self.stateful = bool(info.get("stateful", True))

    def submit(self, method: str, stream_id: str | None, args: tuple, kwargs: dict):
        handle = self.handle
        if stream_id is not None and getattr(self, "stateful", True):
            handle = handle.options(multiplexed_model_id=stream_id)
        return getattr(handle, method).remote(*args, **kwargs)

    def _call(
        self,
        method: str,
        stream_id: str | None,
        label: str,
        args: tuple,
        kwargs: dict,
        response=None,
        timeout_s: float | None = None,
    ):
        s = self.settings
        last: BaseException | None = None
        for attempt in range(s.attempts):
            try:
                if response is None:
                    response = self.submit(method, stream_id, args, kwargs)
                return response.result(timeout_s=timeout_s or s.call_timeout_s)
            except StageError:
                raise  # the stage refused the call (stream not open, bad input): retrying cannot help
            except self.retryable as err:
                last, response = err, None
                if attempt + 1 < s.attempts:
                    delay = min(s.max_backoff_s, s.backoff_s * 2**attempt)
                    log.warning(
                        "%s.%s for %s failed (%s), retry %d/%d in %.1f s",
                        self.app,
                        method,
                        label,
                        type(err).__name__,
                        attempt + 1,
                        s.attempts - 1,
                        delay,
                    )
                    time.sleep(delay)
            except Exception as err:  # the model raised: not retried, named
                cause = getattr(err, "cause", None) or err
                raise RemoteStageError(
                    f"{self.app}.{method} for {label} failed (not retried): {type(cause).__name__}: {cause}"
                ) from err
        raise RemoteStageError(
            f"{self.app}.{method} for {label} failed after {s.attempts} attempts: {type(last).__name__}: {last}"
        ) from last

    def call_all(self, calls: Sequence[tuple[str, str | None, str, tuple, dict]]) -> list:
        """Submit calls concurrently, then collect them (each retried on its own)."""
        responses = []
        for method, stream_id, _, args, kwargs in calls:
            try:
                responses.append(self.submit(method, stream_id, args, kwargs))
            except self.retryable:
                responses.append(None)
        return [
            self._call(method, stream_id, label, args, kwargs, response=resp)
            for (method, stream_id, label, args, kwargs), resp in zip(calls, responses, strict=True)
        ]


class RemoteEncoderHandler(ModelHandler[FrameBatch, PredictionResult, ServeClient]):
    """The encoder stage on Serve (deployment handle, stream affinity, retries)."""

    def __init__(self, settings: ServeClientSettings | None = None) -> None:
        super().__init__()
        self.settings = settings or ServeClientSettings(mode="remote")

    def load_model(self) -> ServeClient:
        return ServeClient(self.settings, self.settings.encoder_app)

    def run_inference(
        self, batch: Sequence[FrameBatch], model: ServeClient, inference_args: dict | None = None
    ) -> Iterable[PredictionResult]:
        out: list[Any] = [None] * len(batch)
        for wave in _waves(batch, lambda e: e.stream_id):
            calls: list[tuple[str, str | None, str, tuple, dict]] = [
                (
                    "encode",
                    batch[i].stream_id,
                    f"stream {batch[i].stream_id!r}",
                    (batch[i].stream_id, batch[i].frames, batch[i].frame_index),
                    {},
                )
                for i in wave
            ]
            for i, result in zip(wave, model.call_all(calls), strict=True):
                out[i] = result
        return [PredictionResult(e, r) for e, r in zip(batch, out, strict=True)]


class RemoteLMHandler(ModelHandler[LMRequest, PredictionResult, ServeClient]):
    """The LM stage on Serve (deployment handle, stream affinity, retries)."""

    def __init__(self, settings: ServeClientSettings | None = None) -> None:
        super().__init__()
        self.settings = settings or ServeClientSettings(mode="remote")

    def load_model(self) -> ServeClient:
        return ServeClient(self.settings, self.settings.lm_app)

    @staticmethod
    def call_of(req: LMRequest) -> tuple[str, str, str, tuple, dict]:
        args: tuple
        if req.kind == "open":
            args = (req.stream_id, req.system_prompt, req.start_us)
            return ("open", req.stream_id, req.label, args, {"reset": req.reset})
        if req.kind == "prefill":
            args = (req.stream_id, req.seq, req.start_us, req.end_us)
            return ("prefill", req.stream_id, req.label, args, {"text": req.text, "tokens": req.tokens})
        if req.kind == "answer":
            kwargs = {"after_seq": req.after_seq, "max_new_tokens": req.max_new_tokens}
            return (
                "answer",
                req.stream_id,
                req.label,
                (req.stream_id, req.query_id or "", req.question),
                kwargs,
            )
        raise StageError(f"unknown LM request kind {req.kind!r}")

    def run_inference(
        self, batch: Sequence[LMRequest], model: ServeClient, inference_args: dict | None = None
    ) -> Iterable[PredictionResult]:
        out: list[Any] = [None] * len(batch)
        for wave in _waves(batch, lambda r: r.stream_id):
            for i, result in zip(wave, model.call_all([self.call_of(batch[i]) for i in wave]), strict=True):
                out[i] = result
        return [PredictionResult(r, o) for r, o in zip(batch, out, strict=True)]


def client_settings(settings=None) -> ServeClientSettings:
    """``ServeClientSettings`` from itself, from a mapping, or from a streamvqa ``Settings`` (its
    ``serve`` section when it has one, and its data dir); None: the defaults (in-process)."""
    if settings is None:
        return ServeClientSettings()
    if isinstance(settings, ServeClientSettings):
        return settings
    if isinstance(settings, dict):
        return ServeClientSettings.model_validate(settings)
    section: Any = getattr(settings, "serve", None)
    values = section.model_dump() if hasattr(section, "model_dump") else dict(section or {})
    if values.get("data_dir") is None and getattr(settings, "data_dir", None) is not None:
        values["data_dir"] = str(settings.data_dir)
    return ServeClientSettings.model_validate(values)


def handler_from_settings(
    kind: Literal["encoder", "lm"],
    config: EncoderStageConfig | LMStageConfig,
    settings=None,
) -> ModelHandler:
    """The in-process handler (``mode='local'``, the embedded default) or the Serve one.
    ``settings``: see :func:`client_settings`."""
    settings = client_settings(settings)
    if settings.mode == "local":
        return LocalEncoderHandler(config) if kind == "encoder" else LocalLMHandler(config)  # type: ignore[arg-type]
    return RemoteEncoderHandler(settings) if kind == "encoder" else RemoteLMHandler(settings)
