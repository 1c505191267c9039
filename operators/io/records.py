"""Plain values that travel between the Kafka source, the processing task and the sinks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

EOS_HEADER = "streamvqa-eos"
#: Why a record with that header is a dead letter where the source does not honour it.
END_MARKER_REFUSED = "end-of-stream marker: a producer cannot end the input of a long-running job"
#: An output's identity for the exactly-once ledger when its key is not unique (notes on the
#: memory topic are keyed by stream id, like the inputs, and identified by this header).
OUTPUT_ID_HEADER = "streamvqa-id"
#: Which input wrote an output: ``topic/partition/offset`` of the record, or
#: ``topic/partition/t<offset>/<stream id>`` for a tick of that partition's task at that position.
#: A restarted task holds its output positions before what its last run wrote and it has not yet
#: written again (exactly_once.py).
SOURCE_HEADER = "streamvqa-src"


@dataclass(frozen=True, slots=True)
class KafkaRecord:
    """One consumed message, with where it came from."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    timestamp_ms: int
    headers: tuple[tuple[str, bytes], ...] = ()
    #: Set by the source, and only by a bounded one (``SourceConfig.end_markers``): this record
    #: ends its partition's input. A long-running job never sets it, whatever the headers say.
    end_of_stream: bool = False

    @property
    def has_end_marker(self) -> bool:
        """The producer put the end-of-stream header on it (honoured only by a bounded source)."""
        return any(name == EOS_HEADER for name, _ in self.headers)


@dataclass(frozen=True, slots=True)
class KafkaBatch:
    """Consecutive records of one partition, in offset order (the source's batch mode)."""

    topic: str
    partition: int
    records: tuple[KafkaRecord, ...]


@dataclass(frozen=True, slots=True)
class PartitionRead:
    """What the source reads: one partition, from ``start`` (None: the group's committed
    offset, else the earliest) up to ``stop`` (exclusive; None: unbounded)."""

    topic: str
    partition: int
    start: int | None = None
    stop: int | None = None


@dataclass(frozen=True, slots=True)
class Output:
    """A message to produce. ``key`` must be deterministic and unique per logical output
    (e.g. the query id): it is how a repeated write is recognised after a restart.
    ``partition_key`` (e.g. the stream id) picks the partition instead of ``key``, so that
    one stream's outputs stay in order in one partition."""

    topic: str
    key: bytes
    value: bytes
    headers: tuple[tuple[str, bytes], ...] = ()
    partition_key: bytes | None = None

    @property
    def identity(self) -> bytes:
        """What the ledger recognises a repeated write by: the ``streamvqa-id`` header, else the key."""
        return cast(bytes, output_identity(self.key, self.headers))  # self.key is bytes: never None


def scoped_id(stream_id: str, *parts: object) -> str:
    """An output identity of one stream: ``<stream id>/<part>/...``. The ledger recognises a
    repeated write by its identity across all partitions of a topic, so an identity must name its
    stream: two streams reusing a query id must never suppress each other's outputs."""
    return "/".join((stream_id, *map(str, parts)))


def is_scoped(identity: bytes, stream_id: str) -> bool:
    """``identity`` is one of ``stream_id``'s: it starts with the stream id and a separator
    (``/``, as :func:`scoped_id` writes, or ``:``, as ``<stream>:<seq>`` frame keys do); stream
    ids contain neither."""
    head = stream_id.encode()
    return identity.startswith(head) and identity[len(head) : len(head) + 1] in (b"/", b":")


def header(headers, name: str) -> bytes | None:
    for key, value in headers or ():
        if key == name:
            return bytes(value)
    return None


def output_identity(key: bytes | None, headers) -> bytes | None:
    identity = header(headers, OUTPUT_ID_HEADER)
    if identity is not None:
        return identity
    return None if key is None else bytes(key)
