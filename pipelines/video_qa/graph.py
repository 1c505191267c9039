"""The main pipeline graph: one Kafka read of the four input topics, one fused exactly-once step.

    frames, audio, queries, memory  --ReadFromKafka-->  ExactlyOnceDoFn({topic: stage})
        frames  -> FrameStage  -> memory topic
        audio   -> AudioStage  -> memory topic
        queries -> QueryStage  -> memory topic
        memory  -> MemoryStage -> answers topic

The stages meet on the memory topic (co-partitioned with the inputs: keyed by stream id), not
inside one task, so each keeps the exactly-once commit protocol of one input partition. The
streaming path stays fused (FnApiRunner holds output behind any fusion break until the source
ends); on Flink the same graph runs with the runner settings (``settings.runner``), each worker
owning some partitions. Models load once per worker, on first use.

    streamvqa run pipeline [--group streamvqa]
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import apache_beam as beam
import torch

from streamvqa import connect
from streamvqa.operators.io.exactly_once import ExactlyOnceDoFn, TaskConfig
from streamvqa.operators.io.kafka_source import ReadFromKafka, SourceConfig
from streamvqa.pipelines.runner import make_runner, pipeline_options
from streamvqa.settings import Settings

from .common import limits_from

log = logging.getLogger("streamvqa.pipeline")
DEFAULT_GROUP = "streamvqa"


def input_topics(settings: Settings) -> list[str]:
    t = settings.topics
    topics = [t.frames, t.queries, t.memory]
    if settings.pipeline.speech:
        topics.insert(1, t.audio)
    return topics


# ------------------------------------------------------------------------- models
def build_encoder(settings: Settings):
    from streamvqa.operators.vision import build_encoder as build

    p = settings.pipeline
    if p.encoder.startswith("stc-"):
        from streamvqa.operators.vision import STCCacheConfig

        return build(p.encoder, config=STCCacheConfig.preset(p.stc_mode))
    return build(p.encoder)


def load_memory_models(settings: Settings):
    """(KVMemory, image encoder) for the memory stage."""
    from streamvqa.operators.lm.memory import KVMemory, KVMemoryConfig
    from streamvqa.operators.lm.model import DecoderAdapter
    from streamvqa.operators.serve.stages import StoreConfig
    from streamvqa.operators.vision import DEFAULT_ENCODER
    from streamvqa.operators.vision import build_encoder as build

    p = settings.pipeline
    model, tokenizer, model_id = load_language_model(p.lm_path, p.lm_dtype)
    store = dataclasses.replace(
        StoreConfig.from_settings(settings), gpu_bytes=p.kv_device_bytes, cpu_bytes=p.kv_host_bytes
    ).kv_store()
    embedder = None
    if p.text_features:
        from streamvqa.operators.lm.features import MiniLMEmbedder

        embedder = MiniLMEmbedder()
    config = KVMemoryConfig(
        window_tokens=p.window_tokens,
        block_tokens=p.block_tokens,
        retrieve_tokens=p.retrieve_tokens,
        top_k=p.top_k,
        max_new_tokens=p.max_new_tokens,
        answer_context=p.answer_context,
    )
    memory = KVMemory(
        DecoderAdapter(model, model_id=model_id), store, tokenizer=tokenizer, config=config, embedder=embedder
    )
    # the frame stage's features come from the STC-cached DINOv2-S: the plain one is its reference
    image_encoder = build(DEFAULT_ENCODER if "dinov2" in p.encoder else p.encoder)
    return memory, image_encoder


def load_language_model(path: Path | None, dtype: str = "float32"):
    """(model, tokenizer, model id): SmolLM2-135M-Instruct shipped in a package, or a local
    Hugging Face checkpoint (a text LM, or Qwen2.5-VL / LLaVA-OneVision: their language model)."""
    torch_dtype = getattr(torch, dtype)
    if path is None:
        from streamvqa.operators.lm.smollm2 import MODEL_ID, load_smollm2

        model, tokenizer = load_smollm2(dtype=torch_dtype)
        return model, tokenizer, MODEL_ID
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"pipeline.lm_path {path} is not a folder with a Hugging Face checkpoint")
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    if config.model_type in ("qwen2_5_vl", "llava_onevision"):
        from transformers import AutoModelForImageTextToText

        model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch_dtype, local_files_only=True)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model.eval(), tokenizer, f"local/{path.name}"


# -------------------------------------------------------------------------- stages
class StageFactories:
    """Picklable factories of the four stages (run on the worker, once per DoFn instance)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def _objects(self):
        return connect.object_store(self.settings, connect.resolve_endpoints(self.settings))

    def frames(self):
        from streamvqa.operators.curvature.operator import CurveStreamConfig

        from .frames import FrameStage

        p = self.settings.pipeline
        return FrameStage(
            build_encoder(self.settings),
            self.settings.topics.memory,
            store=self._objects() if p.keyframes else None,
            curvature=CurveStreamConfig(budget_tokens=p.budget_tokens),
            limits=limits_from(self.settings),
            calls=p.call_policy(),
        )

    def audio(self):
        from streamvqa.operators.audio import SpeechToText

        from .audio import AudioStage

        p = self.settings.pipeline
        return AudioStage(
            SpeechToText(),
            self.settings.topics.memory,
            progress_us=int(p.audio_progress_s * 1e6),
            limits=limits_from(self.settings),
            calls=p.call_policy(),
        )

    def queries(self):
        from .queries import QueryStage

        return QueryStage(self.settings.topics.memory, limits=limits_from(self.settings))

    def memory(self):
        from .memory import MemoryStage, MemoryStageConfig

        p = self.settings.pipeline
        settings = self.settings
        return MemoryStage(
            lambda: load_memory_models(settings),
            settings.topics.answers,
            objects=self._objects(),
            config=MemoryStageConfig(
                hold_timeout_us=int(p.hold_timeout_s * 1e6),
                image_match_threshold=p.image_match_threshold,
                expect_audio=p.speech,
            ),
            limits=limits_from(settings),
            calls=p.call_policy(),
            dead_letter_topic=settings.topics.dead_letter,
        )

    def by_topic(self) -> dict:
        t = self.settings.topics
        out = {t.frames: self.frames, t.queries: self.queries, t.memory: self.memory}
        if self.settings.pipeline.speech:
            out[t.audio] = self.audio
        return out


class SourcesEnded(RuntimeError):
    """The long-running job's sources ended: it never should (its input is unbounded; an
    end-of-stream header from a producer is a dead letter, not an end)."""


def build(pipeline: beam.Pipeline, settings: Settings, group: str = DEFAULT_GROUP) -> None:
    endpoints = connect.resolve_endpoints(settings)
    kafka = connect.kafka_config(settings, endpoints)
    p = settings.pipeline
    source = SourceConfig(  # end_markers off: no producer can end this job's input
        client=kafka,
        group_id=group,
        batch=True,
        poll_timeout_ms=20,
        max_bundle_records=64,
        max_bundle_seconds=0.5,
        idle_backoff_s=(0.01, 0.1),
        heartbeat_s=p.heartbeat_s,
    )
    task = TaskConfig(
        kafka=kafka,
        s3=endpoints.s3,
        bucket=settings.s3.bucket,
        group=group,
        output_topics=(settings.topics.memory, settings.topics.answers),
        dead_letter_topic=settings.topics.dead_letter,
        commit_interval_s=p.commit_interval_s,
        max_message_bytes=settings.limits.max_message_bytes,
    )
    factories = StageFactories(settings)
    (
        pipeline
        | "Read" >> ReadFromKafka(source, input_topics(settings))
        | "Stages" >> beam.ParDo(ExactlyOnceDoFn(task, factories.by_topic()))
    )


def run(settings: Settings, group: str = DEFAULT_GROUP) -> None:
    """Run until stopped. Returning would mean the sources ended: that is a failure
    (:class:`SourcesEnded`), never a success, for the supervisor and the CLI's exit code."""
    with beam.Pipeline(runner=make_runner(settings), options=pipeline_options(settings)) as pipeline:
        build(pipeline, settings, group)
    raise SourcesEnded(
        "the pipeline's sources ended; the main job's input is unbounded, so this is a failure"
    )


def run_supervised(
    settings: Settings,
    group: str = DEFAULT_GROUP,
    *,
    backoff_s: tuple[float, float] = (1.0, 30.0),
    attempts: int | None = None,
) -> None:
    """Run the pipeline, and run it again when it fails (the object store or the broker out, a
    worker crash), after an exponential backoff: every run resumes from the committed state of
    the exactly-once task, so an outage costs time, never data (tests/test_pipeline_faults.py).
    While it waits nothing is consumed: the inputs stay in Kafka (backpressure, not loss).
    ``attempts``: give up after this many failures in a row (None: never)."""
    low, high = backoff_s
    delay, failures = low, 0
    while True:
        started = time.monotonic()
        try:
            run(settings, group)  # returns only by raising (SourcesEnded at the least)
        except Exception as err:  # any failure of a run is retried from the committed state
            failures = 1 if time.monotonic() - started > 120 else failures + 1
            if failures == 1:
                delay = low
            reason = str(err).strip().splitlines()[-1][:300] if str(err).strip() else ""
            log.error(
                "pipeline run failed (%s: %s); run %d restarts in %.0f s",
                type(err).__name__,
                reason,
                failures + 1,
                delay,
            )
            if attempts is not None and failures >= attempts:
                raise
            time.sleep(delay)
            delay = min(high, delay * 2)
