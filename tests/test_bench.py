"""``trellis-export bench`` and the KV-cache baseline: parsing, statistics, a tiny end-to-end run, the
unavailable-backend reports, and the baseline's correctness (ORT == PyTorch, streaming == one call).

No timing is asserted anywhere: the bench's numbers are measured, never checked against a speed.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import TOL_SHORT, assert_rel_close, random_ids
from trellis_export.cli.bench import bench as bench_cmd
from trellis_export.cli.main import main

from trellis_export.baseline import (
    BaselineError,
    KVCacheLM,
    kv_state_bytes_per_stream,
    kv_state_names,
    kv_state_shapes,
)
from trellis_export.bench.backends import check_backend
from trellis_export.bench.parse import Amount, parse_amount, parse_size, parse_size_list, split_choices
from trellis_export.bench.run import KV, TRELLIS, BenchSettings, aims, build_subjects, crossover, onnx_model
from trellis_export.bench.stats import latency_stats, time_calls
from trellis_export.config import TrellisConfig
from trellis_export.state import state_bytes_per_stream

#: Odd shapes of the house rules: H = 3, d = 5 (odd: RoPE leaves the last channel), m = 7, C = 4.
TINY = TrellisConfig(vocab_size=37, d_model=12, n_layers=2, n_heads=3, head_dim=5, n_slots=7, chunk_size=4,
                     ffn_dim=20)
SEED = 0


# ----------------------------------------------------------------------------- parsing
@pytest.mark.parametrize("text, value", [("256", 256), ("1k", 1024), ("8k", 8192), ("64K", 65536),
                                         (" 2k ", 2048), ("1m", 1024 * 1024), ("7", 7)])
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "k", "1.5k", "-1", "1g", "abc", "0", "1,2"])
def test_parse_size_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


def test_parse_lists_and_amounts() -> None:
    assert parse_size_list("64k,1k,8k,1024") == [1024, 8192, 65536]
    assert split_choices(("torch,ort", "trt", "ORT"), ("torch", "ort", "triton", "trt")) == ["torch", "ort",
                                                                                             "trt"]
    assert parse_amount("0.5") == Amount(seconds=0.5)
    assert parse_amount("200ms") == Amount(seconds=0.2)
    assert parse_amount("2s") == Amount(seconds=2.0)
    assert parse_amount("10it") == Amount(iterations=10)
    for bad in ("", "fast", "1.5it", "-1"):
        with pytest.raises(ValueError):
            parse_amount(bad)


def test_cli_parses_flags_without_running() -> None:
    ctx = bench_cmd.make_context("bench", ["--context", "1k,8k,64k", "--slots", "16,32", "--batch", "1,8",
                                           "--backend", "torch,ort", "--backend", "trt", "--warmup", "5it",
                                           "--duration", "500ms", "--prefill-len", "64"])
    p = ctx.params
    assert p["contexts"] == [1024, 8192, 65536]
    assert p["slots"] == [16, 32]
    assert p["batches"] == [1, 8]
    assert p["backends"] == ["torch", "ort", "trt"]
    assert p["warmup"] == Amount(iterations=5)
    assert p["duration"] == pytest.approx(0.5)
    assert p["prefill_len"] == 64


@pytest.mark.parametrize("args, flag", [
    (["--context", "1x"], "--context"),
    (["--context", ""], "--context"),
    (["--slots", "abc"], "--slots"),
    (["--batch", "0"], "--batch"),
    (["--backend", "cuda"], "--backend"),
    (["--warmup", "soon"], "--warmup"),
    (["--duration", "5it"], "--duration"),
    (["--iterations", "0"], "--iterations"),
    (["--prefill-len", "-3"], "--prefill-len"),
])
def test_cli_bad_values_name_the_flag(args: list[str], flag: str) -> None:
    res = CliRunner().invoke(main, ["bench", *args])
    assert res.exit_code == 2, res.output
    assert f"Invalid value for '{flag}'" in res.output
    assert "Traceback" not in res.output


# ----------------------------------------------------------------------------- statistics
def test_latency_stats_on_an_arithmetic_sequence() -> None:
    n = 100
    seconds = [(i + 1) / 1000 for i in range(n)]          # 1 .. 100 ms, shuffled order irrelevant
    rng = np.random.default_rng(0)
    s = latency_stats(list(rng.permutation(seconds)))
    # linear interpolation: the p-th percentile of 1..n sits at rank p/100 * (n - 1), value 1 + rank
    for p in (50, 90, 99):
        assert s[f"p{p}_ms"] == pytest.approx(1 + p / 100 * (n - 1))
    assert s["mean_ms"] == pytest.approx((n + 1) / 2)
    std = math.sqrt((n * n - 1) / 12)                      # population std of 1..n
    assert s["std_ms"] == pytest.approx(std)
    assert s["cv"] == pytest.approx(std / ((n + 1) / 2))
    assert (s["min_ms"], s["max_ms"], s["n"]) == (pytest.approx(1.0), pytest.approx(100.0), n)


def test_latency_stats_constant_and_bad() -> None:
    s = latency_stats([0.004] * 7)
    assert s["cv"] == 0.0 and s["p99_ms"] == pytest.approx(4.0)
    for bad in ([], [float("nan")], [-1.0]):
        with pytest.raises(ValueError):
            latency_stats(bad)


class _FakeClock:
    """Each call to the timed function advances time by ``step``; reading the clock costs nothing."""

    def __init__(self, step: float) -> None:
        self.now, self.step, self.calls = 0.0, step, 0

    def __call__(self) -> float:
        return self.now

    def fn(self) -> None:
        self.calls += 1
        self.now += self.step


def test_time_calls_follows_trtexec_rules() -> None:
    step = 1 / 64                                          # exact in binary: no rounding at the limits
    c = _FakeClock(step)
    times, info = time_calls(c.fn, warmup=Amount(iterations=3), duration=0.0, iterations=5, clock=c)
    assert info["warmup_iterations"] == 3 and len(times) == 5 and c.calls == 8
    assert times == [step] * 5
    c = _FakeClock(step)                                   # duration dominates: 10 steps of measuring
    times, info = time_calls(c.fn, warmup=Amount(seconds=5 * step), duration=10 * step, iterations=2,
                             clock=c)
    assert info["warmup_iterations"] == 5 and len(times) == 10
    c = _FakeClock(step)
    times, info = time_calls(c.fn, warmup=Amount(iterations=0), duration=0.0, iterations=1, clock=c)
    assert info["warmup_iterations"] == 0 and len(times) == 1


# ----------------------------------------------------------------------------- summaries
def _cell(model: str, backend: str, context: int, p50: float, slots: int | None = 7) -> dict:
    return {"model": model, "backend": backend, "batch": 1, "n_slots": slots if model == TRELLIS else None,
            "context": context, "phase": "decode", "status": "ok", "latency": {"p50_ms": p50}}


def test_crossover_interpolates_in_log_context() -> None:
    """KV latency linear in log2(context) (0.5, 0.75, 1.25 ms at 256, 1k, 4k) against a flat 1.0 ms
    Trellis: the curves cross half-way between 1k and 4k in log2 context, at 2**11 = 2048 tokens."""
    ctx = [256, 1024, 4096]
    cells = [_cell(TRELLIS, "ort", n, 1.0) for n in ctx] + [_cell(KV, "ort", n, p)
                                                            for n, p in zip(ctx, (0.5, 0.75, 1.25))]
    (x,) = crossover(cells)
    assert x["kind"] == "interpolated"
    assert x["crossover_context"] == pytest.approx(2048)
    faster = [_cell(TRELLIS, "ort", n, 0.1) for n in ctx] + [_cell(KV, "ort", n, 1.0) for n in ctx]
    assert crossover(faster)[0]["kind"] == "below_range"
    slower = [_cell(TRELLIS, "ort", n, 9.0) for n in ctx] + [_cell(KV, "ort", n, 1.0) for n in ctx]
    assert crossover(slower)[0]["kind"] == "above_range"


def test_aims_are_ratios_and_report_missing_cells() -> None:
    cells = [_cell(TRELLIS, "ort", 1024, 1.0), _cell(TRELLIS, "ort", 65536, 1.2),
             _cell(TRELLIS, "ort", 16384, 1.1), _cell(KV, "ort", 16384, 5.5)]
    flat, speed = aims(cells)
    assert flat["results"][0]["ratio"] == pytest.approx(1.2) and flat["status"] == "not met"
    assert speed["results"][0]["speedup"] == pytest.approx(5.0) and speed["status"] == "met"
    flat, speed = aims([_cell(TRELLIS, "torch", 1024, 1.0)])
    assert flat["status"].startswith("not measured") and speed["status"].startswith("not measured")


# ----------------------------------------------------------------------------- backends
def test_unavailable_backends_have_reasons(monkeypatch: pytest.MonkeyPatch) -> None:
    trt = check_backend("trt")
    assert not trt.available and "TensorRT" in trt.reason
    if importlib.util.find_spec("tensorrt_rtx_bindings") is not None:   # built here, runs on a GPU only
        assert "no usable CUDA GPU" in trt.reason and "trellis-export engine" in trt.reason
    tri = check_backend("triton")
    if not torch.cuda.is_available():
        assert not tri.available and "CUDA" in tri.reason

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda n, *a: None if n == "onnxruntime" else real(n, *a))
    ort = check_backend("ort")
    assert not ort.available and "onnxruntime" in ort.reason


# ----------------------------------------------------------------------------- baseline
@pytest.fixture(scope="module")
def work_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bench_work")


@pytest.fixture(scope="module")
def baseline_onnx(work_dir: Path) -> tuple[KVCacheLM, Path]:
    """The bench's own baseline subject for TINY, exported into the shared work dir (the end-to-end
    bench run below reuses this file: it is named by the weights' fingerprint)."""
    _, subjects = build_subjects(BenchSettings(config_override=TINY, slots=[7], seed=SEED))
    kv = next(s for s in subjects if s.model == KV)
    return kv.torch_model, onnx_model(kv, work_dir, lambda s: None)


def _to64(model: KVCacheLM) -> KVCacheLM:
    import copy
    return copy.deepcopy(model).double()


def test_baseline_streaming_in_pieces_equals_one_call(baseline_onnx) -> None:
    model, _ = baseline_onnx
    ref_model = _to64(model)
    ids = random_ids(2, 23, TINY.vocab_size, seed=3)
    with torch.no_grad():
        ref, ref_state = ref_model(ids)
        state, outs = model.init_state(2), []
        for a, b in ((0, 1), (1, 8), (8, 9), (9, 23)):       # 1, 7, 1, 14 tokens
            logits, state = model(ids[:, a:b], state)
            outs.append(logits)
    assert_rel_close(torch.cat(outs, 1), ref, TOL_SHORT, "float32 pieces vs float64 one call: logits")
    for name in kv_state_names(TINY)[1:]:
        assert tuple(state[name].shape) == kv_state_shapes(TINY, 2, 23)[name]
        assert_rel_close(state[name], ref_state[name], TOL_SHORT, f"state {name}")
    assert state["position"].tolist() == [23, 23]


def test_baseline_ort_equals_pytorch(baseline_onnx) -> None:
    import onnx

    from trellis_export.export.ort import ort_session, run_ort

    model, path = baseline_onnx
    proto = onnx.load(str(path))
    assert {(o.domain or "", o.version) for o in proto.opset_import} == {("", 18)}
    assert all(n.domain in ("", "ai.onnx") for n in proto.graph.node) and not proto.functions
    ref_model = _to64(model)
    sess = ort_session(path)
    ids = random_ids(3, 19, TINY.vocab_size, seed=5).numpy()
    with torch.no_grad():
        ref, _ = ref_model(torch.from_numpy(ids))
    state = {k: v.numpy() for k, v in model.init_state(3).items()}       # empty cache, N = 0
    outs = []
    for a, b in ((0, 5), (5, 6), (6, 19)):
        logits, state = run_ort(sess, ids[:, a:b], state)
        outs.append(logits)
    assert_rel_close(np.concatenate(outs, 1), ref, TOL_SHORT, "ORT pieces vs PyTorch float64: logits")
    # one call from a mid-stream state: ORT == PyTorch on the same inputs
    rng = np.random.default_rng(1)
    mid = {"position": np.full(3, 11, np.int64)}
    for name, shape in kv_state_shapes(TINY, 3, 11).items():
        if name != "position":
            mid[name] = rng.standard_normal(shape).astype(np.float32)
    o_ort, s_ort = run_ort(sess, ids[:, :4], mid)
    with torch.no_grad():
        o_pt, s_pt = ref_model(torch.from_numpy(ids[:, :4]), {k: torch.from_numpy(v).double()
                                                              if v.dtype != np.int64 else torch.from_numpy(v)
                                                              for k, v in mid.items()})
    assert_rel_close(o_ort, o_pt, TOL_SHORT, "ORT vs PyTorch from a mid-stream cache")
    for name in kv_state_names(TINY)[1:]:
        assert_rel_close(s_ort[name], s_pt[name], TOL_SHORT, f"present.{name}")
    assert s_ort["position"].tolist() == [15, 15, 15]


def test_baseline_refuses_bad_input() -> None:
    with pytest.raises(BaselineError, match="input_ids must be"):
        KVCacheLM(TINY)(torch.zeros(4, dtype=torch.int64))
    assert kv_state_bytes_per_stream(TINY, 100) == 8 + 2 * 2 * 3 * 100 * 5 * 4


# ----------------------------------------------------------------------------- end to end
def test_bench_end_to_end(baseline_onnx, work_dir: Path, tmp_path: Path) -> None:
    cfg_path = tmp_path / "tiny.json"
    cfg_path.write_text(TINY.to_json())
    out, png = tmp_path / "res" / "bench.json", tmp_path / "bench.png"
    args = ["bench", "--config", str(cfg_path), "--backend", "torch,ort", "--backend", "triton,trt",
            "--slots", "7", "--context", "3,9", "--batch", "1,2", "--iterations", "2", "--duration", "0",
            "--warmup", "1it", "--prefill-len", "5", "--seed", str(SEED), "--work-dir", str(work_dir),
            "--json", str(out), "--plot", str(png)]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["command"].startswith("trellis-export bench --config") and "--slots 7" in report["command"]
    for key in ("cpu_model", "logical_cores", "python", "versions", "date_utc"):
        assert key in report["machine"]
    assert report["machine"]["versions"]["torch"] and report["machine"]["versions"]["onnxruntime"]
    assert report["threads"]["ort_intra_op"] == 1 and "synthetic" in report["context_method"]
    cells = {(c["model"], c["backend"], c["n_slots"], c["context"], c["batch"], c["phase"]): c
             for c in report["cells"]}
    assert len(cells) == len(report["cells"]) == 2 * 4 * 2 * 2 * 2
    for model, slots in ((TRELLIS, 7), (KV, None)):
        for backend in ("torch", "ort", "triton", "trt"):
            for n in (3, 9):
                for b in (1, 2):
                    for phase, tokens in (("decode", 1), ("prefill", 5)):
                        c = cells[(model, backend, slots, n, b, phase)]
                        assert c["tokens"] == tokens
                        if backend in ("torch", "ort"):
                            assert c["status"] == "ok", c
                            lat = c["latency"]
                            assert lat["n"] >= 2 and 0 < lat["p50_ms"] <= lat["p90_ms"] <= lat["p99_ms"]
                            assert c["tokens_per_s"] == pytest.approx(b * tokens / (lat["mean_ms"] / 1e3))
                        else:
                            assert c["status"] == "unavailable" and c["reason"], c
                        want = (state_bytes_per_stream(TINY) if model == TRELLIS
                                else kv_state_bytes_per_stream(TINY, n))
                        assert c["state_bytes_per_stream"] == want
    assert report["backends"]["triton"]["available"] is False or torch.cuda.is_available()
    assert report["backends"]["trt"]["reason"]
    assert {(x["backend"], x["batch"]) for x in report["crossover"]} == {(b, n) for b in ("torch", "ort")
                                                                          for n in (1, 2)}
    assert len(report["aims"]) == 2
    assert "unavailable" in res.output and "p50 latency" in res.output

    # the exported Trellis model as input: its own config and n_slots, torch reported unavailable
    onnx_files = sorted(work_dir.glob("trellis-m7-*.onnx"))
    assert len(onnx_files) == 1
    out2 = tmp_path / "onnx_input.json"
    res = CliRunner().invoke(main, ["bench", str(onnx_files[0]), "--backend", "torch,ort", "--context", "4",
                                    "--batch", "1", "--phase", "decode", "--iterations", "2", "--duration",
                                    "0", "--warmup", "0it", "--no-baseline", "--json", str(out2)])
    assert res.exit_code == 0, res.output
    by_backend = {c["backend"]: c for c in json.loads(out2.read_text())["cells"]}
    assert by_backend["ort"]["status"] == "ok" and by_backend["ort"]["n_slots"] == 7
    assert by_backend["torch"]["status"] == "unavailable" and "checkpoint" in by_backend["torch"]["reason"]
    res = CliRunner().invoke(main, ["bench", str(onnx_files[0]), "--slots", "16", "--backend", "ort"])
    assert res.exit_code == 1 and "error: --slots" in res.output and "Traceback" not in res.output


def test_bench_skips_baseline_cells_over_the_memory_limit(tmp_path: Path) -> None:
    cfg_path = tmp_path / "tiny.json"
    cfg_path.write_text(TINY.to_json())
    out = tmp_path / "b.json"
    res = CliRunner().invoke(main, ["bench", "--config", str(cfg_path), "--backend", "torch", "--slots", "7",
                                    "--context", "1k", "--batch", "1", "--phase", "decode", "--iterations",
                                    "2", "--duration", "0", "--warmup", "0it", "--max-memory", "1e-6",
                                    "--json", str(out)])
    assert res.exit_code == 0, res.output
    cells = {c["model"]: c for c in json.loads(out.read_text())["cells"]}
    assert cells[TRELLIS]["status"] == "ok"
    assert cells[KV]["status"] == "skipped" and "--max-memory" in cells[KV]["reason"]


def test_bench_bad_model_path_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"not an onnx model")
    res = CliRunner().invoke(main, ["bench", str(bad), "--backend", "ort", "--context", "4", "--batch", "1"])
    assert res.exit_code == 1 and res.output.startswith("error: ") and str(bad) in res.output
    res = CliRunner().invoke(main, ["bench", str(tmp_path / "missing"), "--backend", "ort"])
    assert res.exit_code == 2 and "does not exist" in res.output


def test_bench_checkpoint_input_uses_its_own_memory_size(tiny_checkpoint, tmp_path: Path) -> None:
    path, model = tiny_checkpoint
    out = tmp_path / "ckpt.json"
    res = CliRunner().invoke(main, ["bench", str(path), "--backend", "torch", "--context", "4,9", "--batch",
                                    "2", "--phase", "decode", "--iterations", "2", "--duration", "0",
                                    "--warmup", "0it", "--json", str(out)])
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())
    assert report["source"]["kind"] == "checkpoint"
    from trellis_export.checkpoint import model_fingerprint
    assert report["models"]["trellis"][0]["fingerprint"] == model_fingerprint(model)
    trellis = [c for c in report["cells"] if c["model"] == TRELLIS]
    assert {c["n_slots"] for c in trellis} == {model.config.n_slots}
    assert all(c["status"] == "ok" for c in report["cells"]) and len(report["cells"]) == 4
    res = CliRunner().invoke(main, ["bench", str(path), "--slots", "3", "--backend", "torch"])
    assert res.exit_code == 1 and "error: --slots" in res.output


def test_bench_refuses_unwritable_outputs_before_running(tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    for flag in ("--json", "--plot"):
        res = CliRunner().invoke(main, ["bench", flag, str(blocker / "out"), "--backend", "torch"])
        assert res.exit_code == 1 and res.output.startswith("error: ") and flag in res.output, res.output


def test_time_interleaved_alternates_calls_and_counts() -> None:
    from trellis_export.bench.stats import time_interleaved
    order: list[str] = []
    clock_t = [0.0]

    def clock() -> float:
        clock_t[0] += 0.001
        return clock_t[0]

    times = time_interleaved([lambda: order.append("a"), lambda: order.append("b")], warmup_calls=2,
                             duration=0.0, iterations=5, clock=clock)
    assert order[:4] == ["a", "a", "b", "b"]                  # warm-up, each call on its own
    assert order[4:] == ["a", "b"] * 5                        # then strictly alternating
    assert [len(t) for t in times] == [5, 5]
    with pytest.raises(ValueError):
        time_interleaved([lambda: None], warmup_calls=0, duration=0.0, iterations=0)


def test_flatness_aim_prefers_interleaved_pairs() -> None:
    """The interleaved pairs judge the aim from their own ratios (a pair's 'met' flag is not trusted),
    and the separately timed cells' ratio is kept beside them."""
    cells = [_cell(TRELLIS, "ort", 1024, 1.0), _cell(TRELLIS, "ort", 65536, 1.5)]
    pair = {"backend": "ort", "batch": 1, "n_slots": 7, "p50_1k_ms": 1.0, "p50_64k_ms": 1.02, "ratio": 1.02}
    flat_seq = aims(cells)[0]
    assert flat_seq["status"] == "not met" and flat_seq["method"] == "separately timed cells"
    flat = aims(cells, [pair])[0]
    assert flat["status"] == "met" and flat["method"].startswith("interleaved")
    assert flat["results"][0]["sequential_ratio"] == pytest.approx(1.5)
    slow = dict(pair, p50_64k_ms=1.3, ratio=1.3, met=True)         # a stale flag must not pass it
    assert aims(cells, [slow])[0]["status"] == "not met"
