"""The TensorRT plugins: the IPluginV3 one registered with TensorRT-RTX for real (it is what
``trellis-export engine --plugin`` builds with, see tests/test_engine.py), and the QDP AOT plugin for
enterprise TensorRT >= 10.8, whose registration needs ``tensorrt`` (not installable here).

The IPluginV3 plugin's ``enqueue`` runs here for real on the host: the plugin is made by its creator
from serialised fields (as an engine deserialises it) holding AOT records compiled for sm_86, and
``HostDriver`` -- ``CudaDriver``'s interface on host memory -- executes each record it is asked to
launch. PTX cannot run on a CPU, so it runs the record's kernel function (``kernels/trellis_memory``,
under triton's interpreter) with the record's constexprs, num_warps and ``cuda_launch.grid_for`` grid,
on views of the host buffers at the addresses the plugin passed; the launch arguments go through
``cuda_launch.launch_args`` first (the order, PTX types and precondition checks of a real launch).
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import os
import subprocess
import sys
from typing import Any

import pytest
import torch
from conftest import TOL_SHORT, assert_rel_close, make_op_inputs, run_op
from trellis_export.plugins_trt.trellis_memory import launch_plan, register_plugin, type_combination

from trellis_export.opdef import INPUTS, OP_TYPE, OUTPUTS, PLUGIN_NAMESPACE, PLUGIN_VERSION

HAVE_RTX = importlib.util.find_spec("tensorrt_rtx_bindings") is not None


def test_qdp_type_combination_follows_the_v3_rule() -> None:
    """Both plugins admit the same types per I/O position: the QDP string (built from the V3 rule) is
    read back per position and each column must be what the V3 format check accepts."""
    from trellis_export.plugins_trt.plugin_v3 import io_dtype_rule

    cols = type_combination(("float32", "float16")).split(", ")
    assert len(cols) == len(INPUTS) + len(OUTPUTS)
    back = {"FP32": "float32", "FP16": "float16", "INT64": "int64"}
    for pos, col in enumerate(cols):
        want = {io_dtype_rule(pos, "float32"), io_dtype_rule(pos, "float16")}
        assert {back[c] for c in col.split("|")} == want, f"position {pos}"


def test_launch_plan_of_a_compiled_record() -> None:
    """A real AOT record (PTX compiled here): the plan names the PTX's entry, passes one scalar per
    ``.u32`` parameter of the entry, and refuses a record whose argument order was changed."""
    code = (
        "import json\n"
        "from trellis_export.kernels.aot import compile_kernel\n"
        "from trellis_export.plugins_trt.trellis_memory import launch_plan\n"
        "r = compile_kernel('fused_recurrent', 80, heads=3, slots=7, head_dim=5, chunk_size=3).to_dict()\n"
        "p = launch_plan(r)\n"
        "print(json.dumps({'entry_ok': ('.entry ' + p['kernel_name']) in r['ptx'],\n"
        "                  'u32': sum(1 for t in r['ptx_params'] if t == 'u32'),\n"
        "                  'extra': p['extra_args'], 'block': list(p['block']), 'warps': r['num_warps'],\n"
        "                  'H': p['H']}))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    import json

    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["entry_ok"] and got["H"] == 3
    assert len(got["extra"]) == got["u32"] == 1 and got["extra"] == ["q.shape[1]"]
    assert got["block"] == [32 * got["warps"], 1, 1]
    sig = [[n, "*fp32"] for n in INPUTS] + [["T", "i32"]] + [[f"out_{o}", "*fp32"] for o in OUTPUTS]
    with pytest.raises(ValueError, match="argument order"):
        launch_plan({"signature": sig[::-1], "inputs": list(INPUTS)})


@pytest.mark.tensorrt_rtx
@pytest.mark.skipif(not HAVE_RTX, reason='TensorRT-RTX is not installed (pip install -e ".[tensorrt-rtx]")')
def test_v3_plugin_registers_with_tensorrt_rtx() -> None:
    """The creator lands in TensorRT-RTX's registry under the op's name / version / namespace, once;
    taking it out for a function-body build puts it back after."""
    from trellis_export.plugins_trt import plugin_v3
    from trellis_export.plugins_trt.runtimes import load_tensorrt

    trt = load_tensorrt("tensorrt-rtx").trt
    creator = plugin_v3.register(trt, targets=[86])
    assert plugin_v3.register(trt) is creator and creator.targets == (86,)
    reg = trt.get_plugin_registry()
    found = reg.get_creator(OP_TYPE, PLUGIN_VERSION, PLUGIN_NAMESPACE)
    assert found is not None and found.name == OP_TYPE and found.plugin_namespace == PLUGIN_NAMESPACE
    with plugin_v3.unregistered(trt):
        assert reg.get_creator(OP_TYPE, PLUGIN_VERSION, PLUGIN_NAMESPACE) is None
    assert reg.get_creator(OP_TYPE, PLUGIN_VERSION, PLUGIN_NAMESPACE) is not None


@pytest.mark.tensorrt
@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None, reason="tensorrt is not importable")
def test_qdp_plugin_registers_with_tensorrt() -> None:   # pragma: no cover - never run here
    import tensorrt as trt

    register_plugin()
    register_plugin()                                 # idempotent
    assert trt.get_plugin_registry().get_creator(OP_TYPE, PLUGIN_VERSION, PLUGIN_NAMESPACE) is not None


# ------------------------------------------------------------------------------------------ enqueue
#: The odd shapes of the house rules and an op whose nonlinearities differ per role.
ATTRS = {"chunk_size": 3, "phi": "ln_silu", "f": "l2_silu", "rho": "identity", "eps": 1e-5}
SHAPE = {"heads": 3, "slots": 7, "head_dim": 5}
CC = 86
_PTR_DTYPES = {"*fp32": torch.float32, "*fp16": torch.float16, "*i64": torch.int64, "*i32": torch.int32}


def _kernel_functions() -> dict[str, Any]:
    from trellis_export.kernels.trellis_memory.chunk import chunk_trellis_fwd_kernel
    from trellis_export.kernels.trellis_memory.chunk_split import (
        chunk_readout_kernel,
        chunk_state_dsplit_kernel,
        chunk_state_kernel,
    )
    from trellis_export.kernels.trellis_memory.fused_recurrent import fused_recurrent_trellis_fwd_kernel

    fns = {"fused_recurrent": fused_recurrent_trellis_fwd_kernel, "chunk": chunk_trellis_fwd_kernel,
           "chunk_state": chunk_state_kernel, "chunk_readout": chunk_readout_kernel,
           "chunk_state_dsplit": chunk_state_dsplit_kernel}
    if any(type(f).__name__ != "InterpretedFunction" for f in fns.values()):
        pytest.skip("the kernels were imported without TRITON_INTERPRET=1 (run this module alone)")
    return fns


class HostDriver:
    """``CudaDriver``'s interface on host memory: ``load_record`` keeps the record, ``launch_record``
    runs the record's kernel under triton's interpreter on the host buffers the pointers point into
    (see the module docstring). ``launches``: (kernel, variant, stream, grid, pointers) in order."""

    def __init__(self, cc: int, buffers: list[torch.Tensor], sms: int = 132) -> None:
        self.cc = cc
        self.sms = sms
        self.buffers = buffers
        self.fns = _kernel_functions()
        self.loaded: list[tuple[str, str]] = []
        self.launches: list[tuple[str, str, int, tuple[int, int, int], dict[str, int]]] = []

    def compute_capability(self) -> int:
        return self.cc

    def multiprocessor_count(self) -> int:
        return self.sms

    def load_record(self, record: dict[str, Any], prefer: str = "auto") -> Any:
        from trellis_export.kernels.cuda_launch import LoadedKernel

        self.loaded.append((record["kernel"], record["variant"]))
        return LoadedKernel(record, ctypes.c_void_p(), ctypes.c_void_p(), "host (triton interpreter)")

    def _at(self, address: int, ptr_type: str) -> torch.Tensor:
        dtype = _PTR_DTYPES[ptr_type]
        size = torch.empty(0, dtype=dtype).element_size()
        for buf in self.buffers:
            raw = buf.view(-1).view(torch.uint8)
            off = address - raw.data_ptr()
            if 0 <= off < raw.numel():
                return raw[off:off + (raw.numel() - off) // size * size].view(dtype)
        raise AssertionError(f"pointer {address:#x} is in no host buffer")

    def launch_record(self, kernel: Any, pointers: dict[str, int], scalars: dict[str, int], B: int,
                      stream: int = 0) -> None:
        from trellis_export.kernels.cuda_launch import grid_for, launch_args

        rec = kernel.record
        args = launch_args(rec, pointers, scalars)
        values = [self._at(a.value, ty) if ty.startswith("*") else a.value
                  for a, (_, ty) in zip(args, rec["signature"])]
        grid = grid_for(rec, B, scalars.get("T"))
        self.fns[rec["kernel"]][grid](*values, **rec["constexprs"], num_warps=rec["num_warps"],
                                      num_stages=rec["num_stages"])
        self.launches.append((rec["kernel"], rec["variant"], stream, grid, dict(pointers)))


@pytest.fixture(scope="module")
def records() -> list[dict[str, Any]]:
    """The records an engine of the odd op carries (real PTX for sm_86, compiled in a child process)."""
    from trellis_export.plugins_trt.plugin_v3 import compile_records

    return compile_records(ATTRS, **SHAPE, dtype="float32", targets=[CC])


def test_plugin_arg_names_are_the_kernels() -> None:
    from trellis_export.kernels.trellis_memory import utils
    from trellis_export.plugins_trt import plugin_v3

    assert plugin_v3.INPUT_ARGS == utils.INPUT_ARGS and plugin_v3.OUTPUT_ARGS == utils.OUTPUT_ARGS
    assert plugin_v3.SPLIT_PREFILL == utils.SPLIT_KERNELS
    assert set(plugin_v3.KERNEL_FOR_T.values()) == set(utils.KERNELS)


def test_plan_and_workspace_layout(records: list[dict[str, Any]]) -> None:
    """Host-side choice without TensorRT: the split prefill's workspaces at 256-byte offsets, each as
    large as ``cuda_launch.workspace_bytes`` says; stage 0 then stage 1; the fallbacks."""
    from trellis_export.kernels.cuda_launch import workspace_bytes
    from trellis_export.plugins_trt.plugin_v3 import (
        WORKSPACE_ALIGN,
        plan_launches,
        prefill_kernels,
        workspace_layout,
        workspace_size,
    )

    assert {r["kernel"] for r in records} == {"fused_recurrent", "chunk", "chunk_state", "chunk_readout"}
    assert not any("tf32" in r["variant"] for r in records)
    B, T = 3, 8
    layout = workspace_layout(records, B, T)
    want = workspace_bytes(next(r for r in records if r["kernel"] == "chunk_state"), B, T)
    assert {n: size for n, (_, size) in layout.items()} == want and set(want) == {"ws_memory", "ws_u"}
    spans = sorted(layout.values())
    assert spans[0][0] == 0 and all(o % WORKSPACE_ALIGN == 0 for o, _ in spans)
    assert all(o1 + n1 <= o2 for (o1, n1), (o2, _) in zip(spans, spans[1:]))
    assert workspace_size(records, B, T) >= spans[-1][0] + spans[-1][1]
    assert workspace_size(records, B, 1) == 0
    assert workspace_size(records, B, T) < workspace_size(records, B, T + 3)
    ins, outs, ws = [4096 * (i + 1) for i in range(11)], [65536 * (i + 1) for i in range(5)], 1 << 24
    plan = plan_launches(records, CC, B, T, ins, outs, ws)
    assert [(r["kernel"], r["stage"], r["variant"]) for r, _, _ in plan] == \
        [("chunk_state", 0, "aligned"), ("chunk_readout", 1, "aligned")]
    assert plan[0][1] is plan[1][1] and plan[0][1]["ws_memory"] == ws + layout["ws_memory"][0]
    assert [r["kernel"] for r, _, _ in plan_launches(records, CC, B, T, ins, outs, 0)] == ["chunk"]
    old = [r for r in records if r["kernel"] != "chunk_readout"]
    assert prefill_kernels(old) == ["chunk"] and workspace_size(old, B, T) == 0
    assert [r["kernel"] for r, _, _ in plan_launches(old, CC, B, T, ins, outs, ws)] == ["chunk"]
    (dec,) = plan_launches(records, CC, B, 1, ins, outs, ws)
    assert (dec[0]["kernel"], dec[0]["variant"]) == ("fused_recurrent", "decode")
    (dec,) = plan_launches(records, CC, B, 1, ins, [outs[0], *ins[6:10]], ws)
    assert dec[0]["variant"] == "decode_in_place"


def _rtx() -> Any:
    if not HAVE_RTX:
        pytest.skip('TensorRT-RTX is not installed (pip install -e ".[tensorrt-rtx]")')
    from trellis_export.plugins_trt.runtimes import load_tensorrt

    return load_tensorrt("tensorrt-rtx").trt


def _runtime_plugin(trt: Any, records: list[dict[str, Any]], attrs: dict[str, Any] = ATTRS) -> Any:
    """The plugin as an engine deserialises it: the creator, from the serialised fields."""
    from trellis_export.plugins_trt import plugin_v3

    _, creator_cls = plugin_v3.make_classes(trt)
    fields = plugin_v3.plugin_fields(trt, {**attrs, plugin_v3.KERNELS_FIELD: json.dumps(records)})
    return creator_cls().create_plugin(OP_TYPE, trt.PluginFieldCollection(fields), trt.TensorRTPhase.RUNTIME)


def _dynamic_desc(trt: Any, dims: list[int], max_dims: list[int]) -> Any:
    desc = trt.DynamicPluginTensorDesc()
    desc.desc.dims = trt.Dims(dims)
    desc.min, desc.opt, desc.max = trt.Dims(dims), trt.Dims(dims), trt.Dims(max_dims)
    return desc


@pytest.mark.tensorrt_rtx
def test_aliasing_is_declared_only_when_the_builder_enables_it(records: list[dict[str, Any]]) -> None:
    """``get_aliased_input``: the memory outputs name their inputs once the engine builder turned on
    TensorRT's aliased-plugin-I/O preview feature (``build_state["alias_io"]``), none before."""
    from trellis_export.plugins_trt import plugin_v3

    trt = _rtx()
    assert plugin_v3.ALIAS_PREVIEW_FEATURE in trt.PreviewFeature.__members__
    plugin = _runtime_plugin(trt, records)
    assert isinstance(plugin, trt.IPluginV3OneBuildV2)
    n_out = len(OUTPUTS)
    assert [plugin.get_aliased_input(i) for i in range(n_out)] == [-1] * n_out
    plugin.build_state["alias_io"] = True
    got = [plugin.get_aliased_input(i) for i in range(n_out)]
    assert got[0] == -1 and [INPUTS[i] for i in got[1:]] == list(OUTPUTS[1:])
    assert plugin_v3.aliased_outputs(1) == {}


#: case -> (T, outputs alias the memory inputs, workspace offset from a 256-byte boundary, records kept,
#: the (kernel, variant) launches the plugin must make)
CASES: dict[str, tuple[int, bool, int, str, list[tuple[str, str]]]] = {
    "prefill": (8, False, 0, "all", [("chunk_state", "aligned"), ("chunk_readout", "aligned")]),
    "prefill_aliased": (8, True, 0, "all", [("chunk_state", "aligned"), ("chunk_readout", "aligned")]),
    "prefill_unaligned_workspace": (7, False, 4, "all", [("chunk_state", "unaligned"),
                                                         ("chunk_readout", "unaligned")]),
    "prefill_old_engine": (8, False, 0, "no_split", [("chunk", "aligned")]),
    "decode": (1, False, 0, "all", [("fused_recurrent", "decode")]),
    "decode_aliased": (1, True, 0, "all", [("fused_recurrent", "decode_in_place")]),
}


def _enqueue(trt: Any, recs: list[dict[str, Any]], attrs: dict[str, Any], shape: dict[str, int], T: int,
             aliased: bool, misalign: int, sms: int = 132) -> tuple[HostDriver, int, int]:
    """``enqueue`` of the deserialised plugin on host buffers (B = 3 rows at chunk phases 0, 1, 2),
    checked against the float64 reference within the spec's 1e-5, on the stream it was given, every
    launch with the op's pointers and the workspace inside what ``get_workspace_size`` asked for at a
    larger profile maximum (guard bytes after it untouched). Returns the driver, the workspace's
    address and size."""
    from trellis_export.plugins_trt.plugin_v3 import WORKSPACE_ALIGN, workspace_layout

    plugin = _runtime_plugin(trt, recs, attrs)
    H, m, d = shape["heads"], shape["slots"], shape["head_dim"]
    B = 3
    inp = make_op_inputs(B, T, H, m, d, dtype=torch.float32, seed=7 + T, positions=[0, 4, 5])
    ref_o, ref_state = run_op(inp.to(torch.float64), chunk_size=attrs["chunk_size"], phi=attrs["phi"],
                              f=attrs["f"], rho=attrs["rho"], eps=attrs["eps"])
    ins = [t.contiguous().clone() for t in (*inp.activations(), *inp.state, inp.position)]
    outs = [torch.full_like(ins[0], float("nan"))] + \
        (ins[6:10] if aliased else [torch.full_like(s, float("nan")) for s in ins[6:10]])
    # the profile the engine was built for is larger than this call: B 4, T 11
    q_desc = _dynamic_desc(trt, [B, T, H, d], [4, max(T, 11), H, d])
    size = plugin.get_workspace_size([q_desc], [])
    assert size == sum(-(-n // WORKSPACE_ALIGN) * WORKSPACE_ALIGN
                       for _, n in workspace_layout(recs, 4, max(T, 11)).values())
    guard = 4096
    arena = torch.full((size + 2 * WORKSPACE_ALIGN + guard,), 0x5A, dtype=torch.uint8)
    start = (-arena.data_ptr()) % WORKSPACE_ALIGN + misalign
    workspace = arena.data_ptr() + start
    driver = HostDriver(CC, [*ins, *outs, arena], sms=sms)
    plugin.driver = driver
    desc = trt.PluginTensorDesc()
    desc.dims = trt.Dims([B, T, H, d])
    plugin.enqueue([desc], [], [t.data_ptr() for t in ins], [t.data_ptr() for t in outs], workspace, 17)

    assert all(stream == 17 for _, _, stream, _, _ in driver.launches)
    assert driver.loaded == [(k, v) for k, v, _, _, _ in driver.launches]    # loaded once each, at first use
    for _, _, _, _, ptrs in driver.launches:
        assert [ptrs[n] for n in INPUTS] == [t.data_ptr() for t in ins]
        assert [ptrs[f"out_{n}"] for n in OUTPUTS] == [t.data_ptr() for t in outs]
        for name in ("ws_memory", "ws_u"):
            if name in ptrs:
                assert workspace <= ptrs[name] < workspace + size
    assert torch.all(arena[start + size:] == 0x5A), "a kernel wrote past the workspace it was given"
    assert_rel_close(outs[0], ref_o, TOL_SHORT, "o")
    for name, got, ref in zip(("key", "value", "key_snapshot", "value_snapshot"), outs[1:], ref_state):
        assert_rel_close(got, ref, TOL_SHORT, name)
    return driver, workspace, size


@pytest.mark.tensorrt_rtx
@pytest.mark.parametrize("case", sorted(CASES))
def test_enqueue_computes_the_op(records: list[dict[str, Any]], case: str) -> None:
    """``enqueue`` (``_enqueue``'s checks) with separate and aliased outputs, a misaligned workspace,
    records without the split; the records it launched, in order."""
    trt = _rtx()
    T, aliased, misalign, keep, want = CASES[case]
    recs = records if keep == "all" else [r for r in records if r["kernel"] not in ("chunk_state",
                                                                                      "chunk_readout")]
    driver, _, _ = _enqueue(trt, recs, ATTRS, SHAPE, T, aliased, misalign)
    assert [(k, v) for k, v, _, _, _ in driver.launches] == want


#: A phi = identity op whose state pass can take the m-axis split: m = 19, two 16-slot programs.
ATTRS_IDENTITY = {**ATTRS, "phi": "identity"}
SHAPE_M_SPLIT = {"heads": 3, "slots": 19, "head_dim": 5}


@pytest.fixture(scope="module")
def split_records() -> list[dict[str, Any]]:
    from trellis_export.plugins_trt.plugin_v3 import compile_records

    return compile_records(ATTRS_IDENTITY, **SHAPE_M_SPLIT, dtype="float32", targets=[CC])


@pytest.mark.tensorrt_rtx
@pytest.mark.parametrize("sms,aliased,state_variant", [(132, False, "m_split"), (132, True, "m_split"),
                                                       (16, False, "aligned")])
def test_enqueue_takes_the_m_axis_split_while_rows_leave_sms_idle(
        split_records: list[dict[str, Any]], sms: int, aliased: bool, state_variant: str) -> None:
    """At phi = identity the engine carries the state pass's m-axis split; ``enqueue`` launches it
    while B * H * 2 = 18 programs would leave the device's SMs idle (132), the whole-m record when
    they fill them (16), and either way the op's result (``_enqueue``'s checks), on aliased buffers too."""
    trt = _rtx()
    assert [r["variant"] for r in split_records if r["kernel"] == "chunk_state"][0] == "m_split"
    driver, _, _ = _enqueue(trt, split_records, ATTRS_IDENTITY, SHAPE_M_SPLIT, 8, aliased, 0, sms=sms)
    assert [(k, v) for k, v, _, _, _ in driver.launches] == [("chunk_state", state_variant),
                                                              ("chunk_readout", "aligned")]
    grid = driver.launches[0][3]
    assert grid == (3 * 3 * 2 * (2 if state_variant == "m_split" else 1), 1, 1)


@pytest.fixture(scope="module")
def suite() -> Any:
    """bench/gpu_suite.py as a module (it is a script, not part of the package)."""
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "gpu_suite.py"
    spec = importlib.util.spec_from_file_location("gpu_suite_for_plugin_tests", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_suite_plugin_section_on_the_host_driver(suite: Any) -> None:
    """bench/gpu_suite.py's plugin section (``plugin_v3.launch_memory`` on buffers it allocates, as it
    will on a GPU) run on the CPU with the host stand-in of the driver: its odd-shape cases pass
    against the float64 reference, and each launched the records the plugin must pick."""
    cases = [c for c in suite.plugin_cases(quick=True) if c["m"] in (7, 19)]
    assert {(c["m"], c["T"], c["aliased"]) for c in cases} == \
        {(7, 1, False), (7, 1, True), (7, 13, False), (7, 13, True), (19, 13, False)}
    res = suite.run_plugin(cases, seed=0, device="cpu", cc=CC, make_driver=lambda bufs: HostDriver(CC, bufs))
    assert res["ok"], [(c["T"], c["aliased"], c.get("rel_rms", c.get("error"))) for c in res["checks"]]
    for case, c in zip(cases, res["checks"]):
        state = "m_split" if case["phi"] == "identity" else "aligned"      # m = 19: two 16-slot blocks
        want = ["fused_recurrent:" + ("decode_in_place" if c["aliased"] else "decode")] if c["T"] == 1 \
            else [f"chunk_state:{state}", "chunk_readout:aligned"]
        assert c["launched"] == want and (c["workspace_bytes"] > 0) == (c["T"] > 1)


def test_gpu_suite_d_axis_split_records_on_the_host_driver(suite: Any) -> None:
    """The suite's AOT case of the d-axis split (section d_split) at odd shapes (d = 40: a
    part-filled last column block): the ``chunk_state_dsplit`` record (compiled for sm_86) with its
    steps ``S0, S1`` and four workspaces, then the read-out, launched by the suite's ``AotLaunch`` on
    the host stand-in of the driver, one launch per step (the interpreter runs programs one at a
    time) == the float64 reference; NC + 1 state-pass launches, then one read-out, all on the same
    workspaces."""
    (case,) = [c for c in suite.d_split_check_cases()[1] if c["d_sync"] == "launch" and c["d"] == 40]
    recs = suite.aot_records(case, CC, None)
    assert [(r["kernel"], r["variant"]) for r in recs] == [("chunk_state_dsplit", "d_split"),
                                                          ("chunk_readout", "aligned")]
    assert recs[0]["scalars"] == ["T", "S0", "S1"] and recs[0]["d_block"] == 16
    acts, state, pos = suite.make_inputs(case, "cpu", 3)
    ref = suite.reference(case, acts, state, pos)
    driver = HostDriver(CC, [])
    launch = suite.AotLaunch(driver, recs, case, acts, [s.clone() for s in state], pos,
                             suite.poisoned_outputs(case, acts))
    ins, out, ws = launch.keep
    driver.buffers = [*ins, *out, *ws.values()]
    launch()
    res = suite.compare(case, launch.out, ref)
    assert res["ok"], res["rel_rms"]
    NC = (case["T"] + 2 * case["C"] - 2) // case["C"]
    assert [k for k, *_ in driver.launches] == ["chunk_state_dsplit"] * (NC + 1) + ["chunk_readout"]
    assert {p["ws_memory"] for *_, p in driver.launches} == {ws["ws_memory"].data_ptr()}
    assert driver.launches[0][3] == (case["B"] * case["H"] * 2 * 3, 1, 1)     # 3 column blocks of 16
