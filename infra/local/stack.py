"""The embedded local stack: SeaweedFS (S3) + Tansu (Kafka protocol) on loopback.

``LocalStack(settings).up()`` starts what is not running, waits until each part
answers, creates buckets and topics (idempotent) and records the ports in
``<data_dir>/stack/state.json`` so that every client on the machine finds them.
``down()`` stops everything it started; ``status()`` reports without changing anything.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from streamvqa.settings import Settings
from streamvqa.storage.object_store import ObjectStore, S3Endpoint

from . import seaweedfs, tansu
from .ports import LOOPBACK, can_connect, free_ports, port_is_free
from .process import ManagedProcess, StackError

BROKER_BUCKET = "streamvqa-broker"
STATE_FILE = "state.json"


@dataclass
class StackState:
    """What clients need to reach the embedded stack. Credentials stay in the data folder."""

    broker_port: int
    broker_storage: str
    s3_ports: list[int]
    started_at: float = field(default_factory=time.time)

    @property
    def bootstrap_servers(self) -> str:
        return f"{LOOPBACK}:{self.broker_port}"

    @property
    def s3_port(self) -> int:
        return seaweedfs.SeaweedPorts.from_list(self.s3_ports).s3

    @property
    def s3_endpoint(self) -> str:
        return f"{LOOPBACK}:{self.s3_port}"


@dataclass(frozen=True)
class ComponentStatus:
    name: str
    running: bool
    pid: int | None
    port: int | None
    answering: bool


def read_state(stack_dir: Path) -> StackState | None:
    try:
        return StackState(**json.loads((stack_dir / STATE_FILE).read_text()))
    except FileNotFoundError:
        return None
    except (ValueError, TypeError) as err:
        raise StackError(f"unreadable stack state {stack_dir / STATE_FILE}: {err}") from err


def s3_endpoint_for(stack_dir: Path, s3_port: int, region: str = "us-east-1") -> S3Endpoint:
    """The embedded store's endpoint, with the credentials kept in its data folder."""
    creds = seaweedfs.ensure_credentials(stack_dir / "seaweedfs")
    return S3Endpoint(f"{LOOPBACK}:{s3_port}", creds.access_key, creds.secret_key, region=region)


class LocalStack:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.dir = settings.stack_dir.resolve()
        self.s3_dir = self.dir / "seaweedfs"
        self.s3 = ManagedProcess("seaweedfs", self.dir)
        self.broker = ManagedProcess("tansu", self.dir)

    # -- bring-up -------------------------------------------------------------------

    def up(self, broker_storage: str | None = None) -> StackState:
        storage = broker_storage or self.settings.local.broker_storage
        if storage not in ("memory", "s3"):
            raise StackError(f"broker storage must be 'memory' or 's3', not {storage!r}")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.s3.clear_stale()
        self.broker.clear_stale()
        previous = read_state(self.dir)
        timeout = self.settings.local.start_timeout_s

        if (
            previous is not None
            and self.broker.running_pid() is not None
            and previous.broker_storage != storage
        ):
            raise StackError(
                f"the broker is running with {previous.broker_storage}:// storage; "
                f"run `streamvqa services down` before switching to {storage}://"
            )

        s3_ports = self._s3_ports(previous)
        endpoint = s3_endpoint_for(self.dir, s3_ports.s3, self.settings.s3.region)
        store = ObjectStore(endpoint, self.settings.s3.bucket, client=endpoint.client(attempts=1))
        if self.s3.running_pid() is None:
            creds = seaweedfs.ensure_credentials(self.s3_dir)
            self.s3.start(
                seaweedfs.command(self.s3_dir, s3_ports, creds), cwd=self.s3_dir, umask=seaweedfs.UMASK
            )
            self.s3.wait_ready(lambda: store.list_buckets() is not None, timeout)
        buckets = [self.settings.s3.bucket] + ([BROKER_BUCKET] if storage == "s3" else [])
        for bucket in buckets:
            self._retry(lambda b=bucket: store.create_bucket(b), timeout, what=f"create bucket {bucket}")
        # SeaweedFS allocates a bucket's volume on its first write (~0.2 s): ready means ready to write
        self._retry(lambda: store.put(".stack/ready", b"1"), timeout, what="first write")

        broker_port = self._broker_port(previous)
        state = StackState(broker_port, storage, s3_ports.as_list())
        self._write_state(state)
        if self.broker.running_pid() is None:
            if storage == "s3":
                url = f"s3://{BROKER_BUCKET}/"
                env = tansu.environment(
                    endpoint.endpoint, endpoint.access_key, endpoint.secret_key, endpoint.region
                )
            else:
                url = "memory://tansu/"
                env = tansu.environment()
            self.broker.start(tansu.command(broker_port, url), env=env, cwd=self.dir)
            self.broker.wait_ready(lambda: can_connect(broker_port), timeout)
        self._retry(lambda: self._ensure_topics(state), timeout, what="create topics")
        # SeaweedFS sets each new volume's .vif (volume info, no object data) to 0644 itself,
        # whatever the umask: tighten the ones the buckets' first writes just allocated.
        seaweedfs.secure_data_dir(self.s3_dir)
        return state

    def _ensure_topics(self, state: StackState) -> list[str]:
        from kafka.admin import KafkaAdminClient

        from streamvqa.infra.provision import ensure_topics

        admin = KafkaAdminClient(
            bootstrap_servers=state.bootstrap_servers,
            client_id="streamvqa-stack",
            request_timeout_ms=10_000,
        )
        try:
            return ensure_topics(admin, self.settings.topics)
        finally:
            admin.close()

    @staticmethod
    def _retry(action, timeout_s: float, what: str):
        deadline = time.monotonic() + timeout_s
        delay = 0.1
        while True:
            try:
                return action()
            except Exception as err:
                if time.monotonic() + delay > deadline:
                    raise StackError(f"{what} failed after {timeout_s:.0f} s: {err}") from err
                time.sleep(delay)
                delay = min(delay * 2, 2.0)

    # -- ports ----------------------------------------------------------------------

    def _s3_ports(self, previous: StackState | None) -> seaweedfs.SeaweedPorts:
        if self.s3.running_pid() is not None:
            if previous is None:
                raise StackError(f"SeaweedFS runs (pid file {self.s3.pid_file}) but {STATE_FILE} is missing")
            return seaweedfs.SeaweedPorts.from_list(previous.s3_ports)
        wanted = self.settings.local.s3_port
        if wanted:
            if not port_is_free(wanted):
                raise StackError(
                    f"port {wanted} for the S3 server is taken on {LOOPBACK}; "
                    "set STREAMVQA_LOCAL__S3_PORT to another port, or 0 for any free one"
                )
            others = free_ports(seaweedfs.PORT_COUNT - 1, avoid={wanted})
            return seaweedfs.SeaweedPorts.from_list([*others[:6], wanted, *others[6:]])
        # Keep a durable store's endpoint stable across restarts when its ports are free.
        if previous is not None and all(port_is_free(p) for p in previous.s3_ports):
            return seaweedfs.SeaweedPorts.from_list(previous.s3_ports)
        return seaweedfs.SeaweedPorts.from_list(free_ports(seaweedfs.PORT_COUNT))

    def _broker_port(self, previous: StackState | None) -> int:
        if self.broker.running_pid() is not None and previous is not None:
            return previous.broker_port
        wanted = self.settings.local.broker_port
        if wanted:
            if not port_is_free(wanted):
                raise StackError(
                    f"port {wanted} for the Kafka broker is taken on {LOOPBACK}; "
                    "set STREAMVQA_LOCAL__BROKER_PORT to another port, or 0 for any free one"
                )
            return wanted
        if previous is not None and port_is_free(previous.broker_port):
            return previous.broker_port
        return free_ports(1)[0]

    def _write_state(self, state: StackState) -> None:
        tmp = self.dir / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(asdict(state)))
        tmp.replace(self.dir / STATE_FILE)

    # -- status and shutdown --------------------------------------------------------

    def state(self) -> StackState | None:
        return read_state(self.dir)

    def status(self) -> list[ComponentStatus]:
        state = self.state()
        result = []
        for proc, port in (
            (self.s3, state.s3_port if state else None),
            (self.broker, state.broker_port if state else None),
        ):
            pid = proc.running_pid()
            answering = pid is not None and port is not None and can_connect(port)
            result.append(ComponentStatus(proc.name, pid is not None, pid, port, answering))
        return result

    def is_up(self) -> bool:
        return all(component.answering for component in self.status())

    def down(self) -> list[str]:
        """Stop the broker, then the store. Returns the names of what was stopped."""
        stopped = [proc.name for proc in (self.broker, self.s3) if proc.stop(grace_s=1.5)]
        state = self.state()
        if "seaweedfs" in stopped and state is not None:
            seaweedfs.remove_grpc_sockets(seaweedfs.SeaweedPorts.from_list(state.s3_ports))
        return stopped
