"""A private local Ray + Serve for the model stages: no network access, its own temp dir,
stopped completely.

``up()`` runs ``ray start --head --block`` in a new process group with:

- ``RAY_USAGE_STATS_ENABLED=0`` and ``--disable-usage-stats`` (no usage reports);
- ``HOME`` pointing at a folder holding ``ray_bootstrap_config.yaml`` with
  ``provider: {type: local}`` (otherwise Ray probes cloud metadata addresses) and
  ``--include-dashboard=false``;
- ``RAY_AUTH_MODE=disabled``: Ray 2.60 turns token authentication on by default; this cluster
  binds to 127.0.0.1 only, so it runs without tokens. On a shared or multi-host cluster leave
  token auth on (``RAY_AUTH_MODE=token``, token in ``RAY_AUTH_TOKEN``) and give the same
  settings to every client (the Beam workers calling the deployments);
- its own ``--temp-dir`` (sessions, logs, sockets) under the data dir, or under /tmp when that
  path is too long for Unix socket names;
- GCS, client-server and dashboard-agent ports picked free on 127.0.0.1.

Serve replicas still open a gRPC server on all interfaces with a random port (Ray does not make
it configurable). Serve runs without an HTTP proxy (callers use deployment handles).

``down()`` shuts Serve down, kills the process group and then any process still naming the temp
dir in its command line (by pid), and checks that none is left.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

NAMESPACE = "streamvqa"
_MAX_TEMP_DIR_CHARS = 38  # Ray's socket paths under <temp>/session_*/sockets must fit in 107 bytes


class ServeClusterError(RuntimeError):
    """The local Ray cluster could not be started, reached or stopped."""


@dataclass(frozen=True)
class ClusterState:
    gcs_address: str
    pid: int  # the `ray start --block` process; its process group holds the cluster
    temp_dir: str
    home: str
    num_cpus: int
    started_at: float

    @property
    def alive(self) -> bool:
        return _alive(self.pid)


def serve_dir(data_dir: Path) -> Path:
    return Path(data_dir) / "serve"


def state_file(data_dir: Path) -> Path:
    return serve_dir(data_dir) / "state.json"


def read_state(data_dir: Path) -> ClusterState | None:
    path = state_file(data_dir)
    if not path.is_file():
        return None
    return ClusterState(**json.loads(path.read_text()))


def ray_env(home: Path | None = None) -> dict[str, str]:
    """Environment for Ray processes and for clients of this cluster (no stats, no token auth)."""
    env = {
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "disabled",
        "RAY_DEDUP_LOGS": "0",
    }
    if home is not None:
        env["HOME"] = str(home)
    return env


def client_env() -> None:
    """Set the client-side variables in this process (before ``ray.init``)."""
    os.environ.update(ray_env())


def _temp_dir(data_dir: Path) -> Path:
    wanted = serve_dir(data_dir).resolve() / "ray"
    if len(str(wanted)) <= _MAX_TEMP_DIR_CHARS:
        return wanted
    digest = hashlib.sha256(str(wanted).encode()).hexdigest()[:10]
    return Path("/tmp") / f"svqa-ray-{digest}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):
        status = Path(f"/proc/{pid}/stat").read_text().split()[2]
        return status != "Z"
    return True


def _ray_script() -> str:
    return str(Path(sys.executable).with_name("ray"))


def up(data_dir: Path, *, num_cpus: int = 2, num_gpus: int = 0, timeout_s: float = 90.0) -> ClusterState:
    """Start the cluster (or return the running one)."""
    existing = read_state(data_dir)
    if existing is not None and existing.alive:
        return existing
    sdir = serve_dir(data_dir)
    sdir.mkdir(parents=True, exist_ok=True)
    home = sdir / "home"
    home.mkdir(exist_ok=True)
    (home / "ray_bootstrap_config.yaml").write_text("provider:\n  type: local\n")
    temp_dir = _temp_dir(data_dir)
    temp_dir.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    cmd = [
        _ray_script(),
        "start",
        "--head",
        "--block",
        f"--port={port}",
        "--node-ip-address=127.0.0.1",
        f"--temp-dir={temp_dir}",
        f"--num-cpus={num_cpus}",
        f"--num-gpus={num_gpus}",
        "--include-dashboard=false",
        "--disable-usage-stats",
        f"--ray-client-server-port={_free_port()}",
        f"--dashboard-agent-listen-port={_free_port()}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={_free_port()}",
    ]
    log_path = sdir / "ray-start.log"
    env = {**os.environ, **ray_env(home)}
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(
            cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=sdir
        )
    state = ClusterState(f"127.0.0.1:{port}", proc.pid, str(temp_dir), str(home), num_cpus, time.time())
    state_file(data_dir).write_text(json.dumps(asdict(state)))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            down(data_dir)
            raise ServeClusterError(f"ray start exited with {proc.returncode}; see {log_path}")
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0 and _raylet_up(temp_dir):
                return state
        time.sleep(0.3)
    down(data_dir)
    raise ServeClusterError(f"the Ray cluster did not come up within {timeout_s} s; see {log_path}")


def _raylet_up(temp_dir: Path) -> bool:
    return any(p for p in temp_dir.glob("session_*/sockets/raylet*"))


def connect(data_dir: Path | None = None, address: str | None = None) -> None:
    """Connect this process to the cluster (as a client driver) if it is not connected."""
    import ray

    if ray.is_initialized():
        return
    if address is None:
        state = read_state(data_dir) if data_dir is not None else None
        if state is None or not state.alive:
            raise ServeClusterError(
                f"no local Serve cluster is running under {data_dir}: run `streamvqa serve up`"
            )
        address = state.gcs_address
    client_env()
    ray.init(address=address, namespace=NAMESPACE, log_to_driver=False, logging_level="ERROR")


def start_serve() -> None:
    """Start Serve on the connected cluster (no HTTP proxy: callers use handles)."""
    from ray import serve

    serve.start(proxy_location="Disabled")


def our_pids(state: ClusterState) -> list[int]:
    """Live processes of this cluster: the process group of ``ray start``, its descendants, and any
    process whose command line names the temp dir or whose environment has the cluster's HOME
    (Ray workers rename themselves ``ray::...`` but inherit the environment)."""
    me = os.getpid()
    temp_dir, home = state.temp_dir.encode(), f"HOME={state.home}".encode()
    parents: dict[int, int] = {}
    found: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        pid = int(entry.name)
        try:
            parents[pid] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if os.getpgid(pid) == state.pid or temp_dir in (entry / "cmdline").read_bytes():
                found.add(pid)
            elif home in (entry / "environ").read_bytes().split(b"\0"):
                found.add(pid)
        except (OSError, ProcessLookupError, IndexError, ValueError):
            continue
    for pid in parents:  # descendants of `ray start`
        seen, at = set(), pid
        while at in parents and at not in seen and at > 1:
            if at == state.pid:
                found.add(pid)
                break
            seen.add(at)
            at = parents[at]
    return sorted(p for p in found if _alive(p))


def down(data_dir: Path, *, timeout_s: float = 20.0) -> list[int]:
    """Stop Serve and every process of the cluster; returns the pids that were stopped."""
    state = read_state(data_dir)
    if state is None:
        return []
    import ray

    if ray.is_initialized():
        with contextlib.suppress(Exception):
            from ray import serve

            serve.shutdown()
        ray.shutdown()
    known = set(our_pids(state))  # kept: a worker orphaned by its raylet no longer descends from it
    for sig, wait_s in ((signal.SIGTERM, timeout_s / 4), (signal.SIGKILL, timeout_s / 2)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(state.pid, sig)
        known |= set(our_pids(state))
        for pid in known:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and [p for p in known if _alive(p)]:
            time.sleep(0.2)
            known |= set(our_pids(state))
        if not [p for p in known if _alive(p)]:
            break
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(state.pid, 0)  # reap `ray start` when this process started it
    left = sorted({p for p in known if _alive(p)} | set(our_pids(state)))
    if left:
        raise ServeClusterError(f"Ray processes still running after down(): {left}")
    state_file(data_dir).unlink(missing_ok=True)
    temp_dir = Path(state.temp_dir)
    if serve_dir(data_dir).resolve() not in temp_dir.parents:  # the /tmp fallback: nobody else cleans it
        shutil.rmtree(temp_dir, ignore_errors=True)
    return sorted(known)


def status(data_dir: Path) -> dict:
    """What runs: the cluster's address and pids, and (when reachable) the Serve apps' status."""
    state = read_state(data_dir)
    if state is None:
        return {"running": False}
    out: dict = {"running": state.alive, **asdict(state), "pids": our_pids(state)}
    if not state.alive:
        return out
    try:
        connect(data_dir)
        from ray import serve

        apps = serve.status().applications
        out["applications"] = {
            name: {
                "status": str(app.status),
                "deployments": {
                    d: {"status": str(s.status), "replicas": dict(s.replica_states)}
                    for d, s in app.deployments.items()
                },
            }
            for name, app in apps.items()
        }
    except Exception as err:  # status must report, not fail
        out["error"] = f"{type(err).__name__}: {err}"
    return out
