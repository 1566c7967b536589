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
from trellis_export.kernels import cuda_launch as cl  # noqa: E402

from trellis_export.opdef import INPUTS, OUTPUTS  # noqa: E402

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
    names = lambda *argv: [n for n, _ in suite.chosen_sections(suite.parse_args(["--out", "x", *argv]))]  # noqa: E731
    assert names() == list(suite.SECTIONS)
    assert names("--sections", "aot_timing,aot,plugin") == ["aot_timing", "aot", "plugin"]
    assert names("--sections", "aot_timing,jit", "--no-timing") == ["jit"]
    assert names("--no-aot", "--no-trt") == ["jit", "timing"]
    assert suite.SECTIONS[-1] == "d_split"          # the never-run spin barrier last: a hang costs no other
    with pytest.raises(SystemExit):
        suite.parse_args(["--out", "x.json", "--section-timeout", "-1"])
    for bad in ("bogus", ",", "jit,bogus"):
        with pytest.raises(SystemExit):
            suite.parse_args(["--out", "x.json", "--sections", bad])


def test_correctness_grid_covers_the_house_rules(suite: Any) -> None:
    for quick in (False, True):
        cases = suite.correctness_cases(quick)
        for kernel in ("fused_recurrent", "chunk", "chunk_split"):
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
    """The bandwidth floor's byte count equals the memory tensors one decode step really reads and
    writes (the suite's own inputs and outputs at odd shapes); median against the standard library."""
    import random
    import statistics

    case = {"B": 3, "T": 1, "H": 2, "m": 7, "d": 5, "C": 3, "dtype": "float32"}
    _, state, _ = suite.make_inputs(case, "cpu", seed=1)
    outs = suite.poisoned_outputs(case, suite.make_inputs(case, "cpu", seed=1)[0])
    moved = sum(t.numel() * t.element_size() for t in (*state, *outs[1:]))
    assert suite.decode_state_bytes(3, 2, 7, 5) == moved
    rng = random.Random(0)
    for n in (1, 2, 5, 8):
        xs = [rng.random() for _ in range(n)]
        assert suite.median(xs) == pytest.approx(statistics.median(xs))


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
                  dtype="float32", tol=1e-5) for k in ("fused_recurrent", "chunk", "chunk_split")]
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


# --------------------------------------------------------------------------- issue 14: AOT section
def test_aot_cases_cover_every_variant(suite: Any) -> None:
    from trellis_export.kernels.aot import variant_name
    cases = suite.aot_cases()
    got = {(c["kernel"], c["variant"]) for c in cases}
    for kernel in ("fused_recurrent", "chunk", "chunk_split"):
        assert {(kernel, "aligned"), (kernel, "unaligned")} <= got
        assert any(c["kernel"] == kernel and (c["m"], c["d"]) == (7, 5) for c in cases)   # odd shapes
    assert {("fused_recurrent", "decode"), ("fused_recurrent", "decode_in_place")} <= got
    assert all(c["T"] == 1 for c in cases if c["variant"].startswith("decode"))
    tf = [c for c in cases if "tf32x3" in c["variant"]]
    assert tf and all(c["opt_in"] and c["kernel"] == "chunk_split" for c in tf)
    for c in cases:                                   # the variant names round-trip through aot
        kernel = suite.case_kernels(c)[0]
        assert variant_name(**suite.variant_kwargs(c["variant"], kernel, c["d"])) == c["variant"]
    split = [c for c in cases if c["variant"] == "m_split"]
    assert split and all(c["phi"] == "identity" and c["kernel"] == "chunk_split" for c in split)
    assert any(c["m"] % 16 for c in split)                          # a part-filled last slot block
    assert suite.variant_kwargs("m_split", "chunk_readout") == suite.variant_kwargs("aligned")
    assert suite.variant_kwargs("decode_in_place+w16") == dict(suite.variant_kwargs("decode_in_place"),
                                                               num_warps=16)
    assert variant_name(**suite.variant_kwargs("decode_in_place+w4")) == "decode_in_place+w4"
    # an m_split case: the split and its warp override are the state pass's; the read-out keeps the
    # case's alignment
    assert suite.kernel_variant("m_split", "chunk_readout") == "aligned"
    assert suite.kernel_variant("m_split_unaligned", "chunk_readout") == "unaligned"
    assert suite.kernel_variant("m_split+w8", "chunk_readout") == "aligned"
    assert suite.kernel_variant("m_split_unaligned+w8", "chunk_state") == "m_split_unaligned+w8"
    assert suite.case_kernels({"kernel": "chunk_split"}) == ("chunk_state", "chunk_readout")


def test_in_place_decode_bytes_match_the_issue_figures(suite: Any) -> None:
    """67.1 MB per step for four tiles in and four out at B = 64, H = 8, m = d = 64; in place with
    snapshots written only at chunk starts every row moves six tiles: 50.3 MB (issue: 'about 51')."""
    assert suite.decode_state_bytes(64, 8, 64, 64) == 67_108_864
    for positions in ([0] * 64, [5] * 64, list(range(64))):
        assert suite.in_place_decode_bytes(64, 8, 64, 64, 16, positions) == 50_331_648


def test_aot_records_from_json_pick_the_variant_and_stage_order(suite: Any) -> None:
    def rec(kernel: str, variant: str | None, stage: int = 0) -> dict[str, Any]:
        r = {"kernel": kernel, "cc": 90, "dtype": "float32", "stage": stage,
             "constexprs": {"H": 3, "M": 7, "D": 5, "C": 3}}
        if variant is not None:
            r["variant"] = variant
        return r
    records = [rec("chunk_readout", "aligned", 1), rec("chunk_state", "aligned", 0),
               rec("fused_recurrent", "decode"), rec("fused_recurrent", "aligned"), rec("chunk", None)]
    case = dict(kernel="chunk_split", variant="aligned", H=3, m=7, d=5, C=3, dtype="float32")
    assert [r["kernel"] for r in suite.aot_records(case, 90, records)] == ["chunk_state", "chunk_readout"]
    case.update(kernel="fused_recurrent", variant="decode")
    assert suite.aot_records(case, 90, records) == [records[2]]
    case.update(kernel="chunk", variant="aligned")            # a pre-issue-14 record (no variant)
    assert suite.aot_records(case, 90, records) == [records[4]]
    case.update(kernel="fused_recurrent", variant="decode_in_place")
    with pytest.raises(LookupError, match="no record in --aot-json for fused_recurrent decode_in_place"):
        suite.aot_records(case, 90, records)
    # the m-axis split: the state pass's m_split record, then the aligned read-out
    records.append(rec("chunk_state", "m_split", 0))
    case.update(kernel="chunk_split", variant="m_split")
    assert suite.aot_records(case, 90, records) == [records[-1], records[0]]


def test_table_reports_aot_timing_and_opt_in_checks(suite: Any) -> None:
    res = {"aot": {"checks": [{"ok": True, "max_rel_rms": 1e-7},
                              {"ok": False, "max_rel_rms": 3e-4, "opt_in": True}], "ok": True},
           "aot_timing": {"decode": {"runs": [
               {"variant": "decode_in_place", "ms": 0.0126, "ratio_to_floor": 1.2,
                "in_place_floor_ms": 0.0105, "meets_aim": True}]},
               "decode_warps": [{"B": 1, "default_warps": 8, "ms": {"4": 0.02, "8": 0.013, "16": 0.01},
                                 "fastest_warps": 16, "default_over_fastest": 1.3}],
               "prefill": {"runs": [{"kernel": "chunk_split", "variant": "aligned", "ms": 2.0,
                                     "Mtok_per_s": 4.1},
                                    {"kernel": "chunk", "variant": "unaligned", "error": "RuntimeError: x"}],
                           "speedup_vs_pre_issue14_chunk": 3.5, "meets_speedup_aim": True,
                           "fla_skipped": "ModuleNotFoundError: No module named 'fla'", "sms": 132,
                           "m_split_rule": [{"B": 1, "programs_unsplit": 16, "rule_takes": "m_split",
                                             "m_split_over_aligned": 0.4, "rule_picks_faster": True},
                                            {"B": 9, "programs_unsplit": 144, "rule_takes": "aligned",
                                             "m_split_over_aligned": 0.9, "rule_picks_faster": False}]}},
           "errors": {}}
    lines = suite.format_table(res).splitlines()
    assert any(ln.startswith("aot ") and "PASS" in ln and "1/1" in ln for ln in lines)
    assert any("aot opt-in" in ln and "0/1 tf32x3" in ln and "not gating" in ln for ln in lines)
    assert any("AOT decode decode_in_place" in ln and "ok" in ln and "1.2x" in ln for ln in lines)
    assert any("AOT prefill chunk unaligned" in ln and "ERROR" in ln for ln in lines)
    assert any("AOT prefill split vs old" in ln and "3.5x" in ln for ln in lines)
    assert any("AOT prefill vs fla" in ln and "skipped" in ln for ln in lines)
    assert any("AOT decode warps B=1" in ln and "fastest 16 warps" in ln and "1.3x" in ln for ln in lines)
    assert any("AOT m-axis split B=1" in ln and " ok " in ln and "0.4x" in ln for ln in lines)
    assert any("AOT m-axis split B=9" in ln and "rule wrong" in ln and "144 programs" in ln for ln in lines)
    res["d_split"] = {
        "jit": {"checks": [{"ok": True, "max_rel_rms": 1e-7}, {"ok": False, "max_rel_rms": 0.3}]},
        "aot": {"ok": False, "error": "LaunchError: y"},
        "timing": [{"H": 8, "m": 64, "d": 128, "C": 16, "phi": "ln_silu", "aligned_ms": 2.0,
                    "aligned_state_ms": 1.6, "d_split_spin_ms": 1.0, "d_split_spin_state_ms": 0.4,
                    "d_split_spin_over_whole": 0.5, "d_split_spin_state_over_whole": 0.25,
                    "d_split_launch_error": "LaunchError: x"},
                   {"H": 8, "m": 64, "d": 64, "C": 16, "phi": "identity", "aligned_error": "LaunchError: z"}]}
    lines = suite.format_table(res).splitlines()
    assert any(ln.startswith("d_split jit ") and "FAIL" in ln and "1/2" in ln for ln in lines)
    assert any(ln.startswith("d_split aot ") and "ERROR" in ln and "LaunchError: y" in ln for ln in lines)
    assert any("d-axis split d=128 ln_silu spin" in ln and "state pass 0.25x" in ln and "prefill 0.5x" in ln
               for ln in lines)
    assert any("d-axis split d=128 ln_silu launch" in ln and "ERROR" in ln for ln in lines)
    assert any("d-axis split d=64 identity aligned" in ln and "LaunchError: z" in ln for ln in lines)
    res["d_split"] = {"timing": [{"error": "RuntimeError: no"}]}
    assert any("d-axis split timing" in ln and "ERROR" in ln and "no" in ln
               for ln in suite.format_table(res).splitlines())


class FakeDriver:
    """``CudaDriver``'s launch interface that checks the arguments and records the launches."""

    def __init__(self) -> None:
        self.launches: list[tuple[str, dict[str, int], int]] = []

    def load_record(self, rec: dict[str, Any], prefer: str = "auto") -> Any:
        return cl.LoadedKernel(rec, None, None, "ptx")      # type: ignore[arg-type]

    def launch_record(self, k: Any, ptrs: dict[str, int], scalars: dict[str, int], B: int,
                      stream: int = 0) -> None:
        cl.pack_params(k.record, ptrs, scalars)             # the real argument checks
        self.launches.append((k.record["kernel"], dict(ptrs), B))


def rec(kernel: str, stage: int = 0, **extra: Any) -> dict[str, Any]:
    """A launch record shaped like ``AOTKernel.to_dict()`` (odd shapes; ``extra`` overrides)."""
    ws = ["ws_memory", "ws_u"] if kernel.startswith("chunk_") else []
    sig = [[n, "*i64" if n == "position" else "*fp32"] for n in INPUTS] + [["T", "i32"]]
    sig += [[f"out_{n}", "*fp32"] for n in OUTPUTS] + [[w, "*fp32"] for w in ws]
    r = {"kernel": kernel, "name": kernel, "stage": stage, "signature": sig, "inputs": list(INPUTS),
         "outputs": [f"out_{n}" for n in OUTPUTS], "hidden_params": ["g", "p"],
         "ptx_params": ["u64"] * len(INPUTS) + ["u32"] + ["u64"] * (len(OUTPUTS) + len(ws) + 2),
         "constexprs": {"H": 3, "M": 7, "D": 5, "C": 3}, "block": [128, 1, 1], "shared_mem": 0}
    if ws:
        r["workspaces"] = {"ws_memory": "B * H * 2 * ((T + 2 * C - 2) // C) * M * D * 4",
                           "ws_u": "B * H * 2 * ((T + 2 * C - 2) // C) * C * M * 4"}
        r["grid_dims"] = ["B * H * 2", "1", "1"] if stage == 0 else ["(T + 2 * C - 2) // C", "B * H", "1"]
    r.update(extra)
    return r


def test_aot_launch_wires_pointers_like_the_plugin(suite: Any) -> None:
    """AotLaunch on CPU tensors with a fake driver: in-place records alias the output memories to
    the inputs, split records get their workspaces and launch state pass then read-out."""
    case = dict(kernel="fused_recurrent", variant="decode_in_place", B=2, T=1, H=3, m=7, d=5, C=3,
                phi="ln_silu", f="ln_silu", rho="identity", dtype="float32", tol=1e-5)
    acts, state, pos = suite.make_inputs(case, "cpu", 0)
    drv = FakeDriver()
    launch = suite.AotLaunch(drv, [rec("fused_recurrent", in_place=True, decode=True)], case, acts, state,
                             pos, suite.poisoned_outputs(case, acts))
    launch()
    (_, ptrs, B), = drv.launches
    assert B == 2 and ptrs["out_key_memory"] == ptrs["key_memory"] == state[0].data_ptr()
    assert launch.out[1] is state[0] and launch.out[0].shape == (2, 1, 3, 5)
    case.update(kernel="chunk_split", variant="aligned", T=7)
    acts, state, pos = suite.make_inputs(case, "cpu", 1)
    drv = FakeDriver()
    launch = suite.AotLaunch(drv, [rec("chunk_state", 0), rec("chunk_readout", 1)], case, acts, state, pos,
                             suite.poisoned_outputs(case, acts))
    launch()
    assert [k for k, _, _ in drv.launches] == ["chunk_state", "chunk_readout"]
    assert launch.grids == [(12, 1, 1), (3, 6, 1)]                # NC = (T + 2C - 2) // C = 3
    NC = (7 + 4) // 3
    assert launch.ws["ws_memory"].numel() == 2 * 3 * 2 * NC * 7 * 5
    assert launch.ws["ws_u"].numel() == 2 * 3 * 2 * NC * 3 * 7
    assert drv.launches[0][1]["ws_u"] == drv.launches[1][1]["ws_u"] == launch.ws["ws_u"].data_ptr()
    assert drv.launches[0][1]["out_key_memory"] != drv.launches[0][1]["key_memory"]


def test_m_split_rule_and_decode_warp_studies_on_fakes(suite: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The two studies of the AOT timing section on CPU tensors with fake records, driver and clock
    (their control flow; the times are the fake clock's): the rule study's batches fall on both sides
    of B * H * 2 = SMs, each row says what the rule takes and whether that was the faster record;
    the warp study times 4 / 8 / 16 warps per B and names the fastest; a failing study is one error
    row, not a lost section."""
    def records(case: dict[str, Any], cc: int, _: Any) -> list[dict[str, Any]]:
        out = []
        for stage, kernel in enumerate(suite.case_kernels(case)):
            kw = suite.variant_kwargs(case["variant"], kernel)
            cx = {"H": case["H"], "M": case["m"], "D": case["d"], "C": case["C"],
                  "BM": kw.get("m_block") or 32}
            r = rec(kernel, stage, constexprs=cx, variant=suite.kernel_variant(case["variant"], kernel),
                    num_warps=kw.get("num_warps", 8), in_place=kw["in_place"])
            if kernel == "chunk_state":
                r["grid_dims"] = ["B * H * 2 * ((M + BM - 1) // BM)", "1", "1"]
            out.append(r)
        return out

    def clock(fn: Any, warmup: int, iters: int, graph: bool = False) -> dict[str, Any]:
        fn()
        first = fn.recs[0]
        ms = 1.0 if first["variant"].startswith("m_split") else {4: 3.0, 8: 2.0, 16: 1.5}[first["num_warps"]]
        return {"median_ms": ms}

    monkeypatch.setattr(suite, "aot_records", records)
    monkeypatch.setattr(suite, "time_cuda", clock)
    drv = FakeDriver()
    rows = suite.run_m_split_rule(drv, 86, 16, 3, 19, 5, 3, 1, 1, 0, T=7, device="cpu")
    assert [r["B"] for r in rows] == [1, 2, 3, 6, 12]                # 2 * 3 * B < 16 up to B = 2
    assert [r["rule_takes"] for r in rows] == ["m_split"] * 2 + ["aligned"] * 3
    assert all(r["m_split_over_aligned"] == 0.5 for r in rows)       # the fake clock: split 1 ms, whole 2
    assert [r["rule_picks_faster"] for r in rows] == [True] * 2 + [False] * 3
    assert {k for k, _, _ in drv.launches} == {"chunk_state", "chunk_readout"}
    warps = suite.run_decode_warps(FakeDriver(), 86, 3, 64, 64, 16, 1, 1, 0, device="cpu")
    assert [r["B"] for r in warps] == [1, 8, 64]
    for r in warps:
        assert r["default_warps"] == 8 and r["ms"] == {"4": 3.0, "8": 2.0, "16": 1.5}
        assert r["fastest_warps"] == 16 and r["default_over_fastest"] == 2.0 / 1.5
    assert suite.guarded(lambda: 1 / 0) == [{"error": "ZeroDivisionError: division by zero"}]


def test_d_split_section_checks_and_control_flow(suite: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The d_split section: JIT and AOT checks of both sync modes at odd shapes (a part-filled last
    column block) and the bench shape, a long JIT stream, launch mode first (the never-run spin
    barrier after what is tested); each case its own row (one that raises is a failed row, not a
    lost part); what is done is published in PROGRESS as it goes; --no-timing skips the study."""
    jit, aot = suite.d_split_check_cases()
    for cases in (jit, aot):
        assert {c["d_sync"] for c in cases} == {"spin", "launch"} and cases[0]["d_sync"] == "launch"
        assert any(c["d"] % 16 and c["d"] > 16 for c in cases)           # 40: a part-filled last block
        assert any(c["T"] % c["C"] for c in cases)
    assert all(c["d_block"] == 16 for c in jit) and any(c["T"] >= 1000 for c in jit)
    assert all(c["variant"] == "d_split" and not c.get("opt_in") for c in aot)     # each counts in "ok"
    seen: list[int] = []

    def jit_one(cases: list[dict[str, Any]], seed: int) -> dict[str, Any]:
        (case,) = cases
        seen.append(len(suite.PROGRESS["d_split"]["jit"]["checks"]))      # published before this one
        if case["d_sync"] == "spin" and case["d"] == 40:
            raise RuntimeError("boom")
        return {"ok": True, "checks": [{**case, "ok": True}]}

    monkeypatch.setattr(suite, "run_jit", jit_one)
    monkeypatch.setattr(suite, "aot_check", lambda drv, cc, recs, case, seed: {**case, "ok": False})
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(suite, "cuda_launch", lambda: type("CL", (), {"CudaDriver": object}))
    monkeypatch.setattr(suite, "run_d_split", lambda drv, cc, B, T, w, n, seed: [{"cc": cc, "T": T}])
    args = suite.parse_args(["--out", "x.json", "--quick"])
    out = suite.run_d_split_section(args)
    assert out is suite.PROGRESS["d_split"] and seen == list(range(len(jit)))
    checks = out["jit"]["checks"]
    assert len(checks) == len(jit) and [c.get("error") for c in checks].count("RuntimeError: boom") == 1
    assert out["jit"]["ok"] is False and out["aot"]["ok"] is False and len(out["aot"]["checks"]) == len(aot)
    assert out["ok"] is False and out["timing"] == [{"cc": 90, "T": 2048}]
    assert "timing" not in suite.run_d_split_section(suite.parse_args(["--out", "x.json", "--no-timing"]))


def test_d_split_study_on_fakes(suite: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The AOT timing section's d-axis split study on CPU tensors with fake records, driver and clock:
    per shape and phi one row with the whole-d pass, the split with its spin barrier (one state-pass
    launch, counters zeroed first) and with a launch per step (NC + 1), and each split's time over
    the whole pass's; the variant names give the chunk_state_dsplit record at the default block."""
    from trellis_export.kernels.trellis_memory.chunk_split import default_d_block
    assert suite.case_kernels(dict(kernel="chunk_split", variant="d_split")) == ("chunk_state_dsplit",
                                                                              "chunk_readout")
    assert suite.variant_kwargs("d_split", "chunk_state_dsplit", 128)["d_block"] == default_d_block(128) == 32
    assert "d_block" not in suite.variant_kwargs("d_split", "chunk_readout", 128)
    assert suite.kernel_variant("d_split", "chunk_state_dsplit", 64) == "d_split"
    assert suite.kernel_variant("d_split", "chunk_readout", 64) == "aligned"
    with pytest.raises(ValueError, match="needs the head size"):
        suite.variant_kwargs("d_split", "chunk_state_dsplit")

    def records(case: dict[str, Any], cc: int, _: Any) -> list[dict[str, Any]]:
        out = []
        for stage, kernel in enumerate(suite.case_kernels(case)):
            cx = {"H": case["H"], "M": case["m"], "D": case["d"], "C": case["C"], "BM": 64, "BD": 16,
                  "BC": 16}
            r = rec(kernel, stage, constexprs=cx,
                    variant=suite.kernel_variant(case["variant"], kernel, case["d"]))
            if kernel == "chunk_state_dsplit":
                sig = r["signature"]
                at = [n for n, _ in sig].index("T") + 1
                r["signature"] = sig[:at] + [["S0", "i32"], ["S1", "i32"]] + sig[at:] + \
                    [["ws_z", "*fp32"], ["ws_sync", "*i32"]]
                r["ptx_params"] = ["u32" if t == "i32" else "u64" for _, t in r["signature"]] + ["u64"] * 2
                r["scalars"] = ["T", "S0", "S1"]
                r["workspaces"] = {**r["workspaces"], "ws_z": "B * H * 2 * 2 * BC * BM * 4",
                                   "ws_sync": "(1 + B * H * 2) * 4"}
            out.append(r)
        return out

    def clock(fn: Any, warmup: int, iters: int, graph: bool = False, reps: int = 20) -> dict[str, Any]:
        assert graph                   # in a CUDA graph: the launch mode's host work is not timed
        fn()
        return {"median_ms": 2.0 if fn.recs[0]["variant"] == "aligned" else
                1.0 if fn.case.get("d_sync") == "spin" else 3.0, "method": "cuda_graph"}

    monkeypatch.setattr(suite, "aot_records", records)
    monkeypatch.setattr(suite, "time_cuda", clock)
    drv = FakeDriver()
    rows = suite.run_d_split(drv, 86, 1, 7, 1, 1, 0, device="cpu")
    assert [(r["d"], r["phi"]) for r in rows] == [(64, "identity"), (64, "ln_silu"), (128, "identity"),
                                                  (128, "ln_silu")]
    for r in rows:
        assert (r["d_split_spin_over_whole"], r["d_split_launch_over_whole"]) == (0.5, 1.5), r
        assert (r["d_split_spin_state_over_whole"], r["d_split_launch_state_over_whole"]) == (0.5, 1.5), r
    NC = (7 + 2 * 16 - 2) // 16
    kernels = [k for k, _, _ in drv.launches]
    # per (shape, phi) and run, the state pass alone then with the read-out: whole (1), spin (1),
    # launch (NC + 1 state-pass launches)
    per = []
    for state in (["chunk_state"], ["chunk_state_dsplit"], ["chunk_state_dsplit"] * (NC + 1)):
        per += state + state + ["chunk_readout"]
    assert kernels == per * 4


@pytest.mark.skipif(__import__("shutil").which("shellcheck") is None,
                    reason="shellcheck is not installed (apt-get install -y shellcheck; CI installs it)")
def test_device_scripts_are_shellcheck_clean() -> None:
    import subprocess
    scripts = sorted(str(p) for p in (ROOT / "bench" / "device").glob("*.sh"))
    assert [Path(p).name for p in scripts] == ["prepare.sh", "run.sh"]
    proc = subprocess.run(["shellcheck", "--severity=style", *scripts], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_device_run_script_end_to_end_without_a_gpu(tmp_path: Path) -> None:
    """bench/device/run.sh as the device call runs it, here: the suite from the checkout, its
    arguments passed through, JSON and log in $OUT; without CUDA the suite says so and exits 1, and
    the script passes that exit code on."""
    import subprocess
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OUT"] = str(tmp_path)
    proc = subprocess.run(["bash", str(ROOT / "bench" / "device" / "run.sh"), "--sections", "aot_timing",
                           "--quick"], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    data = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert data["errors"]["cuda"] == "no CUDA device visible to torch"
    assert data["args"]["sections"] == ["aot_timing"] and data["args"]["quick"] is True
    assert "no CUDA device" in (tmp_path / "gpu_suite.log").read_text()


def test_readme_device_call_parses(suite: Any) -> None:
    """The README's device command line: the suite accepts its arguments, it runs every section that
    can run there (all but trt, which cannot travel), the never-run d_split last, under a watchdog."""
    lines = [ln for ln in (ROOT / "README.md").read_text().splitlines()
             if ln.startswith("bash bench/device/run.sh ")]
    assert len(lines) == 1, lines
    args = suite.parse_args(["--out", "x.json", *lines[0].split()[2:]])
    assert set(args.sections) == set(suite.SECTIONS) - {"trt"} and args.sections[-1] == "d_split"
    assert args.section_timeout.get("d_split", 0) > 0 and args.quick


def test_section_watchdog_ends_a_hung_section(suite: Any, tmp_path: Path) -> None:
    """--section-timeout: a section that never returns (a kernel whose spin barrier never opens, on a
    GPU) ends the process with exit code 3 after its limit, with the results so far, what the
    section published and its error written; also when the results cannot be written. A section
    that returns in time leaves no timer behind, and a timer that fires just after ``stop`` does
    nothing. The limits: one for every section, or per section by name."""
    assert suite.section_limits("") == {} and suite.section_limits("300") == {"*": 300.0}
    assert suite.section_limits("d_split=150, jit=400") == {"d_split": 150.0, "jit": 400.0}
    for bad, why in (("bogus=3", "no section 'bogus'"), ("0", "> 0"), ("d_split=x", "not a number")):
        with pytest.raises(ValueError, match=why):
            suite.section_limits(bad)
    with pytest.raises(SystemExit):
        suite.parse_args(["--out", "x.json", "--section-timeout", "d_split=-1"])
    wd = suite.SectionWatchdog({"d_split": 60.0}, tmp_path / "unused.json", {"errors": {}})
    assert (wd.limit("d_split"), wd.limit("jit")) == (60.0, 0.0)
    wd.start("d_split")
    wd.stop()
    wd.expire("d_split")                             # fired as the section finished: no exit, no write
    assert not (tmp_path / "unused.json").exists()
    import subprocess
    import sys
    import time
    out = tmp_path / "r.json"
    path = str(ROOT / "bench" / "gpu_suite.py")
    code = (
        "import importlib.util, sys, time\n"
        f"spec = importlib.util.spec_from_file_location('gpu_suite', {path!r})\n"
        "suite = importlib.util.module_from_spec(spec); spec.loader.exec_module(suite)\n"
        "results = {'errors': {}, 'jit': {'ok': True, 'checks': []}}\n"
        "suite.PROGRESS['d_split'] = {'jit': {'checks': [{'ok': True}]}}\n"
        "wd = suite.SectionWatchdog({'d_split': 0.5}, sys.argv[1], results)\n"
        "wd.start('jit'); wd.stop()\n"
        "wd.start('d_split')\n"
        "time.sleep(60)\n"
        "print('not reached')\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code, str(out)], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert time.monotonic() - t0 < 50 and "not reached" not in proc.stdout
    data = json.loads(out.read_text())
    assert "--section-timeout 0.5 s" in data["errors"]["d_split"] and data["ok"] is False
    assert data["jit"]["ok"] and "jit" not in data["errors"]
    assert data["d_split"] == {"jit": {"checks": [{"ok": True}]}, "incomplete": True}
    assert "d_split" in proc.stdout                                   # the summary table was printed
    # the results cannot be written (the path is a directory): it still ends the process
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 3 and "could not write the results" in proc.stderr, proc.stderr


def test_record_store_compiles_once_and_round_trips(suite: Any, tmp_path: Path) -> None:
    """RecordStore: a record compiled once (in a child process: this one runs triton's interpreter)
    is served from the store after that, survives save / load, and a file that is not a store is
    refused (a run with it goes on compiling and says so in its JSON)."""
    store = suite.RecordStore()
    kw = dict(heads=3, slots=7, head_dim=5, chunk_size=3, phi="l2_silu", decode=True)
    (rec,) = store.compile_many([("fused_recurrent", 90, kw)])
    assert rec["variant"] == "decode" and rec["cc"] == 90 and ".target sm_90" in rec["ptx"]
    assert store.compile("fused_recurrent", 90, **kw) is rec
    assert (store.compiled, store.hits) == (1, 1)
    path = tmp_path / "records.json.gz"
    store.save(path)
    again = suite.RecordStore()
    again.load(path)
    assert again.compile("fused_recurrent", 90, **kw) == rec and again.summary()["records_from_store"] == 1
    assert again.summary()["records_compiled_here"] == 0 and again.summary()["source"] == str(path)
    bad = tmp_path / "bad.gz"
    bad.write_bytes(__import__("gzip").compress(b'{"format": "other"}'))
    with pytest.raises(ValueError, match="not a record store"):
        suite.RecordStore().load(bad)
    # --prepare-records checks its path before compiling anything: a directory is refused at once
    assert suite.main(["--prepare-records", str(tmp_path)]) == 2
    # a bad store does not cost a GPU run: the suite goes on compiling, and the JSON says why
    assert suite.main(["--out", str(tmp_path / "x.json"), "--records", str(bad)]) == 1
    errors = json.loads((tmp_path / "x.json").read_text())["errors"]
    assert "not a record store" in errors["records"] and "records compiled here" in errors["records"]
    assert errors["cuda"] == "no CUDA device visible to torch"


def test_prepare_records_covers_every_record_the_sections_launch(suite: Any, monkeypatch: pytest.MonkeyPatch,
                                                                 tmp_path: Path) -> None:
    """--prepare-records asks the store for the records of every AOT case, every timing case (the
    decode variants, the warp study, the prefill runs with the m-axis split) and every plugin case;
    recorded here with a stand-in compiler."""
    asked: list[tuple[str, int, dict[str, Any]]] = []

    def fake_many(calls: list[tuple[str, int, dict[str, Any]]]) -> list[dict[str, Any]]:
        asked.extend(calls)
        return [{"kernel": k, "stage": 0} for k, _, _ in calls]

    store = suite.RecordStore()
    monkeypatch.setattr(store, "compile_many", fake_many)
    monkeypatch.setattr(suite, "STORE", store)
    monkeypatch.setattr(store, "save", lambda path: None)
    suite.prepare_records(str(tmp_path / "s.gz"), 90)
    assert {k for k, _, _ in asked} == {"fused_recurrent", "chunk", "chunk_state", "chunk_readout",
                                        "chunk_state_dsplit"}
    assert any(kw.get("m_block") == 16 for _, _, kw in asked)
    assert {kw.get("num_warps") for _, _, kw in asked} >= {4, 16}
    assert all(cc == 90 for _, cc, _ in asked)
    from trellis_export.plugins_trt import plugin_v3
    n_plugin = sum(len(plugin_v3.record_arguments(suite.plugin_attrs(c), heads=c["H"], slots=c["m"],
                                                  head_dim=c["d"], dtype=c["dtype"]))
                   for c in suite.plugin_cases(quick=False))
    n_aot = sum(len(suite.case_kernels(c))
                for c in suite.aot_cases() + suite.timing_cases() + suite.d_split_record_cases())
    assert len(asked) == n_plugin + n_aot


def test_suite_imports_every_subpackage_from_a_bare_checkout(tmp_path: Path) -> None:
    """On the lent GPU machine the project is not installed: the suite maps the sub-packages that
    live in other folders (pyproject package-dir: kernels/, plugins_trt/, cli/) itself. Checked in a
    Python whose site hooks are off (``-S``: no editable-install finder), the dependencies on
    PYTHONPATH, started outside the checkout."""
    import site
    import subprocess
    script = (
        "import importlib.util, sys\n"
        f"path = {str(ROOT / 'bench' / 'gpu_suite.py')!r}\n"
        "spec = importlib.util.spec_from_file_location('gpu_suite', path)\n"
        "suite = importlib.util.module_from_spec(spec); spec.loader.exec_module(suite)\n"
        "suite.import_project()\n"
        "from trellis_export.plugins_trt import plugin_v3\n"
        "from trellis_export.kernels import cuda_launch\n"
        "import trellis_export.cli, trellis_export.kernels.trellis_memory.utils\n"
        "print(sorted(suite.source_subpackages()))\n"
        "print(plugin_v3.__file__); print(cuda_launch.__file__)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH")}
    env["PYTHONPATH"] = os.pathsep.join(site.getsitepackages())
    proc = subprocess.run([__import__("sys").executable, "-S", "-c", script], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0] == str(["trellis_export.cli", "trellis_export.kernels", "trellis_export.plugins_trt"])
    assert lines[1] == str(ROOT / "plugins_trt" / "plugin_v3.py")
    assert lines[2] == str(ROOT / "kernels" / "cuda_launch.py")
