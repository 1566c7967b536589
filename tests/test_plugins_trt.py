"""The TensorRT plugins: the IPluginV3 one registered with TensorRT-RTX for real (it is what
``trellis-export engine --plugin`` builds with, see tests/test_engine.py), and the QDP AOT plugin for
enterprise TensorRT >= 10.8, whose registration needs ``tensorrt`` (not installable here)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
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
