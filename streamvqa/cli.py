"""The `streamvqa` command: one entry point, sub-commands per job."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from streamvqa import __version__
from streamvqa.infra.local.process import StackError
from streamvqa.settings import Settings

app = typer.Typer(help="streamvqa: streaming video question answering.", no_args_is_help=True)
services = typer.Typer(
    help="The embedded local stack: Tansu (Kafka protocol) + SeaweedFS (S3).", no_args_is_help=True
)
app.add_typer(services, name="services")
run_app = typer.Typer(
    help="Run a Beam pipeline (FnApiRunner locally; runner settings for a cluster).", no_args_is_help=True
)
app.add_typer(run_app, name="run")

from streamvqa.ask import answers_command, ask_command  # noqa: E402
from streamvqa.operators.serve.cli import serve_app  # noqa: E402
from streamvqa.produce import produce_command  # noqa: E402

app.add_typer(serve_app, name="serve")
app.command("produce")(produce_command)
app.command("ask")(ask_command)
app.command("answers")(answers_command)
console = Console()
err_console = Console(stderr=True)

DataDir = Annotated[Path | None, typer.Option("--data-dir", help="Project data folder (default: settings).")]


def _settings(data_dir: Path | None = None, **local: object) -> Settings:
    overrides: dict = {}
    if data_dir is not None:
        overrides["data_dir"] = data_dir
    try:
        settings = Settings(**overrides)
        if local:
            settings = settings.model_copy(update={"local": settings.local.model_copy(update=local)})
        return settings
    except (ValidationError, FileNotFoundError) as err:
        err_console.print(f"[red]invalid settings:[/] {err}")
        raise typer.Exit(2) from err


def _fail(err: Exception) -> typer.Exit:
    err_console.print(f"[red]error:[/] {err}")
    return typer.Exit(1)


@services.command("up")
def services_up(
    data_dir: DataDir = None,
    storage: Annotated[str | None, typer.Option(help="Broker storage: 'memory' or 's3' (durable).")] = None,
) -> None:
    """Start the stack (what is not running yet), create topics and buckets."""
    from streamvqa.infra.local.stack import LocalStack

    settings = _settings(data_dir)
    try:
        with console.status("starting SeaweedFS and Tansu"):
            state = LocalStack(settings).up(broker_storage=storage)
    except StackError as err:
        raise _fail(err) from err
    console.print(
        f"[green]up[/]: Kafka {state.bootstrap_servers} ({state.broker_storage}://), "
        f"S3 http://{state.s3_endpoint} (credentials in {settings.stack_dir / 'seaweedfs'})"
    )


@services.command("down")
def services_down(data_dir: DataDir = None) -> None:
    """Stop every process of the stack."""
    from streamvqa.infra.local.stack import LocalStack

    stopped = LocalStack(_settings(data_dir)).down()
    console.print(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")


@services.command("status")
def services_status(
    data_dir: DataDir = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Show each component; exit code 0 when all answer, 3 otherwise."""
    from streamvqa.infra.local.stack import LocalStack

    components = LocalStack(_settings(data_dir)).status()
    if as_json:
        print(json.dumps([c.__dict__ for c in components]))
    else:
        table = Table("component", "running", "pid", "port", "answering")
        for c in components:
            table.add_row(c.name, str(c.running), str(c.pid or "-"), str(c.port or "-"), str(c.answering))
        console.print(table)
    if not all(c.answering for c in components):
        raise typer.Exit(3)


@app.command()
def demo(
    data_dir: DataDir = None,
    speed: Annotated[float, typer.Option(min=0.1, help="Play the demo stream at SPEED x real time.")] = 1.0,
    scene_seconds: Annotated[float, typer.Option(min=5, help="Seconds of each of the three scenes.")] = 15.0,
    fps: Annotated[float, typer.Option(min=0.2, max=10, help="Frames per second of the demo stream.")] = 2.0,
    keep_stack: Annotated[bool, typer.Option(help="Leave a stack the demo started running.")] = False,
    report_dir: Annotated[
        Path | None, typer.Option(help="Where to write the report (default: DATA/demo/report).")
    ] = None,
) -> None:
    """The main job on the embedded default: stream a demo, ask questions, print answers, write a report."""
    from streamvqa.demo import DemoError, run_demo

    try:
        result = run_demo(
            _settings(data_dir),
            speed=speed,
            scene_s=scene_seconds,
            fps=fps,
            keep_stack=keep_stack,
            report_dir=report_dir,
            console=console,
        )
    except (StackError, FileNotFoundError, DemoError) as err:
        raise _fail(err) from err
    console.log(f"demo {'[green]ok[/]' if result.ok else '[red]incomplete[/]'} in {result.elapsed_s:.0f} s")
    if not result.ok:
        raise typer.Exit(1)


@run_app.command("passthrough")
def run_passthrough(
    input_topic: Annotated[str, typer.Option("--input", help="Topic of Frame messages to read.")],
    output_topic: Annotated[str, typer.Option("--output", help="Topic to write them to.")],
    group: Annotated[str, typer.Option(help="Consumer group / application id (names the state).")],
    data_dir: DataDir = None,
    commit_every: Annotated[int, typer.Option(min=1)] = 1000,
    commit_interval: Annotated[float, typer.Option(min=0.01)] = 1.0,
    bounded: Annotated[
        bool,
        typer.Option(
            help="End each partition at an end-of-stream marker (tests, benches). Without it the job runs "
            "until stopped and a marker is dead-lettered."
        ),
    ] = False,
) -> None:
    """Frames from one topic to another, exactly once, duplicates dropped, bad input dead-lettered."""
    from streamvqa.pipelines import passthrough

    try:
        passthrough.run(
            _settings(data_dir),
            input_topic,
            output_topic,
            group,
            commit_every=commit_every,
            commit_interval_s=commit_interval,
            bounded=bounded,
        )
    except StackError as err:
        raise _fail(err) from err


@run_app.command("pipeline")
def run_pipeline(
    group: Annotated[
        str, typer.Option(help="Consumer group / application id (names the state).")
    ] = "streamvqa",
    data_dir: DataDir = None,
    restart: Annotated[bool, typer.Option(help="Run again after a failure (outages), with backoff.")] = True,
) -> None:
    """The main job: frames, audio and questions in, answers out (runs until stopped)."""
    import logging

    from streamvqa.pipelines.video_qa import graph

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = _settings(data_dir)
    console.log(
        f"pipeline {group}: {', '.join(graph.input_topics(settings))} -> {settings.topics.answers} "
        f"on {settings.runner.name}"
    )
    try:
        graph.run_supervised(settings, group) if restart else graph.run(settings, group)
    except (StackError, graph.SourcesEnded) as err:
        raise _fail(err) from err


@app.command()
def config(data_dir: DataDir = None) -> None:
    """Print the settings in force (secrets masked)."""
    console.print_json(_settings(data_dir).model_dump_json())


@app.command()
def version() -> None:
    """Print the version."""
    console.print(__version__)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
