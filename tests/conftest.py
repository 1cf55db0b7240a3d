"""Shared test helpers: free ports, starting real processes, waiting for readiness, cleanup.

Use `ProcessGroup` directly for any fixture scope, or the `procs` (per test) and
`module_procs` (per module) fixtures, which stop everything they started on teardown.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_status(url: str, timeout: float = 1.0) -> int | None:
    """Status of a GET, or None when nothing answered."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)
    except (OSError, ValueError):
        return None


def wait_http(url: str, timeout: float = 20.0, status: int = 200, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Poll `url` until it answers `status`; fail early if `proc` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} was ready")
        if http_status(url, timeout=1.0) == status:
            return
        time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer {status} within {timeout}s")


class Proc:
    """A started process, its log file and (when it serves HTTP) its base URL."""

    def __init__(self, popen: subprocess.Popen[bytes], log: Path, url: str = "") -> None:
        self.popen = popen
        self.log = log
        self.url = url

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            self.popen.send_signal(sig)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after `timeout`; returns the exit code."""
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.popen.returncode

    def kill(self) -> None:
        """SIGKILL the process and anything it started (its own process group, even if it already exited)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(5)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


class ProcessGroup:
    """Starts processes in their own sessions, logs to files, and stops them all on `close()`."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: list[Proc] = []

    def start(
        self,
        argv: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        name: str = "proc",
        url: str = "",
        ready_path: str | None = None,
        timeout: float = 30.0,
    ) -> Proc:
        """Start `argv` (cwd = repo root); with `ready_path`, wait until GET url+ready_path is 200."""
        log = self.log_dir / f"{name}-{len(self.procs)}.log"
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        with open(log, "wb") as out:
            popen = subprocess.Popen(
                list(argv), cwd=REPO_ROOT, env=full_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        proc = Proc(popen, log, url)
        self.procs.append(proc)
        if ready_path is not None:
            try:
                wait_http(url + ready_path, timeout=timeout, proc=popen)
            except (TimeoutError, RuntimeError) as e:
                raise RuntimeError(f"{name} not ready: {e}\n--- log ---\n{proc.log_text()[-4000:]}") from None
        return proc

    def close(self) -> None:
        for p in reversed(self.procs):
            p.stop(timeout=5.0)
            p.kill()  # whatever it left behind in its group
        self.procs.clear()


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[ProcessGroup]:
    """Processes started by one test, stopped when it ends."""
    group = ProcessGroup(tmp_path)
    try:
        yield group
    finally:
        group.close()


@pytest.fixture(scope="module")
def module_procs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProcessGroup]:
    """Processes shared by the tests of one module, stopped after its last test."""
    group = ProcessGroup(tmp_path_factory.mktemp("procs"))
    try:
        yield group
    finally:
        group.close()
