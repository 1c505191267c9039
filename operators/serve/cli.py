"""``streamvqa serve up|down|status``: the model stages on a private local Ray + Serve.

Registered in :mod:`streamvqa.cli` with ``app.add_typer(serve_app, name="serve")``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

serve_app = typer.Typer(
    help="Model stages on a local Ray Serve (no network access; own temp dir under the data dir).",
    no_args_is_help=True,
)
console = Console()
err_console = Console(stderr=True)

DataDir = Annotated[Path | None, typer.Option("--data-dir", help="Project data folder (default: settings).")]


def _data_dir(data_dir: Path | None) -> Path:
    if data_dir is not None:
        return data_dir
    from streamvqa.settings import Settings

    return Settings().data_dir


@serve_app.command("up")
def up(
    data_dir: DataDir = None,
    lm_model: Annotated[
        Path | None, typer.Option(help="Local folder of the LM (save_pretrained layout).")
    ] = None,
    lm_model_id: Annotated[
        str | None, typer.Option(help="Model id of its KV blocks (default: the path).")
    ] = None,
    encoder: Annotated[
        str | None, typer.Option(help="Vision encoder: a registry name or 'tiny-test'.")
    ] = None,
    encoder_path: Annotated[Path | None, typer.Option(help="Local weights of the encoder.")] = None,
    stc_interval: Annotated[
        int | None, typer.Option(help="Run the encoder with STC caches, this interval.")
    ] = None,
    replicas: Annotated[int, typer.Option(min=1, help="Replicas per deployment.")] = 1,
    num_cpus: Annotated[int, typer.Option(min=1, help="CPUs the Ray cluster offers.")] = 2,
    replica_cpus: Annotated[float, typer.Option(help="CPUs per replica.")] = 1.0,
    replica_gpus: Annotated[float, typer.Option(help="GPUs per replica.")] = 0.0,
    max_batch_size: Annotated[int, typer.Option(min=1, help="Encoder @serve.batch size.")] = 16,
    no_object_store: Annotated[
        bool, typer.Option("--no-object-store", help="Keep stream state in the replicas only.")
    ] = False,
) -> None:
    """Start Ray + Serve and deploy the stages named (nothing named: Ray + Serve only)."""
    from streamvqa.operators.serve import deployments, local
    from streamvqa.operators.serve.stages import EncoderStageConfig, LMStageConfig, StoreConfig

    directory = _data_dir(data_dir)
    store = StoreConfig()
    if not no_object_store and (lm_model is not None or encoder is not None):
        from streamvqa.settings import Settings

        settings = Settings() if data_dir is None else Settings(data_dir=data_dir)
        try:
            store = StoreConfig.from_settings(settings)
        except Exception as err:
            err_console.print(
                f"[red]error:[/] no object store for stream state ({err}); "
                "start `streamvqa services up` or pass --no-object-store"
            )
            raise typer.Exit(1) from err
    try:
        with console.status("starting Ray and Serve"):
            state = local.up(directory, num_cpus=num_cpus, num_gpus=1 if replica_gpus > 0 else 0)
            local.connect(directory)
            local.start_serve()
            deploy = deployments.DeploySettings(
                num_replicas=replicas,
                num_cpus=replica_cpus,
                num_gpus=replica_gpus,
                max_batch_size=max_batch_size,
            )
            config = deployments.ServeConfig(
                encoder=None
                if encoder is None
                else EncoderStageConfig(
                    encoder=encoder,
                    path=str(encoder_path) if encoder_path else None,
                    stc=None if stc_interval is None else {"cache_interval": stc_interval},
                    store=store,
                ),
                lm=None
                if lm_model is None
                else LMStageConfig(model_path=str(lm_model), model_id=lm_model_id, store=store),
                encoder_deploy=deploy,
                lm_deploy=deploy,
            )
            apps = deployments.deploy(config)
    except Exception as err:
        err_console.print(f"[red]error:[/] {type(err).__name__}: {err}")
        raise typer.Exit(1) from err
    console.print(
        f"[green]up[/]: Ray {state.gcs_address} (temp dir {state.temp_dir}); "
        f"apps: {', '.join(apps) or 'none'}"
    )


@serve_app.command("down")
def down(data_dir: DataDir = None) -> None:
    """Stop Serve and every Ray process this data dir's cluster started."""
    from streamvqa.operators.serve import local

    try:
        pids = local.down(_data_dir(data_dir))
    except local.ServeClusterError as err:
        err_console.print(f"[red]error:[/] {err}")
        raise typer.Exit(1) from err
    console.print(f"stopped {len(pids)} processes" if pids else "nothing was running")


@serve_app.command("status")
def status(
    data_dir: DataDir = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Whether the cluster runs, its processes and the Serve applications."""
    from streamvqa.operators.serve import local

    info = local.status(_data_dir(data_dir))
    if as_json:
        console.print_json(json.dumps(info, default=str))
        return
    if not info.get("running"):
        console.print("not running")
        return
    console.print(
        f"running: Ray {info['gcs_address']}, {len(info['pids'])} processes, temp dir {info['temp_dir']}"
    )
    for name, app in info.get("applications", {}).items():
        deps = ", ".join(f"{d} {s['status']} {s['replicas']}" for d, s in app["deployments"].items())
        console.print(f"  {name}: {app['status']} ({deps})")
    if "error" in info:
        console.print(f"  [yellow]serve status unavailable:[/] {info['error']}")
