"""Idempotent creation of the topics and buckets streamvqa needs, on any Kafka and S3.

Used by the embedded stack's bring-up and by cluster set-up alike.
"""

from __future__ import annotations

from kafka.admin import KafkaAdminClient, NewTopic
from kafka.errors import TopicAlreadyExistsError

from streamvqa.settings import TopicSettings
from streamvqa.storage.object_store import ObjectStore


def ensure_topics(admin: KafkaAdminClient, topics: TopicSettings) -> list[str]:
    """Create the missing pipeline topics. Returns the names that were created."""
    existing = set(admin.list_topics())
    missing = [name for name in topics.names().values() if name not in existing]
    created: list[str] = []
    for name in missing:
        try:
            admin.create_topics(
                [NewTopic(name, topics.partitions, topics.replication_factor)],
                timeout_ms=10_000,
            )
            created.append(name)
        except TopicAlreadyExistsError:
            pass  # created concurrently: that is the state we want
    return created


def ensure_buckets(store: ObjectStore, buckets: list[str]) -> list[str]:
    """Create the missing buckets. Returns the names that were created."""
    return [name for name in buckets if store.create_bucket(name)]
