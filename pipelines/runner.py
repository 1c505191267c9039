"""Beam runner and options from the one settings object: the only thing a cluster changes.

On Flink (``FlinkRunner``, or ``PortableRunner`` submitting to the Beam Flink job server) the
runner section becomes Beam's Flink options. Only ``flink_master`` and ``parallelism`` /
``max_parallelism`` are declared by the Python SDK (``FlinkRunnerOptions``); the checkpointing
and state-backend options are the Java ``FlinkPipelineOptions`` (``checkpointingInterval`` ->
``--checkpointing_interval``, ``checkpointingMode``, ``stateBackend``,
``stateBackendStoragePath``, ...) that the job server describes to the SDK at submission.
"""

from __future__ import annotations

from apache_beam.options.pipeline_options import PipelineOptions

from streamvqa.settings import RunnerSettings, Settings


def flink_flags(runner: RunnerSettings) -> dict:
    """Beam's Flink pipeline options (flag name without ``--`` -> value) for a runner section."""
    flags: dict = {
        "parallelism": runner.parallelism,
        "max_parallelism": runner.max_parallelism,
        "checkpointing_interval": runner.checkpointing_interval_ms,
        "checkpointing_mode": runner.checkpointing_mode,
        "checkpoint_timeout_millis": runner.checkpoint_timeout_ms,
        "min_pause_between_checkpoints": runner.min_pause_between_checkpoints_ms,
        "state_backend": runner.state_backend,
        "state_backend_storage_path": runner.state_backend_storage_path,
        "environment_type": runner.environment_type,
        "environment_config": runner.environment_config,
    }
    if runner.externalized_checkpoints:
        flags.update(
            externalized_checkpoints_enabled=True, retain_externalized_checkpoints_on_cancellation=True
        )
    return {k: v for k, v in flags.items() if v is not None}


def pipeline_options(settings: Settings, streaming: bool = True) -> PipelineOptions:
    runner = settings.runner
    flags: dict = {"streaming": streaming, "save_main_session": False}
    if runner.name == "FlinkRunner":
        flags.update(runner="FlinkRunner", flink_master=runner.flink_master, **flink_flags(runner))
    elif runner.name == "PortableRunner":
        flags.update(runner="PortableRunner", job_endpoint=runner.job_endpoint, **flink_flags(runner))
    return PipelineOptions.from_dictionary({k: v for k, v in flags.items() if v is not None})


def make_runner(settings: Settings):
    """The runner object for Pipeline(runner=...). FnApiRunner is named explicitly: the
    DirectRunner would first try Prism, which cannot be downloaded here."""
    if settings.runner.name == "FnApiRunner":
        from apache_beam.runners.portability.fn_api_runner import FnApiRunner

        return FnApiRunner()
    return None  # taken from the options
