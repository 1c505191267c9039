"""Beam runner and options from the one settings object: the only thing a cluster changes."""

from __future__ import annotations

from apache_beam.options.pipeline_options import PipelineOptions

from streamvqa.settings import Settings


def pipeline_options(settings: Settings, streaming: bool = True) -> PipelineOptions:
    runner = settings.runner
    flags: dict = {"streaming": streaming, "save_main_session": False}
    if runner.name == "FlinkRunner":
        flags.update(
            runner="FlinkRunner",
            flink_master=runner.flink_master,
            parallelism=runner.parallelism,
            checkpointing_interval=runner.checkpointing_interval_ms,
            checkpointing_mode="EXACTLY_ONCE",
        )
    elif runner.name == "PortableRunner":
        flags.update(runner="PortableRunner", job_endpoint=runner.job_endpoint)
    return PipelineOptions.from_dictionary({k: v for k, v in flags.items() if v is not None})


def make_runner(settings: Settings):
    """The runner object for Pipeline(runner=...). FnApiRunner is named explicitly: the
    DirectRunner would first try Prism, which cannot be downloaded here."""
    if settings.runner.name == "FnApiRunner":
        from apache_beam.runners.portability.fn_api_runner import FnApiRunner

        return FnApiRunner()
    return None  # taken from the options
