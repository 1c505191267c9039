"""The model stages as Ray Serve deployments (one application each).

- ``streamvqa-encoder``: :class:`EncoderDeployment`, ``encode(stream_id, frames, frame_index)``
  batched with ``@serve.batch`` (a plain encoder runs the frames of every call in a batch in one
  forward; an STC-cached one runs each stream's frames together).
- ``streamvqa-lm``: :class:`LMDeployment`, ``open`` / ``prefill`` / ``answer``.

Stream affinity: callers set ``handle.options(multiplexed_model_id=stream_id)``; Serve's model
multiplexing (``@serve.multiplexed``, keyed here by stream id) routes a stream's calls to the
replica that has it loaded, and loads it (from the object store checkpoint) on another replica
when that one is gone. Serve also splits a batch by multiplexed id, so a plain (stateless)
encoder is called without it (``info()['stateful']`` tells the caller which).

Resources and scaling come from :class:`DeploySettings` (``num_cpus``/``num_gpus`` per replica,
a fixed ``num_replicas`` or an ``autoscaling`` config, ``max_ongoing_requests``).
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field

from ray import serve
from ray.serve import Application

from .stages import EncoderStage, EncoderStageConfig, LMStage, LMStageConfig

ENCODER_APP = "streamvqa-encoder"
LM_APP = "streamvqa-lm"
#: streams whose state a replica keeps loaded (multiplexing LRU); the stages keep as many
MAX_STREAMS_PER_REPLICA = 64


@dataclass(frozen=True)
class DeploySettings:
    """How one deployment runs. ``autoscaling`` (Serve's autoscaling_config: min_replicas,
    max_replicas, target_ongoing_requests, ...) replaces ``num_replicas`` when given."""

    num_replicas: int = 1
    autoscaling: dict | None = None
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    max_ongoing_requests: int = 32
    max_batch_size: int = 16
    batch_wait_timeout_s: float = 0.005
    health_check_period_s: float = 2.0
    health_check_timeout_s: float = 30.0
    graceful_shutdown_timeout_s: float = 5.0

    def options(self) -> dict:
        opts: dict = {
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus},
            "max_ongoing_requests": self.max_ongoing_requests,
            "health_check_period_s": self.health_check_period_s,
            "health_check_timeout_s": self.health_check_timeout_s,
            "graceful_shutdown_timeout_s": self.graceful_shutdown_timeout_s,
        }
        if self.autoscaling is not None:
            opts["autoscaling_config"] = dict(self.autoscaling)
        else:
            opts["num_replicas"] = self.num_replicas
        return opts


@dataclass(frozen=True)
class ServeConfig:
    """Which stages to deploy and how (a stage left None is not deployed)."""

    encoder: EncoderStageConfig | None = None
    lm: LMStageConfig | None = None
    encoder_deploy: DeploySettings = field(default_factory=DeploySettings)
    lm_deploy: DeploySettings = field(default_factory=DeploySettings)
    encoder_app: str = ENCODER_APP
    lm_app: str = LM_APP


class _Loaded:
    """What the multiplexing LRU holds for a stream; dropping it frees the stage's copy."""

    def __init__(self, stage, stream_id: str) -> None:
        self.stage, self.stream_id = stage, stream_id

    def __del__(self) -> None:
        stage, self.stage = getattr(self, "stage", None), None
        if stage is not None:
            stage.drop_stream(self.stream_id)


def _where() -> dict:
    ctx = serve.get_replica_context()
    import ray

    return {
        "replica": ctx.replica_id.unique_id,
        "deployment": ctx.deployment,
        "actor_name": ray.get_runtime_context().get_actor_name(),
        "pid": os.getpid(),
    }


@serve.deployment(name="encoder")
class EncoderDeployment:
    """The vision encoder (with per-stream STC caches) behind a batched Serve endpoint."""

    def __init__(
        self, config: EncoderStageConfig, max_batch_size: int = 16, batch_wait_timeout_s: float = 0.005
    ):
        self.stage = EncoderStage(config)
        self.encode_batch.set_max_batch_size(max_batch_size)
        self.encode_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)

    @serve.multiplexed(max_num_models_per_replica=MAX_STREAMS_PER_REPLICA)
    async def _stream(self, stream_id: str) -> _Loaded:
        await asyncio.to_thread(self.stage.load_stream, stream_id)
        return _Loaded(self.stage, stream_id)

    async def info(self) -> dict:
        return {"stateful": self.stage.cached, **_where()}

    async def encode(self, stream_id: str, frames, frame_index: int | None = None) -> dict:
        routed = serve.get_multiplexed_model_id()
        if routed:
            await self._stream(routed)
        return await self.encode_batch(stream_id, frames, frame_index)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def encode_batch(self, stream_ids: list, frames: list, frame_indexes: list) -> list[dict]:
        requests = list(zip(stream_ids, frames, frame_indexes, strict=True))
        return await asyncio.to_thread(self.stage.encode_many, requests)

    async def snapshot(self, stream_id: str) -> str | None:
        return await asyncio.to_thread(self.stage.snapshot, stream_id)


@serve.deployment(name="lm")
class LMDeployment:
    """The KV-memory language model: prefill chunks into the store, answer with retrieval."""

    def __init__(self, config: LMStageConfig):
        self.stage = LMStage(config)

    @serve.multiplexed(max_num_models_per_replica=MAX_STREAMS_PER_REPLICA)
    async def _stream(self, stream_id: str) -> _Loaded:
        return _Loaded(self.stage, stream_id)  # loaded lazily by the stage (from its checkpoint)

    async def _route(self) -> None:
        routed = serve.get_multiplexed_model_id()
        if routed:
            await self._stream(routed)

    async def info(self) -> dict:
        return {"stateful": True, "model_id": self.stage.model_id, **_where()}

    async def open(self, stream_id: str, system_prompt=None, start_us: int = 0, reset: bool = False) -> dict:
        await self._route()
        return await asyncio.to_thread(
            lambda: self.stage.open(stream_id, system_prompt, start_us, reset=reset)
        )

    async def prefill(
        self, stream_id: str, seq: int | None, start_us: int, end_us: int, text=None, tokens=None
    ):
        await self._route()
        return await asyncio.to_thread(
            lambda: self.stage.prefill(stream_id, seq, start_us, end_us, text=text, tokens=tokens)
        )

    async def answer(self, stream_id: str, query_id: str, question, after_seq=None, max_new_tokens=None):
        await self._route()
        return await asyncio.to_thread(
            lambda: self.stage.answer(
                stream_id, query_id, question, after_seq=after_seq, max_new_tokens=max_new_tokens
            )
        )


def build_apps(config: ServeConfig) -> dict[str, Application]:
    """App name -> bound application, for the stages the config names."""
    apps: dict[str, Application] = {}
    if config.encoder is not None:
        d = config.encoder_deploy
        # the ignores: @serve.deployment made the classes Deployments (mypy skips ray)
        apps[config.encoder_app] = EncoderDeployment.options(**d.options()).bind(  # type: ignore[attr-defined]
            config.encoder, d.max_batch_size, d.batch_wait_timeout_s
        )
    if config.lm is not None:
        apps[config.lm_app] = LMDeployment.options(**config.lm_deploy.options()).bind(config.lm)  # type: ignore[attr-defined]
    return apps


def build_app(config: ServeConfig) -> Application:
    """The one application of a config naming exactly one stage."""
    apps = build_apps(config)
    if len(apps) != 1:
        raise ValueError(f"build_app needs a config with one stage, got {sorted(apps)}; use build_apps")
    return next(iter(apps.values()))


def deploy(config: ServeConfig) -> dict[str, str]:
    """Run the apps on the connected cluster (Serve started); returns app name -> deployment."""
    deployed = {}
    for name, app in build_apps(config).items():
        serve.run(app, name=name, route_prefix=None)
        deployed[name] = "encoder" if name == config.encoder_app else "lm"
    return deployed


def undeploy(config: ServeConfig) -> None:
    for name in (config.encoder_app, config.lm_app):
        serve.delete(name)
