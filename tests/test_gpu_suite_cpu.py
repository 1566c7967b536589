"""CPU-side parts of bench/gpu_suite.py (the suite itself needs a GPU and was never run here)."""

from __future__ import annotations

import ctypes
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

os.environ["TRITON_INTERPRET"] = "1"      # run_jit on the CPU below goes through the interpreter

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def suite() -> Any:
    spec = importlib.util.spec_from_file_location("gpu_suite", ROOT / "bench" / "gpu_suite.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.import_project()
    return mod


def test_parse_args_defaults_and_errors(suite: Any) -> None:
    a = suite.parse_args(["--out", "x.json"])
    assert (a.iters, a.warmup, a.quick, a.no_timing, a.aot_json) == (30, 10, False, False, None)
    q = suite.parse_args(["--out", "x.json", "--quick", "--no-timing", "--iters", "5"])
    assert (q.iters, q.warmup, q.quick, q.no_timing) == (5, 3, True, True)
    with pytest.raises(SystemExit):
        suite.parse_args([])                                   # --out is required
    with pytest.raises(SystemExit):
        suite.parse_args(["--out", "x.json", "--iters", "0"])


def test_correctness_grid_covers_the_house_rules(suite: Any) -> None:
    for quick in (False, True):
        cases = suite.correctness_cases(quick)
        for kernel in ("fused_recurrent", "chunk"):
            ks = [c for c in cases if c["kernel"] == kernel]
            assert {c["C"] for c in ks} >= {1, 3, 4, 16}
            assert any(c["T"] == 1 for c in ks)
            assert any(c["T"] % c["C"] for c in ks)                      # T not a multiple of C
            assert any((c["H"], c["m"], c["d"]) == (3, 7, 5) for c in ks)  # odd shapes
            assert {c["dtype"] for c in ks} == {"float32", "float16", "bfloat16"}
            for role in ("phi", "f", "rho"):
                assert {c[role] for c in ks} == set(suite.NL)
            assert any(c["B"] * c["H"] >= 16 and c["m"] == c["d"] == 64 for c in ks)
        assert all(c["tol"] == (1e-4 if c["T"] > 64 else 1e-5) for c in cases)
        assert any(c["T"] > 64 for c in cases)
    assert len(suite.correctness_cases(True)) < len(suite.correctness_cases(False))


def test_decode_bytes_and_median(suite: Any) -> None:
    assert suite.decode_state_bytes(64, 8, 64, 64) == 8 * 64 * 8 * 64 * 64 * 4
    assert suite.median([3.0, 1.0, 2.0]) == 2.0


def fake_results(suite: Any) -> dict[str, Any]:
    ok = {"ok": True, "max_rel_rms": 3e-7}
    return {
        "jit": {"checks": [ok, ok], "ok": True},
        "aot": {"checks": [ok, {"ok": False, "max_rel_rms": 0.5}], "ok": False},
        "timing": {"decode": {"speedup": 25.0, "triton_ms": 0.04, "reference_ms": 1.0, "meets_aim": True},
                   "bandwidth": [{"B": 1024, "H": 8, "achieved_GBps": 2000.0, "fraction_of_copy": 0.7,
                                  "copy_GBps": 2800.0, "meets_aim": True}],
                   "prefill": {"skipped": "fla not importable", "runs": [
                       {"C": 16, "trellis_ms": 3.0, "Mtok_per_s": 10.0}]}},
        "errors": {"extra": "Traceback...\nRuntimeError: boom"},
    }


def test_table_and_json_writer(suite: Any, tmp_path: Path) -> None:
    res = fake_results(suite)
    table = suite.format_table(res)
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["section", "result", "detail"]
    assert any(ln.startswith("jit") and "PASS" in ln and "2/2" in ln for ln in lines)
    assert any(ln.startswith("aot") and "FAIL" in ln and "1/2" in ln for ln in lines)
    assert any("decode speedup" in ln and "25x" in ln for ln in lines)
    assert any("bandwidth B*H=8192" in ln and "70%" in ln for ln in lines)
    assert any("prefill vs fla" in ln and "skipped" in ln for ln in lines)
    assert any(ln.startswith("extra") and "RuntimeError: boom" in ln for ln in lines)
    out = tmp_path / "sub" / "gpu_x.json"
    suite.write_json(out, res)
    assert json.loads(out.read_text()) == res
    assert not list(out.parent.glob("*.tmp"))


def test_pack_params_follows_the_record_order(suite: Any) -> None:
    sig = [["q", "*fp32"], ["position", "*i64"], ["T", "i32"], ["out_o", "*fp32"]]
    rec = {"name": "k", "signature": sig, "hidden_params": ["global_scratch", "profile_scratch"],
           "ptx_params": ["u64", "u64", "u32", "u64", "u64", "u64"]}
    arr, keep = suite.pack_params(rec, {"q": 0x1000, "position": 0x2000, "out_o": 0x3000}, {"T": 7})
    vals = [type(v).__name__ for v in keep]
    assert vals == ["c_ulong", "c_ulong", "c_int", "c_ulong", "c_ulong", "c_ulong"] or \
        vals == ["c_ulonglong", "c_ulonglong", "c_int", "c_ulonglong", "c_ulonglong", "c_ulonglong"]
    assert [v.value for v in keep] == [0x1000, 0x2000, 7, 0x3000, 0, 0]
    # each kernelParams entry points at its value
    assert ctypes.cast(arr[2], ctypes.POINTER(ctypes.c_int32)).contents.value == 7
    assert ctypes.cast(arr[3], ctypes.POINTER(ctypes.c_uint64)).contents.value == 0x3000
    rec["ptx_params"] = rec["ptx_params"][:-1]
    with pytest.raises(ValueError, match="PTX entry declares 5 params"):
        suite.pack_params(rec, {"q": 1, "position": 2, "out_o": 3}, {"T": 1})


def test_run_jit_on_cpu_through_the_interpreter(suite: Any) -> None:
    """The JIT section's own code path (poisoned outputs, reference, compare) on two tiny cases."""
    from trellis_export.kernels.trellis_memory.fused_recurrent import fused_recurrent_trellis_fwd_kernel
    if type(fused_recurrent_trellis_fwd_kernel).__name__ != "InterpretedFunction":
        pytest.skip("kernels were imported without TRITON_INTERPRET=1 in this process")
    cases = [dict(kernel=k, B=2, T=5, H=3, m=7, d=5, C=3, phi="l2_silu", f="ln_silu", rho="identity",
                  dtype="float32", tol=1e-5) for k in ("fused_recurrent", "chunk")]
    res = suite.run_jit(cases, seed=1, device="cpu")
    assert res["ok"], res
    assert all(c["finite"] and c["max_rel_rms"] < 1e-5 for c in res["checks"])


def test_main_without_cuda_reports_and_writes_json(suite: Any, tmp_path: Path, capsys: Any) -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the real suite runs instead")
    out = tmp_path / "gpu.json"
    assert suite.main(["--out", str(out), "--quick"]) == 1
    data = json.loads(out.read_text())
    assert data["errors"]["cuda"] == "no CUDA device visible to torch"
    assert data["machine"]["torch"] == torch.__version__
    assert "no CUDA device" in capsys.readouterr().out
