"""The real Triton server (trellis-export serve): started here on free loopback ports, stopped by PID.

Skipped, with the reason, only when the serving environment was not made (`trellis-export serve
--setup`, which CI runs first) or tritonclient is missing.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TOL_SHORT, assert_rel_close, tiny_config, tiny_model

from trellis_export.runtime import open_session

try:
    import tritonclient.grpc  # noqa: F401

    from trellis_export.serving.env import ServingEnvError, load_env

    try:
        _ENV = load_env()
        _SKIP = None
    except ServingEnvError as exc:
        _ENV, _SKIP = None, f"serving environment not set up ({exc})"
except ImportError as exc:
    _ENV, _SKIP = None, f"tritonclient[grpc] not installed ({exc}); pip install 'trellis-export[serve]'"

pytestmark = pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")

IDLE = 3.0          # the pool's idle timeout in the test repository (Triton's: twice that)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    """(repo, onnx path, running TritonServer) for a tiny vocab-128 model."""
    from trellis_export.export import export_onnx
    from trellis_export.serving.repo import RepoOptions, write_repository
    from trellis_export.serving.server import TritonServer

    tmp = tmp_path_factory.mktemp("serving")
    model = tiny_model(tiny_config(vocab_size=128), dtype=torch.float32)
    onnx_path = tmp / "tiny.onnx"
    export_onnx(model, onnx_path)
    repo = tmp / "repo"
    write_repository(onnx_path, repo, RepoOptions(max_sequences=16, max_batch_size=8, idle_seconds=IDLE,
                                                  ort_threads=1, gpu=False))
    server = TritonServer(repo, env=_ENV, log=tmp / "server.log")
    server.start(timeout=90)
    try:
        yield repo, onnx_path, server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def ort(served):
    return open_session("ort", model_path=served[1], threads=1)


def _client(server, timeout: float = 20.0):
    from trellis_export.serving.client import StreamClient

    return StreamClient(server.grpc_url, timeout=timeout)


def _reference(ort, ids: np.ndarray, pieces: list[int]) -> np.ndarray:
    state, out, pos = ort.init_state(1), [], 0
    for n in pieces:
        logits, state = ort.step(ids[None, pos:pos + n], state)
        out.append(logits[0])
        pos += n
    return np.concatenate(out)


def _pieces(rng: np.random.Generator, total: int) -> list[int]:
    first = int(rng.integers(1, min(total, 12) + 1))        # the prefill
    out, left = [first], total - first
    while left:
        n = 1 if rng.random() < 0.7 else int(rng.integers(1, min(left, 5) + 1))
        n = min(n, left)
        out.append(n)
        left -= n
    return out


def test_8_concurrent_sequences_equal_direct_onnxruntime(served, ort) -> None:
    _, _, server = served
    rng = np.random.default_rng(0)
    jobs = []
    for i in range(8):
        ids = rng.integers(0, 128, size=int(rng.integers(8, 40)), dtype=np.int64)
        jobs.append((1000 + i, ids, _pieces(rng, len(ids))))
    got: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def run(seq: int, ids: np.ndarray, pieces: list[int]) -> None:
        try:
            with _client(server) as c:
                barrier.wait(timeout=30)
                out, pos = [], 0
                for k, n in enumerate(pieces):
                    out.append(c.step(seq, ids[pos:pos + n], start=k == 0, end=k == len(pieces) - 1))
                    pos += n
                got[seq] = np.concatenate(out)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    for seq, ids, pieces in jobs:
        assert got[seq].shape == (len(ids), 128)
        assert_rel_close(got[seq], _reference(ort, ids, pieces), TOL_SHORT, f"sequence {seq}")


def test_request_without_start_refused_and_end_frees(served, ort) -> None:
    from trellis_export.serving.client import StreamError

    with _client(served[2]) as c:
        with pytest.raises(StreamError, match="no state"):
            c.step(2001, [1, 2, 3])
        c.step(2002, [5, 6], start=True)
        c.step(2002, [7], end=True)
        with pytest.raises(StreamError, match="no state"):      # END freed it
            c.step(2002, [8])
        # START on a live sequence starts it again from scratch
        c.step(2003, [9, 9, 9], start=True)
        again = c.step(2003, [4, 5], start=True, end=True)
        assert_rel_close(again, _reference(ort, np.array([4, 5]), [2]), TOL_SHORT, "restarted")


def test_expired_sequence_refused_clearly(served) -> None:
    from trellis_export.serving.client import StreamError

    with _client(served[2]) as c:
        c.step(3001, [1, 2], start=True)
        time.sleep(IDLE + 0.7)
        with pytest.raises(StreamError, match="expired"):
            c.step(3001, [3])


def test_bad_requests_refused_without_disturbing_others(served, ort) -> None:
    from trellis_export.serving.client import StreamError

    rng = np.random.default_rng(1)
    ids = rng.integers(0, 128, size=30, dtype=np.int64)
    out: list[np.ndarray] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def good() -> None:        # a sequence stepping token by token while the bad requests arrive
        try:
            with _client(served[2]) as c:
                out.append(c.step(4000, ids[:1], start=True))
                for t in range(1, len(ids)):
                    out.append(c.step(4000, ids[t:t + 1], end=t == len(ids) - 1))
                    time.sleep(0.005)
        except BaseException as exc:  # pragma: no cover
            errors.append(exc)
        finally:
            stop.set()

    th = threading.Thread(target=good)
    th.start()
    with _client(served[2]) as c:
        seen = {}
        for k in range(3):
            seq = 4100 + k
            with pytest.raises(StreamError, match=r"vocab|\[0, 128\)") as e1:
                c.step(seq, [3, 200], start=True)                           # out of vocabulary
            with pytest.raises(StreamError, match="(?i)data-type|dtype|INT32") as e2:
                c.step(seq, [3, 4], start=True, dtype=np.int32)             # wrong dtype
            with pytest.raises(StreamError, match="(?i)shape") as e3:
                c.step(seq, [[[3, 4]]], start=True)                         # wrong rank
            with pytest.raises(StreamError, match="(?i)data-type|FP32|dtype"):
                c.step(seq, [3.0, 4.0], start=True, dtype=np.float32)
            seen.update(oov=str(e1.value), dtype=str(e2.value), shape=str(e3.value))
        # a sequence refused at START has no state (not even an older one); it can start again properly
        c.step(4200, [5, 6], start=True)
        with pytest.raises(StreamError, match="vocab|128"):
            c.step(4200, [300], start=True)
        with pytest.raises(StreamError, match="no state"):
            c.step(4200, [7])
        assert c.step(4200, [3, 4], start=True, end=True).shape == (2, 128)
        with pytest.raises(StreamError, match="no state"):
            c.step(4100, [7])
        assert c.step(4100, [3, 4], start=True, end=True).shape == (2, 128)
    th.join(timeout=120)
    assert not errors, errors
    assert_rel_close(np.concatenate(out), _reference(ort, ids, [1] * len(ids)), TOL_SHORT, "good sequence")


def test_server_restart_mid_sequence_gives_clear_error(served, tmp_path: Path) -> None:
    from trellis_export.serving.client import StreamError
    from trellis_export.serving.server import TritonServer

    repo = served[0]
    server = TritonServer(repo, env=_ENV, log=tmp_path / "a.log", check=False).start(timeout=90)
    ports = dict(grpc_port=server.grpc_port, http_port=server.http_port, metrics_port=server.metrics_port)
    second = None
    try:
        with _client(server, timeout=10.0) as c:
            c.step(5001, [1, 2, 3], start=True)
            server.stop()
            t0 = time.monotonic()
            with pytest.raises(StreamError, match="unreachable|did not answer"):
                c.step(5001, [4])
            assert time.monotonic() - t0 < 15, "a dead server must not hang the client"
            second = TritonServer(repo, env=_ENV, log=tmp_path / "b.log", check=False, **ports)
            second.start(timeout=90)
            deadline = time.monotonic() + 15        # the client's channel reconnects within ~1 s
            while True:
                with pytest.raises(StreamError) as err:
                    c.step(5001, [4])
                if "unreachable" not in str(err.value) or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            assert re.search("no state.*restarted", str(err.value)), str(err.value)
            assert c.step(5001, [4], start=True, end=True).shape == (1, 128)
    finally:
        server.stop()
        if second is not None:
            second.stop()


def test_cli_serve_and_stream(served, tmp_path: Path) -> None:
    """`trellis-export serve REPO` in the foreground: ready line, `stream` against it, SIGTERM stops it."""
    from trellis_export.serving.server import free_port

    repo = served[0]
    port = free_port()
    cmd = [sys.executable, "-m", "trellis_export.cli.main", "serve", str(repo), "--grpc-port", str(port),
           "--http-port", "0", "--metrics-port", "0", "--log", str(tmp_path / "serve.log")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()            # the ready line (or EOF if the server failed)
        assert "ready" in line and f"127.0.0.1:{port}" in line, (line, proc.stderr.read() if
                                                                 proc.poll() is not None else "")
        res = subprocess.run([sys.executable, "-m", "trellis_export.cli.main", "stream", "--url",
                              f"127.0.0.1:{port}", "-n", "5", "--ids", "--json", "ab"],
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        lines = res.stdout.strip().splitlines()
        assert len(lines[0].split()) == 5                     # five token ids
        assert '"decode_requests": 4' in lines[-1]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:  # pragma: no cover
            proc.kill()
            rc = proc.wait()
    assert rc == 0, proc.stderr.read()


def test_cli_serve_port_in_use_is_one_error_line(served, tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        res = subprocess.run([sys.executable, "-m", "trellis_export.cli.main", "serve", str(served[0]),
                              "--grpc-port", str(port), "--http-port", "0", "--metrics-port", "0",
                              "--log", str(tmp_path / "busy.log")],
                             capture_output=True, text=True, timeout=120)
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error: ")]
    assert res.returncode == 1 and len(errors) == 1, res.stderr
    assert "already in use" in errors[0] and "Traceback" not in res.stderr
