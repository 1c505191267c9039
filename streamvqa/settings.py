"""One validated settings object for every way streamvqa runs.

Values come, highest priority first, from keyword arguments, environment
variables (``STREAMVQA_`` prefix, ``__`` between nested names, e.g.
``STREAMVQA_KAFKA__BOOTSTRAP_SERVERS``), a TOML config file (``STREAMVQA_CONFIG``
or ``./streamvqa.toml``) and the defaults below.

The embedded default and a cluster differ only here: leave the Kafka bootstrap
servers and the S3 endpoint unset and streamvqa uses the embedded stack that
``streamvqa services up`` started under ``data_dir``; set them and it talks to
a real Kafka and MinIO/S3 instead.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

CONFIG_ENV = "STREAMVQA_CONFIG"
DEFAULT_CONFIG_FILE = "streamvqa.toml"

_TOPIC_RE = re.compile(r"^[A-Za-z0-9._-]{1,249}$")
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


class KafkaSettings(BaseModel):
    """Where the broker is. ``bootstrap_servers=None`` means the embedded Tansu broker."""

    bootstrap_servers: str | None = None
    client_id: str = "streamvqa"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: Path | None = None
    request_timeout_ms: int = Field(default=30_000, gt=0)
    # Consumer-group join takes about half the session timeout on the embedded broker.
    session_timeout_ms: int = Field(default=10_000, ge=6_000)

    @model_validator(mode="after")
    def _sasl_complete(self) -> KafkaSettings:
        if self.security_protocol.startswith("SASL"):
            missing = [
                name
                for name in ("sasl_mechanism", "sasl_username", "sasl_password")
                if getattr(self, name) is None
            ]
            if missing:
                raise ValueError(f"security_protocol={self.security_protocol} needs {', '.join(missing)}")
        return self


class S3Settings(BaseModel):
    """Where the object store is. ``endpoint=None`` means the embedded SeaweedFS."""

    endpoint: str | None = None  # host:port, no scheme (as the minio SDK expects)
    access_key: SecretStr | None = None
    secret_key: SecretStr | None = None
    region: str = "us-east-1"
    secure: bool = False
    bucket: str = "streamvqa"  # per-stream memory, KV blocks, snapshots

    @field_validator("endpoint")
    @classmethod
    def _no_scheme(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if "://" in value:
            raise ValueError("give host:port without a scheme; set s3.secure for TLS")
        host, _, port = value.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"expected host:port, got {value!r}")
        return value

    @field_validator("bucket")
    @classmethod
    def _bucket_name(cls, value: str) -> str:
        if not _BUCKET_RE.match(value) or ".." in value:
            raise ValueError(f"{value!r} is not a valid S3 bucket name")
        return value

    @model_validator(mode="after")
    def _credentials_with_endpoint(self) -> S3Settings:
        if self.endpoint is not None and (self.access_key is None or self.secret_key is None):
            raise ValueError("an explicit s3.endpoint needs s3.access_key and s3.secret_key")
        return self


class TopicSettings(BaseModel):
    """Topic names and layout. Inputs are keyed by stream id, so one stream stays ordered."""

    frames: str = "streamvqa.frames"
    audio: str = "streamvqa.audio"
    queries: str = "streamvqa.queries"
    answers: str = "streamvqa.answers"
    dead_letter: str = "streamvqa.dead-letter"
    # internal: the stages' notes and forwarded questions, co-partitioned with the inputs
    memory: str = "streamvqa.memory"
    partitions: int = Field(default=3, ge=1, le=1024)
    replication_factor: int = Field(default=1, ge=1)

    @field_validator("frames", "audio", "queries", "answers", "dead_letter", "memory")
    @classmethod
    def _topic_name(cls, value: str) -> str:
        if not _TOPIC_RE.match(value) or value in {".", ".."}:
            raise ValueError(f"{value!r} is not a valid Kafka topic name")
        return value

    def names(self) -> dict[str, str]:
        """Role -> topic name, for every topic the pipeline uses."""
        return {
            "frames": self.frames,
            "audio": self.audio,
            "queries": self.queries,
            "answers": self.answers,
            "dead_letter": self.dead_letter,
            "memory": self.memory,
        }

    @model_validator(mode="after")
    def _distinct(self) -> TopicSettings:
        names = list(self.names().values())
        if len(set(names)) != len(names):
            raise ValueError(f"topic names must be distinct, got {names}")
        return self


class LimitSettings(BaseModel):
    """Input limits applied when decoding messages (bad input goes to the dead-letter topic)."""

    max_message_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    max_frame_side: int = Field(default=8192, ge=16)
    max_query_chars: int = Field(default=4096, ge=1)


class LocalStackSettings(BaseModel):
    """The embedded stack (Tansu + SeaweedFS). Port 0 means: pick a free one."""

    broker_storage: Literal["memory", "s3"] = "s3"
    broker_port: int = Field(default=0, ge=0, le=65535)
    s3_port: int = Field(default=0, ge=0, le=65535)
    start_timeout_s: float = Field(default=60.0, gt=0)


class RunnerSettings(BaseModel):
    """Which Beam runner executes the pipeline; only this changes on a cluster.

    The Flink fields below become Beam's Flink pipeline options (``pipelines/runner.py``) for
    ``FlinkRunner`` and for ``PortableRunner`` (a Beam Flink job server at ``job_endpoint``, as
    the Helm chart deploys); the FnApiRunner ignores them. ``state_backend`` is Beam's
    ``--state_backend`` (``rocksdb`` or ``filesystem``) and needs a durable
    ``state_backend_storage_path`` (``s3://bucket/prefix`` on MinIO/S3).
    """

    name: Literal["FnApiRunner", "FlinkRunner", "PortableRunner"] = "FnApiRunner"
    flink_master: str | None = None
    job_endpoint: str | None = None
    parallelism: int = Field(default=1, ge=1)
    max_parallelism: int | None = Field(default=None, ge=1)
    checkpointing_interval_ms: int = Field(default=10_000, ge=100)
    checkpointing_mode: Literal["EXACTLY_ONCE", "AT_LEAST_ONCE"] = "EXACTLY_ONCE"
    checkpoint_timeout_ms: int | None = Field(default=None, ge=1_000)
    min_pause_between_checkpoints_ms: int | None = Field(default=None, ge=0)
    # keep the last checkpoint when the job is cancelled, so a redeploy can resume from it
    externalized_checkpoints: bool = True
    state_backend: Literal["rocksdb", "filesystem"] | None = None
    state_backend_storage_path: str | None = None
    # How Flink task managers run the Python SDK harness: EXTERNAL = a worker pool at
    # environment_config (the chart's sidecar on localhost:50000), DOCKER, PROCESS or LOOPBACK.
    environment_type: Literal["EXTERNAL", "DOCKER", "PROCESS", "LOOPBACK"] | None = None
    environment_config: str | None = None

    @model_validator(mode="after")
    def _cluster_address(self) -> RunnerSettings:
        if self.name == "FlinkRunner" and not self.flink_master:
            raise ValueError("runner FlinkRunner needs runner.flink_master")
        if self.name == "PortableRunner" and not self.job_endpoint:
            raise ValueError("runner PortableRunner needs runner.job_endpoint")
        if self.state_backend is not None and not self.state_backend_storage_path:
            raise ValueError("runner.state_backend needs runner.state_backend_storage_path")
        if self.max_parallelism is not None and self.max_parallelism < self.parallelism:
            raise ValueError("runner.max_parallelism must be >= runner.parallelism")
        if self.environment_type == "EXTERNAL" and not self.environment_config:
            raise ValueError("runner.environment_type EXTERNAL needs runner.environment_config")
        return self


class PipelineSettings(BaseModel):
    """The models and memory sizes of the main pipeline (``streamvqa run pipeline``).

    The embedded default runs every model in process: DINOv2-S with the STC cache, silero-vad,
    Whisper tiny.en and SmolLM2-135M-Instruct over transcripts and scene notes. ``lm_path``
    names a local Hugging Face checkpoint instead (a text LM, or the language model of
    Qwen2.5-VL / LLaVA-OneVision: see docs/pipeline.md); nothing is downloaded.
    """

    encoder: str = "stc-dinov2-s-imgfocus"
    # STC-Cacher preset of an STC encoder (STCCacheConfig.preset). "scene" recomputes 10 % of the
    # tokens (the least like the reference's, by layer input) and takes a new reference where the
    # picture stops being like the group's first frame (at most every 8 frames); "adaptive"
    # recomputes the tokens whose keys changed and takes a cut as a new reference; "fixed" (the
    # paper) reuses 75 % of the tokens of a reference every 4 frames, which at low sampling rates
    # (1-2 fps) biases features toward the reference, so that CurveStream sees every reference
    # refresh as motion. Same cost; "scene" stays closest to the plain encoder (docs/pipeline.md,
    # measured on the demo stream with `python -m bench stc-modes`).
    stc_mode: Literal["fixed", "adaptive", "scene"] = "scene"
    lm_path: Path | None = None  # None: the shipped SmolLM2-135M-Instruct
    lm_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    window_tokens: int = Field(default=256, ge=16)
    block_tokens: int = Field(default=64, ge=8)
    retrieve_tokens: int = Field(default=384, ge=0)
    top_k: int = Field(default=3, ge=0)  # retrieved blocks per question (their time ranges are the evidence)
    max_new_tokens: int = Field(default=32, ge=1, le=512)
    answer_context: Literal["stored", "recompute"] = "recompute"
    text_features: bool = True  # MiniLM sentence features beside the ReKV score
    budget_tokens: int = Field(default=16384, ge=256)  # CurveStream visual memory
    # KV blocks kept in the process (all streams of a worker) before they are only in the object
    # store: the device tier (GPU memory on a GPU, else RAM) and the host RAM tier, LRU
    kv_device_bytes: int = Field(default=64 << 20, ge=0)
    kv_host_bytes: int = Field(default=256 << 20, ge=0)
    keyframes: bool = True  # clear frames' JPEGs to the object store
    speech: bool = True  # VAD + ASR on the audio topic
    audio_progress_s: float = Field(
        default=1.0, gt=0
    )  # progress marks (the audio watermark) at least this often
    hold_timeout_s: float = Field(default=10.0, ge=0)  # a question waits at most this for its sources
    image_match_threshold: float = Field(default=0.6, ge=-1, le=1)
    heartbeat_s: float = Field(default=0.5, gt=0)
    commit_interval_s: float = Field(default=1.0, gt=0)
    # every model call (encoder, VAD + ASR, the answer): a deadline, then retries with backoff;
    # when they run out the record is dead-lettered as model_failed (docs/reliability.md)
    model_timeout_s: float = Field(default=60.0, gt=0)
    model_attempts: int = Field(default=3, ge=1)
    model_backoff_s: float = Field(default=0.2, ge=0)

    def call_policy(self):
        from streamvqa.operators.model_guard import CallPolicy

        return CallPolicy(
            timeout_s=self.model_timeout_s, attempts=self.model_attempts, backoff_s=self.model_backoff_s
        )


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="STREAMVQA_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
    )

    data_dir: Path = Path(".data")
    kafka: KafkaSettings = KafkaSettings()
    s3: S3Settings = S3Settings()
    topics: TopicSettings = TopicSettings()
    limits: LimitSettings = LimitSettings()
    local: LocalStackSettings = LocalStackSettings()
    runner: RunnerSettings = RunnerSettings()
    pipeline: PipelineSettings = PipelineSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = config_path()
        if config_file is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=config_file))
        return tuple(sources)

    @property
    def embedded(self) -> bool:
        """True when both the broker and the object store are the embedded stack."""
        return self.kafka.bootstrap_servers is None and self.s3.endpoint is None

    @property
    def stack_dir(self) -> Path:
        return self.data_dir / "stack"


def config_path() -> Path | None:
    """The config file in force: $STREAMVQA_CONFIG (must exist) or ./streamvqa.toml if present."""
    explicit = os.environ.get(CONFIG_ENV)
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise FileNotFoundError(f"{CONFIG_ENV}={explicit} does not name a file")
        return path
    default = Path(DEFAULT_CONFIG_FILE)
    return default if default.is_file() else None


def load_settings(**overrides: Any) -> Settings:
    return Settings(**overrides)
