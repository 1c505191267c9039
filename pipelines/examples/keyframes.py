"""A custom DAG from a subset of the operators: a keyframe extractor.

    frames topic -> decode/validate (dead letters) -> vision encoder -> CurveStream routing
                 -> clear frames' JPEGs to the object store + one record per keyframe

It uses the same exactly-once machinery as every streamvqa pipeline
(:class:`~streamvqa.operators.io.exactly_once.ExactlyOnceDoFn`): the per-stream
state (the CurveStream state) is snapshotted with the input offsets, so a
restarted run neither loses nor repeats a keyframe. The JPEG objects are keyed by
stream id, sequence number and content hash
(``streams/<stream>/keyframes/<seq, 10 digits>-<hash16>``, JPEG bytes), so writing one again after a
replay is harmless.

    python -m streamvqa.pipelines.examples.keyframes --input streamvqa.frames --output keyframes --group kf
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field

import apache_beam as beam
import numpy as np

from streamvqa import connect
from streamvqa.media import decode_jpeg
from streamvqa.operators.curvature.operator import CurveStream, CurveStreamConfig, CurveStreamState
from streamvqa.operators.curvature.records import FrameInput
from streamvqa.operators.io.exactly_once import ExactlyOnceDoFn, TaskConfig
from streamvqa.operators.io.kafka_source import ReadFromKafka, SourceConfig
from streamvqa.operators.io.records import KafkaRecord, Output
from streamvqa.pipelines.runner import make_runner, pipeline_options
from streamvqa.schemas import Frame, Limits, decode
from streamvqa.schemas.errors import InvalidField
from streamvqa.settings import Settings
from streamvqa.storage.keys import content_hash, object_key


@dataclass
class KeyframeProcessor:
    """Per stream: encode each new frame, route it, store the clear ones as keyframes."""

    output_topic: str
    settings: Settings
    encoder_name: str = "dinov2-s-imgfocus"
    curvature: CurveStreamConfig = field(default_factory=CurveStreamConfig)
    limits: Limits = field(default_factory=Limits)
    name: str = "keyframes"

    def __post_init__(self) -> None:
        from streamvqa.operators.vision import build_encoder

        self.encoder = build_encoder(self.encoder_name)
        self.router = CurveStream(self.curvature)
        endpoints = connect.resolve_endpoints(self.settings)
        self.store = connect.object_store(self.settings, endpoints)

    def initial_state(self, stream_id: str) -> CurveStreamState:
        return self.router.init_state()

    def process(self, state: CurveStreamState, record: KafkaRecord) -> tuple[CurveStreamState, list[Output]]:
        frame = decode(record.value, Frame, self.limits)  # SchemaError -> dead letter
        if state.last_seq is not None and frame.seq <= state.last_seq:
            return state, []  # a duplicate or a replay: already routed
        try:
            pixels = decode_jpeg(frame.payload)
        except Exception as err:  # a frame whose JPEG does not decode is a bad record
            raise InvalidField(f"JPEG does not decode: {err}", "payload") from err
        pooled = self.encoder.encode(pixels[None]).pooled[0].float().cpu().numpy()
        digest = content_hash(frame.payload)
        step = self.router.step(
            state, FrameInput(frame.seq, frame.pts_us, pooled.astype(np.float32), content_hash=digest)
        )
        decision = step.decision
        if decision is None or decision.tier != "clear":
            return state, []
        key = object_key(frame.stream_id, "keyframes", f"{frame.seq:010d}", frame.payload)
        self.store.put(key, frame.payload)
        value = json.dumps(
            {
                "stream_id": frame.stream_id,
                "seq": frame.seq,
                "pts_us": frame.pts_us,
                "key": key,
                "score": None if decision.score != decision.score else decision.score,
                "reason": decision.reason,
            },
            sort_keys=True,
        ).encode()
        return state, [
            Output(
                self.output_topic, f"{frame.stream_id}:{frame.seq}".encode(), value, partition_key=record.key
            )
        ]

    def encode_state(self, state: CurveStreamState) -> bytes:
        return state.to_bytes()

    def decode_state(self, data: bytes) -> CurveStreamState:
        return self.router.restore(data)


def build(
    pipeline: beam.Pipeline,
    settings: Settings,
    input_topic: str,
    output_topic: str,
    group: str,
    bounded: bool = False,
    **processor_options,
) -> None:
    """``bounded``: end each partition at an end-of-stream marker; otherwise run until stopped."""
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
        max_message_bytes=settings.limits.max_message_bytes,
    )
    (
        pipeline
        | "Read" >> ReadFromKafka(source, [input_topic])
        | "Keyframes"
        >> beam.ParDo(
            ExactlyOnceDoFn(task, lambda: KeyframeProcessor(output_topic, settings, **processor_options))
        )
    )


def run(
    settings: Settings,
    input_topic: str,
    output_topic: str,
    group: str,
    bounded: bool = False,
    **processor_options,
) -> None:
    with beam.Pipeline(runner=make_runner(settings), options=pipeline_options(settings)) as pipeline:
        build(pipeline, settings, input_topic, output_topic, group, bounded, **processor_options)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", default=None, help="frames topic (default: the settings' frames topic)")
    parser.add_argument("--output", required=True, help="topic for keyframe records")
    parser.add_argument("--group", required=True, help="consumer group / task namespace")
    parser.add_argument("--bounded", action="store_true", help="stop at end-of-stream markers")
    args = parser.parse_args(argv)
    settings = Settings()
    run(settings, args.input or settings.topics.frames, args.output, args.group, bounded=args.bounded)


if __name__ == "__main__":
    main()
