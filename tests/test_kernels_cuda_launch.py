"""The pure parts of ``trellis_export.kernels.cuda_launch`` on the CPU (no GPU, no libcuda).

The driver calls themselves (``CudaDriver``) need a GPU and run only in ``bench/gpu_suite.py``;
here a fake ``libcuda`` checks the call sequence of ``load_record`` / ``launch_record``.
"""

from __future__ import annotations

import base64
import ctypes
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from trellis_export.kernels import cuda_launch as cl

from trellis_export.opdef import INPUTS, OUTPUTS


def record(**extra: Any) -> dict[str, Any]:
    """A launch record shaped like ``AOTKernel.to_dict()`` (the full op signature)."""
    sig = [[n, "*i64" if n == "position" else "*fp32"] for n in INPUTS] + [["T", "i32"]]
    sig += [[f"out_{n}", "*fp32"] for n in OUTPUTS]
    rec = {"name": "fused_recurrent_trellis_fwd_kernel", "signature": sig, "inputs": list(INPUTS),
           "scalars": ["T"], "outputs": [f"out_{n}" for n in OUTPUTS],
           "hidden_params": ["global_scratch", "profile_scratch"],
           "ptx_params": ["u64"] * len(INPUTS) + ["u32"] + ["u64"] * (len(OUTPUTS) + 2),
           "constexprs": {"H": 3, "M": 7, "D": 5, "C": 3}, "block": [128, 1, 1], "shared_mem": 0,
           "global_scratch_size": 0, "ptx": ".version 8.5\n.target sm_87\n", "cubin_b64": ""}
    rec.update(extra)
    return rec


def pointers(base: int = 0x7F0000000000, in_place: bool = False) -> dict[str, int]:
    names = list(INPUTS) + [f"out_{n}" for n in OUTPUTS]
    p = {n: base + 0x10000 * i for i, n in enumerate(names)}
    if in_place:
        for out, inp in cl.STATE_ALIASES.items():
            p[out] = p[inp]
    return p


def test_import_needs_neither_torch_nor_triton() -> None:
    code = ("import sys; import trellis_export.kernels.cuda_launch as c; "
            "assert 'torch' not in sys.modules and 'triton' not in sys.modules, sorted(sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_launch_args_follow_the_record_order_with_null_hidden_params() -> None:
    rec, ptrs = record(), pointers()
    args = cl.launch_args(rec, ptrs, {"T": 9})
    names = [a.name for a in args]
    assert names == [n for n, _ in rec["signature"]] + ["global_scratch", "profile_scratch"]
    assert names[:len(INPUTS)] == list(INPUTS) and names[len(INPUTS)] == "T"
    assert [a.ptx_type for a in args] == rec["ptx_params"]
    assert [a.value for a in args] == [ptrs[n] for n in INPUTS] + [9] + \
        [ptrs[f"out_{n}"] for n in OUTPUTS] + [0, 0]


def test_pack_params_points_at_each_value() -> None:
    rec, ptrs = record(), pointers()
    arr, keep = cl.pack_params(rec, ptrs, {"T": 7})
    assert len(keep) == len(rec["ptx_params"]) == 19
    i_t = len(INPUTS)
    assert ctypes.cast(arr[i_t], ctypes.POINTER(ctypes.c_int32)).contents.value == 7
    assert ctypes.cast(arr[0], ctypes.POINTER(ctypes.c_uint64)).contents.value == ptrs["q"]
    assert ctypes.cast(arr[i_t + 1], ctypes.POINTER(ctypes.c_uint64)).contents.value == ptrs["out_o"]
    assert ctypes.cast(arr[18], ctypes.POINTER(ctypes.c_uint64)).contents.value == 0


def test_mismatches_raise_with_the_offending_name() -> None:
    rec, ptrs = record(), pointers()
    with pytest.raises(cl.LaunchError, match="PTX entry declares 18 params"):
        cl.launch_args(record(ptx_params=rec["ptx_params"][:-1]), ptrs, {"T": 1})
    bad = list(rec["ptx_params"])
    bad[len(INPUTS)] = "u64"
    with pytest.raises(cl.LaunchError, match=r"T is u32 here but \.param \.u64"):
        cl.launch_args(record(ptx_params=bad), ptrs, {"T": 1})
    del ptrs["out_o"]
    with pytest.raises(cl.LaunchError, match="no pointer given for out_o"):
        cl.launch_args(rec, ptrs, {"T": 1})
    with pytest.raises(cl.LaunchError, match="no value given for scalar T"):
        cl.launch_args(rec, pointers(), {})
    with pytest.raises(cl.LaunchError, match="does not fit int32"):
        cl.launch_args(rec, pointers(), {"T": 1 << 31})


def test_specialised_records_check_their_preconditions() -> None:
    aligned = record(aligned=True, alignment=16)
    cl.launch_args(aligned, pointers(), {"T": 3})
    odd = pointers()
    odd["k"] += 4
    with pytest.raises(cl.LaunchError, match="k = .* is not 16-byte aligned"):
        cl.launch_args(aligned, odd, {"T": 3})
    decode = record(decode=True)
    cl.launch_args(decode, pointers(), {"T": 1})
    with pytest.raises(cl.LaunchError, match="decode record takes T = 1 only"):
        cl.launch_args(decode, pointers(), {"T": 2})
    inplace = record(in_place=True)
    cl.launch_args(inplace, pointers(in_place=True), {"T": 1})
    with pytest.raises(cl.LaunchError, match="out_key_memory == key_memory"):
        cl.launch_args(inplace, pointers(), {"T": 1})
    # most specialised first; the general record takes what the others refuse
    general = record()
    recs = [record(aligned=True, decode=True, name="a"), record(aligned=True, name="b"), general]
    assert cl.select_record(recs, pointers(), {"T": 1})["name"] == "a"
    assert cl.select_record(recs, pointers(), {"T": 5})["name"] == "b"
    assert cl.select_record(recs, odd, {"T": 1}) is general
    with pytest.raises(cl.LaunchError, match="no record fits"):
        cl.select_record(recs[:2], odd, {"T": 1})


def test_m_split_record_is_chosen_by_occupancy() -> None:
    """The m-axis split record (``m_block``) is correct for any B; ``select_record`` takes it while the
    unsplit state pass (B * H * 2 programs, H = 3 here) would leave SMs idle, or when rows or SMs are
    not known; otherwise the next record. Alignment still applies to it."""
    split = record(aligned=True, m_block=16, name="split")
    whole = record(aligned=True, name="whole")
    general = record(name="general")
    recs = [split, whole, general]
    assert cl.split_fills(1, 8, 132) and cl.split_fills(8, 8, 132) and not cl.split_fills(9, 8, 132)
    assert cl.split_fills(100, 8, None)
    assert cl.select_record(recs, pointers(), {"T": 9})["name"] == "split"                 # not known
    assert cl.select_record(recs, pointers(), {"T": 9}, rows=2, sms=16)["name"] == "split"  # 12 < 16
    assert cl.select_record(recs, pointers(), {"T": 9}, rows=3, sms=16)["name"] == "whole"  # 18 >= 16
    assert cl.select_record(recs, pointers(), {"T": 9}, rows=1, sms=None)["name"] == "split"
    odd = pointers()
    odd["k"] += 4
    assert cl.select_record(recs, odd, {"T": 9}, rows=1, sms=132) is general


def test_grid_and_module_image() -> None:
    assert cl.grid_for(record(), 5) == (15, 1, 1)
    two_axis = record(grid_dims=["(NC + 1) * 2", "B * H", "1"], constexprs={"H": 3, "NC": 4})
    assert cl.grid_for(two_axis, 2) == (10, 6, 1)
    readout = record(grid_dims=["(T + 2 * C - 2) // C", "B * H", "1"],
                     workspaces={"ws_u": "B * H * 2 * ((T + 2 * C - 2) // C) * C * M * 4"})
    assert cl.grid_for(readout, 2, 10) == (4, 6, 1)            # C = 3: (10 + 4) // 3
    assert cl.workspace_bytes(readout, 2, 10) == {"ws_u": 2 * 3 * 2 * 4 * 3 * 7 * 4}
    assert cl.workspace_bytes(record(), 2, 10) == {}
    with pytest.raises(cl.LaunchError, match="unsupported grid expression"):
        cl.grid_for(readout, 2)                                # T unknown
    with pytest.raises(cl.LaunchError, match="unsupported grid expression"):
        cl.grid_for(record(grid_dims=["__import__('os')", "1", "1"]), 1)
    with pytest.raises(cl.LaunchError, match="unsupported grid expression"):
        cl.grid_for(record(grid_dims=["B *", "1", "1"]), 1)
    assert cl.grid_for(record(grid_dims=["B // (H - 3)", "7 - B", "1"]), 2) == (0, 5, 1)   # x // 0 is 0
    # each expression is parsed once (the plugin's enqueue evaluates them on every call)
    hits = cl._compile_dim.cache_info().hits
    assert cl.grid_for(readout, 2, 10) == (4, 6, 1) and cl.grid_for(readout, 3, 7) == (3, 9, 1)
    assert cl._compile_dim.cache_info().hits >= hits + 6
    kind, img = cl.module_image(record())
    assert kind == "ptx" and img.endswith(b"\0") and img.startswith(b".version 8.5")
    rec = record(cubin_b64=base64.b64encode(b"\x7fELF...").decode())
    assert cl.module_image(rec) == ("cubin", b"\x7fELF...")
    assert cl.module_image(rec, prefer="ptx")[0] == "ptx"
    with pytest.raises(cl.LaunchError, match="carries no cubin"):
        cl.module_image(record(), prefer="cubin")


class FakeLib:
    """Records the driver calls; ``cuModuleLoadData`` fails on PTX when ``reject_ptx``."""

    def __init__(self, reject_ptx: bool = False) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.reject_ptx = reject_ptx

    def __getattr__(self, name: str) -> Any:
        def call(*args: Any) -> int:
            self.calls.append((name, *args))
            if name == "cuModuleLoadData" and self.reject_ptx:
                buf = args[1]
                if not bytes(buf.raw).startswith(b"\x7fELF"):
                    return 222
            if name == "cuCtxGetCurrent":
                ctypes.cast(args[0], ctypes.POINTER(ctypes.c_void_p)).contents.value = 0x1234
            if name == "cuDeviceGetAttribute":
                val = {cl.CU_DEVICE_ATTRIBUTE_CC_MAJOR: 8, cl.CU_DEVICE_ATTRIBUTE_CC_MINOR: 7,
                       cl.CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT: 16}[args[1]]
                ctypes.cast(args[0], ctypes.POINTER(ctypes.c_int)).contents.value = val
            if name == "cuGetErrorString":
                ctypes.cast(args[1], ctypes.POINTER(ctypes.c_char_p)).contents.value = b"unsupported PTX"
            return 0
        return call


def test_driver_call_sequence_with_a_fake_libcuda() -> None:
    lib = FakeLib(reject_ptx=True)
    drv = cl.CudaDriver(lib=lib)
    rec = record(shared_mem=64 * 1024, cubin_b64=base64.b64encode(b"\x7fELFcubin").decode())
    k = drv.load_record(rec, prefer="ptx")
    assert k.image.startswith("cubin (PTX load failed: cuModuleLoadData failed: CUresult 222")
    names = [c[0] for c in lib.calls]
    assert names[:2] == ["cuInit", "cuCtxGetCurrent"]
    assert "cuFuncSetAttribute" in names                      # > 48 KB: the opt-in
    attr = [c for c in lib.calls if c[0] == "cuFuncSetAttribute"][0]
    assert attr[2] == cl.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES and attr[3].value == 64 * 1024
    drv.launch_record(k, pointers(), {"T": 4}, B=5, stream=0xABC)
    launch = lib.calls[-1]
    assert launch[0] == "cuLaunchKernel"
    assert [x.value for x in launch[2:8]] == [15, 1, 1, 128, 1, 1]
    assert launch[8].value == 64 * 1024 and launch[9].value == 0xABC
    assert drv.compute_capability() == 87
    assert drv.multiprocessor_count() == 16
    asked = sum(1 for c in lib.calls if c[0] == "cuDeviceGetAttribute")
    assert drv.compute_capability() == 87 and drv.multiprocessor_count() == 16
    assert sum(1 for c in lib.calls if c[0] == "cuDeviceGetAttribute") == asked     # asked once
    small = cl.CudaDriver(lib=FakeLib()).load_record(record())
    assert small.image == "ptx"
    with pytest.raises(cl.CudaError, match="CUresult 222"):
        cl.CudaDriver(lib=FakeLib(reject_ptx=True)).load_record(record())


def test_enqueue_host_bench_runs(tmp_path: Path) -> None:
    """bench/bench_enqueue.py (the plugin's enqueue host time, no device) end to end on tiny settings:
    the JSON has the machine and, per case, the records the plugin launched; a directory as --out is
    refused with one error line before any work."""
    import json
    import os

    script = Path(__file__).resolve().parents[1] / "bench" / "bench_enqueue.py"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}     # compiles records
    out = tmp_path / "enqueue.json"
    small = ["--heads", "2", "--slots", "7", "--head-dim", "5", "--chunk-size", "3", "--calls", "3",
             "--reps", "1"]
    res = subprocess.run([sys.executable, str(script), *small, "--out", str(out)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    rep = json.loads(out.read_text())
    assert rep["machine"]["logical_cores"] >= 1
    launched = {r["case"]: r["launched"] for r in rep["rows"]}
    assert launched["decode, aliased state"] == ["fused_recurrent:decode_in_place"]
    assert launched["decode"] == ["fused_recurrent:decode"]
    assert launched["prefill T=512"] == ["chunk_state:aligned", "chunk_readout:aligned"]
    assert all(r["us_per_enqueue"] > 0 and r["us_per_enqueue_parsing_each_call"] > 0 for r in rep["rows"])
    res = subprocess.run([sys.executable, str(script), *small, "--out", str(tmp_path)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 2 and res.stderr.startswith("error:") and "--out" in res.stderr
