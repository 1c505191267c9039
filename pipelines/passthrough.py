"""The pass-through pipeline: source -> decode/validate -> per-stream state -> sink.

It carries frames from one topic to another, exactly once, dropping duplicated
sequence numbers and sending malformed messages to the dead-letter topic. The
IO, state and commit machinery is the one every streamvqa pipeline uses; the
chaos test and the IO benchmark run it.

    streamvqa run passthrough --input T --output O --group G [--data-dir D] [--bounded]
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import apache_beam as beam

from streamvqa import connect
from streamvqa.operators.io.exactly_once import ExactlyOnceDoFn, TaskConfig
from streamvqa.operators.io.kafka_source import ReadFromKafka, SourceConfig
from streamvqa.operators.io.records import KafkaRecord, Output
from streamvqa.pipelines.runner import make_runner, pipeline_options
from streamvqa.schemas import Frame, Limits, decode
from streamvqa.settings import Settings


@dataclass
class PassThroughProcessor:
    """Per stream: forward each new frame once; drop repeated or older sequence numbers."""

    output_topic: str
    limits: Limits = field(default_factory=Limits)
    name: str = "passthrough"

    def initial_state(self, stream_id: str) -> dict:
        return {"last_seq": -1, "forwarded": 0, "duplicates": 0}

    def process(self, state: dict, record: KafkaRecord) -> tuple[dict, list[Output]]:
        frame = decode(record.value, Frame, self.limits)  # SchemaError -> dead letter
        if frame.seq <= state["last_seq"]:
            return {**state, "duplicates": state["duplicates"] + 1}, []
        state = {**state, "last_seq": frame.seq, "forwarded": state["forwarded"] + 1}
        key = f"{frame.stream_id}:{frame.seq}".encode()
        return state, [Output(self.output_topic, key, record.value, partition_key=record.key)]

    def encode_state(self, state: dict) -> bytes:
        return json.dumps(state, sort_keys=True).encode()

    def decode_state(self, data: bytes) -> dict:
        return json.loads(data)


def build(
    pipeline: beam.Pipeline,
    settings: Settings,
    input_topic: str,
    output_topic: str,
    group: str,
    commit_every: int = 1000,
    commit_interval_s: float = 1.0,
    bounded: bool = False,
) -> None:
    """``bounded``: end each partition at an end-of-stream marker (tests, benches); otherwise
    the job runs until stopped and a marker is a dead letter like any other bad message."""
    endpoints = connect.resolve_endpoints(settings)
    kafka = connect.kafka_config(settings, endpoints)
    source = SourceConfig(
        client=kafka, group_id=group, end_markers=bounded, emit_end_of_stream=bounded, batch=True
    )
    task = TaskConfig(
        kafka=kafka,
        s3=endpoints.s3,
        bucket=settings.s3.bucket,
        group=group,
        output_topics=(output_topic,),
        dead_letter_topic=settings.topics.dead_letter,
        commit_every=commit_every,
        commit_interval_s=commit_interval_s,
        max_message_bytes=settings.limits.max_message_bytes,
    )
    (
        pipeline
        | "Read" >> ReadFromKafka(source, [input_topic])
        | "Process" >> beam.ParDo(ExactlyOnceDoFn(task, lambda: PassThroughProcessor(output_topic)))
    )


def run(settings: Settings, input_topic: str, output_topic: str, group: str, **kwargs) -> None:
    with beam.Pipeline(runner=make_runner(settings), options=pipeline_options(settings)) as pipeline:
        build(pipeline, settings, input_topic, output_topic, group, **kwargs)
