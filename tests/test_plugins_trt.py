"""The TensorRT plugin's pure parts (no TensorRT here); the registration needs TensorRT."""

from __future__ import annotations

import importlib.util

import pytest
from trellis_export.plugins_trt.trellis_memory import launch_plan, register_plugin, type_combination

from trellis_export.opdef import INPUTS, OUTPUTS


def test_type_combination_matches_the_op_io() -> None:
    types = type_combination().split(", ")
    assert len(types) == len(INPUTS) + len(OUTPUTS)
    io = list(INPUTS) + [f"out_{o}" for o in OUTPUTS]
    kinds = dict(zip(io, types))
    assert kinds["q"] == kinds["a"] == kinds["out_o"] == "FP32|FP16|BF16"
    assert kinds["beta"] == kinds["gamma"] == "FP32"      # gates are float32 (spec section 1)
    assert kinds["position"] == "INT64"
    assert all(kinds[n] == "FP32" for n in io if "memory" in n or "snapshot" in n)
    assert type_combination(("float16",)).split(", ")[0] == "FP16"


def test_launch_plan_from_a_record() -> None:
    sig = [[n, "*fp32"] for n in INPUTS] + [["T", "i32"]] + [[f"out_{o}", "*fp32"] for o in OUTPUTS]
    rec = {"name": "chunk_trellis_fwd_kernel", "ptx": ".version 8.7", "signature": sig,
           "inputs": list(INPUTS), "scalars": ["T"], "scalar_exprs": {"T": "q.shape[1]"},
           "constexprs": {"H": 3}, "block": [128, 1, 1], "shared_mem": 4096}
    plan = launch_plan(rec)
    assert plan["kernel_name"] == rec["name"] and plan["ptx"] == rec["ptx"]
    assert plan["block"] == (128, 1, 1) and plan["shared_mem"] == 4096 and plan["H"] == 3
    assert plan["extra_args"] == ["q.shape[1]"]
    rec["signature"] = sig[::-1]
    with pytest.raises(ValueError, match="argument order"):
        launch_plan(rec)


@pytest.mark.tensorrt
@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None, reason="tensorrt is not importable")
def test_register_plugin_with_tensorrt() -> None:   # pragma: no cover - never run here
    register_plugin()
    register_plugin()                                 # idempotent
