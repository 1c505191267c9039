"""Beam transforms for pipelines that do not need the exactly-once task: decode with
dead letters, and a Kafka sink.

    records = p | ReadFromKafka(source, [topic])
    decoded = records | beam.ParDo(DecodeOrDeadLetter(Frame, dead_letter_topic)).with_outputs(
        DEAD_LETTER, main="records")
    decoded[DEAD_LETTER] | WriteToKafka(kafka_config)

``WriteToKafka`` uses the idempotent producer and flushes at the end of every
bundle (a bundle is Beam's unit of commit: it is not finished until its
outputs are acknowledged). Outputs carry deterministic keys; run it after the
ledger (``ledger_topics``) to suppress outputs a previous run already wrote.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import apache_beam as beam
from apache_beam import pvalue

from streamvqa.schemas import InvalidField, Limits, SchemaError, decode, encode, make_dead_letter

from .kafka_sink import OutputProducer
from .records import END_MARKER_REFUSED, KafkaRecord, Output

DEAD_LETTER = "dead_letter"


class DecodeOrDeadLetter(beam.DoFn):
    """KafkaRecord -> decoded record; bad ones -> tagged dead-letter Outputs."""

    def __init__(self, record_type: type, dead_letter_topic: str, limits: Limits | None = None) -> None:
        self.record_type = record_type
        self.dead_letter_topic = dead_letter_topic
        self.limits = limits

    def process(self, record: KafkaRecord) -> Iterator[Any]:
        if record.end_of_stream:
            return
        try:
            if record.has_end_marker:  # not honoured by this (unbounded) source: a producer's claim
                raise InvalidField(END_MARKER_REFUSED, "headers")
            yield decode(record.value, self.record_type, self.limits)
        except SchemaError as err:
            letter = make_dead_letter(
                err,
                source_topic=record.topic,
                source_partition=record.partition,
                source_offset=record.offset,
                payload=record.value,
                key=record.key,
            )
            key = f"{record.topic}/{record.partition}/{record.offset}".encode()
            yield pvalue.TaggedOutput(DEAD_LETTER, Output(self.dead_letter_topic, key, encode(letter)))


class _WriteFn(beam.DoFn):
    def __init__(self, kafka: dict[str, Any], max_message_bytes: int, ledger_topics: tuple[str, ...]) -> None:
        self.kafka = kafka
        self.max_message_bytes = max_message_bytes
        self.ledger_topics = ledger_topics

    def setup(self) -> None:
        from kafka import KafkaConsumer, KafkaProducer

        self._producer = OutputProducer(
            KafkaProducer(
                **self.kafka,
                acks="all",
                enable_idempotence=True,
                linger_ms=5,
                max_request_size=self.max_message_bytes + 65536,
            )
        )
        if self.ledger_topics:
            self._producer.load_ledger(
                lambda: KafkaConsumer(**self.kafka, fetch_max_wait_ms=20), {}, list(self.ledger_topics)
            )

    def process(self, output: Output) -> Iterator[None]:
        self._producer.send(output)
        return iter(())

    def finish_bundle(self) -> None:
        self._producer.flush()

    def teardown(self) -> None:
        producer = getattr(self, "_producer", None)
        if producer is not None:
            producer.close()


class WriteToKafka(beam.PTransform):
    """PCollection of Output -> Kafka. ``ledger_topics``: read these first and skip keys they hold."""

    def __init__(
        self,
        kafka: dict[str, Any],
        max_message_bytes: int = 16 * 1024 * 1024,
        ledger_topics: tuple[str, ...] = (),
    ) -> None:
        super().__init__()
        self.fn = _WriteFn(kafka, max_message_bytes, tuple(ledger_topics))

    def expand(self, outputs):
        return outputs | beam.ParDo(self.fn)
