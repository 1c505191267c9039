"""From settings to live clients: the one place that knows embedded from cluster.

With no broker address and no S3 endpoint in the settings, the addresses and
credentials of the embedded stack (``streamvqa services up``) are used.
Everything else in streamvqa takes an ``Endpoints`` and never asks which it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer

from streamvqa.infra.local.process import StackError
from streamvqa.infra.local.stack import read_state, s3_endpoint_for
from streamvqa.settings import Settings
from streamvqa.storage.object_store import ObjectStore, S3Endpoint


@dataclass(frozen=True)
class Endpoints:
    bootstrap_servers: str
    s3: S3Endpoint


def resolve_endpoints(settings: Settings) -> Endpoints:
    state = None
    if settings.kafka.bootstrap_servers is None or settings.s3.endpoint is None:
        state = read_state(settings.stack_dir)
        if state is None:
            raise StackError(
                "no Kafka/S3 address is configured and the embedded stack is not running "
                f"(no state under {settings.stack_dir}): run `streamvqa services up`, or set "
                "STREAMVQA_KAFKA__BOOTSTRAP_SERVERS and STREAMVQA_S3__ENDPOINT"
            )
    bootstrap = settings.kafka.bootstrap_servers or state.bootstrap_servers  # type: ignore[union-attr]
    if settings.s3.endpoint is not None:
        s3 = S3Endpoint(
            settings.s3.endpoint,
            settings.s3.access_key.get_secret_value(),  # type: ignore[union-attr]
            settings.s3.secret_key.get_secret_value(),  # type: ignore[union-attr]
            region=settings.s3.region,
            secure=settings.s3.secure,
        )
    else:
        s3 = s3_endpoint_for(settings.stack_dir, state.s3_port, settings.s3.region)  # type: ignore[union-attr]
    return Endpoints(bootstrap, s3)


def kafka_config(settings: Settings, endpoints: Endpoints) -> dict[str, Any]:
    """Connection options shared by every kafka-python client."""
    k = settings.kafka
    config: dict[str, Any] = {
        "bootstrap_servers": endpoints.bootstrap_servers,
        "client_id": k.client_id,
        "security_protocol": k.security_protocol,
        "request_timeout_ms": k.request_timeout_ms,
    }
    if k.sasl_mechanism is not None:
        config["sasl_mechanism"] = k.sasl_mechanism
        config["sasl_plain_username"] = k.sasl_username
        config["sasl_plain_password"] = k.sasl_password.get_secret_value() if k.sasl_password else None
    if k.ssl_cafile is not None:
        config["ssl_cafile"] = str(k.ssl_cafile)
    return config


def producer(settings: Settings, endpoints: Endpoints, **overrides: Any) -> KafkaProducer:
    """An idempotent producer (acks=all) sized for the configured message limit."""
    options: dict[str, Any] = {
        **kafka_config(settings, endpoints),
        "acks": "all",
        "enable_idempotence": True,
        "max_request_size": settings.limits.max_message_bytes + 64 * 1024,
        "linger_ms": 5,
    }
    options.update(overrides)
    return KafkaProducer(**options)


def consumer(settings: Settings, endpoints: Endpoints, *topics: str, **overrides: Any) -> KafkaConsumer:
    """A consumer that starts from the earliest offset (``latest`` is wrong on Tansu)."""
    fetch = settings.limits.max_message_bytes + 64 * 1024
    options: dict[str, Any] = {
        **kafka_config(settings, endpoints),
        "auto_offset_reset": "earliest",
        "enable_auto_commit": False,
        "session_timeout_ms": settings.kafka.session_timeout_ms,
        "heartbeat_interval_ms": max(1000, settings.kafka.session_timeout_ms // 5),
        "max_partition_fetch_bytes": fetch,
        "fetch_max_bytes": max(fetch, 52_428_800),
        "isolation_level": "read_committed",
    }
    options.update(overrides)
    return KafkaConsumer(*topics, **options)


def admin(settings: Settings, endpoints: Endpoints) -> KafkaAdminClient:
    return KafkaAdminClient(**kafka_config(settings, endpoints))


def object_store(settings: Settings, endpoints: Endpoints, bucket: str | None = None) -> ObjectStore:
    return ObjectStore(endpoints.s3, bucket or settings.s3.bucket)
