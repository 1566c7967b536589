"""TensorRT AOT Python plugin of ``trellis::TrellisMemory`` (TensorRT >= 10.8, ``tensorrt.plugin``).

``register_plugin()`` defines ``@trtp.register`` (shape / type inference) and ``@trtp.aot_impl``
(the Triton kernel compiled to PTX by ``trellis_export.kernels.aot`` at engine build time, launched
by TensorRT without Python), plus ``@trtp.autotune`` (the supported type combinations). Names,
attributes and the plugin id come from ``trellis_export.opdef``.

Plan: prefill (T > 1) uses the chunk kernel, decode (T = 1 at build time) the streaming kernel;
the choice is made from the build-time profile of T. TensorRT is not installed in this project's
CI: only the pure parts (``launch_plan``, ``type_combination``) are tested; the registration is
marked ``tensorrt`` and was never run.

Open point for the first TensorRT run: triton >= 3.3 appends hidden pointer params (global and
profile scratch) after the outputs; TensorRT passes the plugin's declared args only. The kernels
use no scratch (``global_scratch_size == 0``), so those params are never read, but this must be
confirmed on a real engine.
"""

# No `from __future__ import annotations`: tensorrt.plugin inspects the hints of the decorated
# functions and needs them as real objects.
from typing import Any

from trellis_export.opdef import INPUTS, OUTPUTS, PLUGIN_NAME

#: TensorRT type names of the activation dtypes the kernels take.
TRT_TYPE = {"float32": "FP32", "float16": "FP16", "bfloat16": "BF16"}


def type_combination(dtypes: tuple[str, ...] = ("float32", "float16", "bfloat16")) -> str:
    """The ``trtp.AutoTuneCombination`` type string: at each I/O position (inputs then outputs, in the
    op's order) the TensorRT types :func:`plugin_v3.io_dtype_rule` allows when q is one of ``dtypes``
    -- the one rule both plugins follow (spec section 1)."""
    from trellis_export.plugins_trt.plugin_v3 import io_dtype_rule

    trt_name = {**TRT_TYPE, "int64": "INT64"}
    cols = []
    for pos in range(len(INPUTS) + len(OUTPUTS)):
        names = dict.fromkeys(trt_name[io_dtype_rule(pos, d)] for d in dtypes)
        cols.append("|".join(names))
    return ", ".join(cols)


def launch_plan(record: dict[str, Any]) -> dict[str, Any]:
    """What ``@trtp.aot_impl`` returns, from an AOT launch record (``AOTKernel.to_dict()``):
    kernel name, PTX, launch params as expressions of the input shapes, and the scalar args."""
    if record["signature"][len(INPUTS)][0] != "T" or record["inputs"] != list(INPUTS):
        raise ValueError("the record's argument order is not inputs, T, outputs")
    return {"kernel_name": record["name"], "ptx": record["ptx"],
            "grid": ("q.shape[0] * H", 1, 1), "H": record["constexprs"]["H"],
            "block": tuple(record["block"]), "shared_mem": record["shared_mem"],
            "extra_args": [record["scalar_exprs"][s] for s in record["scalars"]]}


def _dtype_name(trt_dtype: Any) -> str:
    import tensorrt as trt
    names = {trt.float32: "float32", trt.float16: "float16", trt.bfloat16: "bfloat16"}
    if trt_dtype not in names:
        raise TypeError(f"TrellisMemory: q must be FP32, FP16 or BF16, got {trt_dtype}")
    return names[trt_dtype]


def _const(expr: Any, what: str) -> int:
    if not expr.is_constant:
        raise ValueError(f"TrellisMemory: {what} must be a build-time constant")
    return int(expr.constant_value())


_REGISTERED = False


def register_plugin() -> None:  # pragma: no cover - needs TensorRT
    """Register the plugin with TensorRT (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    import numpy as np  # noqa: F401  (tensorrt.plugin needs it)
    import tensorrt.plugin as trtp
    import triton
    from trellis_export.kernels.aot import compile_kernel

    @trtp.register(PLUGIN_NAME)
    def _desc(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, a: trtp.TensorDesc,
              beta: trtp.TensorDesc, gamma: trtp.TensorDesc, key_memory: trtp.TensorDesc,
              value_memory: trtp.TensorDesc, key_snapshot: trtp.TensorDesc,
              value_snapshot: trtp.TensorDesc, position: trtp.TensorDesc, chunk_size: int, phi: str,
              f: str, rho: str, eps: float) -> tuple[trtp.TensorDesc, ...]:
        return (q.like(), key_memory.like(), value_memory.like(), key_snapshot.like(),
                value_snapshot.like())

    @trtp.autotune(PLUGIN_NAME)
    def _tune(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, a: trtp.TensorDesc,
              beta: trtp.TensorDesc, gamma: trtp.TensorDesc, key_memory: trtp.TensorDesc,
              value_memory: trtp.TensorDesc, key_snapshot: trtp.TensorDesc,
              value_snapshot: trtp.TensorDesc, position: trtp.TensorDesc,
              outputs: tuple[trtp.TensorDesc, ...]) -> list[trtp.AutoTuneCombination]:
        return [trtp.AutoTuneCombination(type_combination(), "LINEAR")]

    @trtp.aot_impl(PLUGIN_NAME)
    def _aot(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, a: trtp.TensorDesc,
             beta: trtp.TensorDesc, gamma: trtp.TensorDesc, key_memory: trtp.TensorDesc,
             value_memory: trtp.TensorDesc, key_snapshot: trtp.TensorDesc,
             value_snapshot: trtp.TensorDesc, position: trtp.TensorDesc, chunk_size: int, phi: str,
             f: str, rho: str, eps: float, outputs: tuple[trtp.TensorDesc, ...], tactic: int,
             ) -> tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymExprs]:
        H = _const(q.shape_expr[2], "heads (q.shape[2])")
        d = _const(q.shape_expr[3], "head_dim (q.shape[3])")
        m = _const(a.shape_expr[3], "slots (a.shape[3])")
        T = q.shape_expr[1]
        decode = T.is_constant and T.constant_value() == 1
        target = triton.runtime.driver.active.get_current_target()
        rec = compile_kernel("fused_recurrent" if decode else "chunk", int(target.arch), heads=H, slots=m,
                             head_dim=d, chunk_size=chunk_size, phi=phi, f=f, rho=rho, eps=eps,
                             dtype=_dtype_name(q.dtype), gate_dtype=_dtype_name(beta.dtype)).to_dict()
        plan = launch_plan(rec)
        params = trtp.KernelLaunchParams()
        params.grid_x = q.shape_expr[0] * H
        params.block_x = plan["block"][0]
        params.shared_mem = plan["shared_mem"]
        extra = trtp.SymIntExprs(len(plan["extra_args"]))
        extra[0] = trtp.SymInt32(T)
        return plan["kernel_name"], plan["ptx"], params, extra

    _REGISTERED = True
