"""A background server process owned through a pid file.

One job: start a binary detached from the caller, know whether it is still the
process we started (pid files go stale when a machine reboots or a process is
killed), wait until it is ready, and stop it completely.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path


class StackError(RuntimeError):
    """The embedded stack cannot be started, reached or stopped; the message says why."""


@dataclass(frozen=True)
class PidRecord:
    pid: int
    binary: str
    started_at: float

    def to_json(self) -> str:
        return json.dumps({"pid": self.pid, "binary": self.binary, "started_at": self.started_at})


def _cmdline(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    # Field 3 (after the parenthesised command name) is the state.
    return stat.rsplit(")", 1)[-1].split()[0] == "Z"


class ManagedProcess:
    """A server binary started in its own session, tracked by ``<name>.pid`` in ``run_dir``."""

    def __init__(self, name: str, run_dir: Path) -> None:
        self.name = name
        self.run_dir = run_dir
        self.pid_file = run_dir / f"{name}.pid"
        self.log_file = run_dir / f"{name}.log"

    # -- pid file -------------------------------------------------------------------

    def record(self) -> PidRecord | None:
        """The pid file's content, or None when there is none or it is unreadable."""
        try:
            data = json.loads(self.pid_file.read_text())
            return PidRecord(int(data["pid"]), str(data["binary"]), float(data["started_at"]))
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError):
            return PidRecord(pid=-1, binary="", started_at=0.0)  # garbage: treated as stale

    def running_pid(self) -> int | None:
        """The pid if the process in the pid file is alive and runs our binary, else None."""
        record = self.record()
        if record is None or record.pid <= 0:
            return None
        cmd = _cmdline(record.pid)
        if not cmd or cmd[0] != record.binary or _is_zombie(record.pid):
            return None
        return record.pid

    def clear_stale(self) -> bool:
        """Remove a pid file that no longer names our live process. True if one was removed."""
        if self.pid_file.exists() and self.running_pid() is None:
            self.pid_file.unlink(missing_ok=True)
            return True
        return False

    # -- lifecycle ------------------------------------------------------------------

    def start(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        umask: int | None = None,
    ) -> int:
        """Start ``argv`` detached; ``umask`` (e.g. 0o077) applies to the child only."""
        binary = argv[0]
        if not Path(binary).is_file() or not os.access(binary, os.X_OK):
            raise StackError(f"{self.name}: binary not found or not executable: {binary}")
        if self.running_pid() is not None:
            raise StackError(f"{self.name} is already running (pid file {self.pid_file})")
        self.clear_stale()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # The log may name buckets and keys: readable by this user only.
        fd = os.open(self.log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "ab") as log:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None,
                cwd=cwd,
                umask=-1 if umask is None else umask,
                start_new_session=True,  # outlives the CLI; its own process group
                close_fds=True,
            )
        self._popen = proc  # lets wait_ready notice an early exit of a child we spawned
        tmp = self.pid_file.with_suffix(".pid.tmp")
        tmp.write_text(PidRecord(proc.pid, binary, time.time()).to_json())
        tmp.replace(self.pid_file)
        return proc.pid

    def wait_ready(self, probe: Callable[[], bool], timeout_s: float, interval_s: float = 0.1) -> float:
        """Poll ``probe`` until it is true; fail fast if the process dies. Returns seconds waited."""
        start = time.monotonic()
        deadline = start + timeout_s
        popen = getattr(self, "_popen", None)
        while True:
            # Our own child: poll() is authoritative. Otherwise go by the pid file.
            code = popen.poll() if popen is not None else None
            alive = code is None if popen is not None else self.running_pid() is not None
            if not alive:
                raise StackError(
                    f"{self.name} exited during start-up (exit code {code}); "
                    f"last log lines:\n{self.log_tail()}"
                )
            try:
                if probe():
                    return time.monotonic() - start
            except Exception:
                pass
            if time.monotonic() > deadline:
                raise StackError(
                    f"{self.name} not ready after {timeout_s:.0f} s; last log lines:\n{self.log_tail()}"
                )
            time.sleep(interval_s)

    def stop(self, grace_s: float = 3.0) -> bool:
        """SIGTERM the process group, SIGKILL after ``grace_s``. True if something was stopped."""
        pid = self.running_pid()
        stopped = False
        if pid is not None:
            stopped = True
            self._signal_group(pid, signal.SIGTERM)
            deadline = time.monotonic() + grace_s
            while time.monotonic() < deadline and self._alive(pid):
                time.sleep(0.05)
            if self._alive(pid):
                self._signal_group(pid, signal.SIGKILL)
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline and self._alive(pid):
                    time.sleep(0.05)
            popen = getattr(self, "_popen", None)
            if popen is not None:
                popen.poll()  # reap our own child so it does not linger as a zombie
        self.pid_file.unlink(missing_ok=True)
        return stopped

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def _alive(self, pid: int) -> bool:
        popen = getattr(self, "_popen", None)
        if popen is not None and popen.pid == pid:
            return popen.poll() is None
        return _cmdline(pid) is not None and not _is_zombie(pid)

    @staticmethod
    def _signal_group(pid: int, sig: signal.Signals) -> None:
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        except PermissionError:
            os.kill(pid, sig)
