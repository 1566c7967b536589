"""Start and stop the real ``tritonserver`` (from the serving environment) on loopback ports.

:class:`TritonServer` is what ``trellis-export serve``, the tests and the benchmark use: it picks free
ports when none are given, starts the server in its own process group with
``--model-control-mode=explicit --load-model=<serve model>``, waits until the model is ready (polling
the HTTP ``/v2/models/<name>/ready`` endpoint, which needs no client library), and stops it by its
PID (SIGTERM, then SIGKILL after a grace period).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO

from ..errors import TrellisExportError
from .env import ServingEnv, load_env
from .repo import MANIFEST, check_repository


class ServerError(TrellisExportError):
    """The server did not start, or the model did not become ready; the message carries its last error
    line and the log's path."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TritonServer:
    """One tritonserver process serving ``repo``'s model (see module doc).

    ``log``: a path for the server's stdout+stderr (default: ``<repo>/../<repo name>.server.log`` in a
    temporary file). ``check``: re-check the repository's configs before starting.
    """

    def __init__(self, repo: str | os.PathLike[str], *, grpc_port: int | None = None,
                 http_port: int | None = None, metrics_port: int | None = None,
                 env: ServingEnv | None = None, log: str | os.PathLike[str] | None = None,
                 check: bool = True, model: str | None = None, verbose: int = 0) -> None:
        self.repo = Path(repo).resolve()
        if check:
            manifest = check_repository(self.repo)
        else:
            manifest = json.loads((self.repo / MANIFEST).read_text(encoding="utf-8"))
        self.model = model or manifest["serve_model"]
        self.env = env or load_env()
        self.grpc_port = grpc_port or free_port()
        self.http_port = http_port or free_port()
        self.metrics_port = metrics_port or free_port()
        self.verbose = verbose
        self.log_path = Path(log) if log else Path(
            os.environ.get("TMPDIR", "/tmp")) / f"tritonserver-{os.getpid()}-{self.grpc_port}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_fh: IO[bytes] | None = None

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    def command(self) -> list[str]:
        return [str(self.env.tritonserver), f"--model-repository={self.repo}",
                f"--backend-directory={self.env.backend_dir}", "--model-control-mode=explicit",
                f"--load-model={self.model}", "--http-address=127.0.0.1", "--grpc-address=127.0.0.1",
                "--metrics-address=127.0.0.1", f"--http-port={self.http_port}",
                f"--grpc-port={self.grpc_port}",
                f"--metrics-port={self.metrics_port}", "--allow-metrics=true", "--allow-gpu-metrics=false",
                "--exit-on-error=true", "--strict-readiness=true", f"--log-verbose={self.verbose}",
                "--exit-timeout-secs=3"]

    def start(self, timeout: float = 60.0) -> TritonServer:
        if self.proc is not None:
            raise ServerError("server already started")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_fh = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(self.command(), stdout=self._log_fh, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=self.env.process_env(),
                                     start_new_session=True)
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def log_tail(self, lines: int = 25) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])

    def log_error(self) -> str:
        """The server's last error line (for one-line messages), or its last line."""
        tail = self.log_tail(200).splitlines()
        errs = [ln for ln in tail if ln.startswith(("error:", "E1", "E0")) or "error" in ln.lower()]
        line = (errs or tail or ["(empty log)"])[-1].strip()
        return line if len(line) <= 400 else line[:400] + " ..."

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/models/{self.model}/ready",
                                        timeout=1.0) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise ServerError(f"tritonserver exited with code {self.proc.returncode} before the model "
                                  f"was ready: {self.log_error()} (log {self.log_path})")
            if self.ready():
                return
            time.sleep(0.1)
        raise ServerError(f"model {self.model} not ready after {timeout:.0f} s: {self.log_error()} "
                          f"(log {self.log_path})")

    def stop(self, grace: float = 15.0) -> int | None:
        """SIGTERM the server (by PID), SIGKILL its process group after ``grace`` seconds."""
        proc, self.proc = self.proc, None
        rc = None
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    rc = proc.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)   # the server and its python stubs
                    except ProcessLookupError:
                        pass
                    rc = proc.wait(timeout=10)
            else:
                rc = proc.returncode
            try:                    # stubs left behind by a killed server share its process group
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None
        return rc

    def __enter__(self) -> TritonServer:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()
