"""Ahead-of-time compilation of the Trellis memory kernels to PTX, without a GPU.

``compile_kernel`` runs ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` for one
kernel and target and returns an :class:`AOTKernel`: a plain record (``to_dict`` / JSON) with
everything a launcher needs -- the PTX, its entry name, the constexpr specialisation, num_warps,
shared memory, the grid as data and as a callable, the block, and the argument order that
TensorRT's AOT Python plugins (``@trtp.aot_impl``) use: input pointers, then integer scalars, then
output pointers. Triton appends hidden pointer parameters after those (global / profile scratch,
triton >= 3.3); they are recorded in ``hidden_params`` and must be passed as null pointers (the
kernels need no scratch: ``global_scratch_size`` is recorded and checked to be 0).

Record fields added by issue 14 (all optional when reading: records without them mean
``aligned=False, decode=False, in_place=False``; nothing was renamed or removed):

* ``variant``: a short name of the specialisation: ``"aligned"`` (the default), ``"unaligned"``,
  ``"decode"``, ``"decode_in_place"``, with a ``"+tf32x3"`` suffix when the dots run in three tf32 passes.
* ``aligned`` (bool) and ``alignment`` (bytes, 16): every pointer argument was declared
  ``alignment``-byte aligned (``tt.divisibility``), which lets triton emit 16-byte vector loads. A
  launcher must check the pointers (``cuda_launch.check_launch``) and use the ``unaligned`` record of
  the same kernel otherwise. TensorRT's buffers are 256-byte aligned.
* ``decode`` (bool): T is a compile-time 1 (constexpr ``DECODE``); the ``T`` parameter is still in the
  signature (so the plugin's launch is unchanged) but unread. Launch with T == 1 only.
* ``in_place`` (bool): the output memories must alias the input memories (``out_key_memory ==
  key_memory`` ...); the kernel writes the snapshots only when a chunk starts in the call, so a
  distinct output buffer would keep stale snapshots. For TensorRT this needs the plugin to declare the
  aliasing; a ping-pong session whose past and present buffers differ must use a non in-place record.
* ``min_cuda_driver`` (str): the oldest CUDA driver that accepts the PTX ISA (``ptx_version``), e.g.
  ``"12.6"`` for PTX 8.5 (JetPack 6). The PTX ISA is chosen per target (``DEFAULT_PTX_VERSION``).
* ``cubin_b64`` (existing field, now filled by default for the targets in ``CUBIN_TARGETS``): the
  cubin of the same compilation, for a driver older than the PTX ISA or to skip the JIT at load.
* ``cubin_ptxas`` (str): the ptxas that made the cubin (triton's bundled one).
* ``m_block`` (int, 0 = none): the ``chunk_state`` record of the m-axis split (variant ``m_split``,
  compiled only for phi = identity): its programs take ``m_block`` slots each, so the grid
  (``grid_dims``) has ``cdiv(m, m_block)`` programs per (row, head, pass). Correct for any batch;
  :func:`trellis_export.kernels.cuda_launch.select_record` prefers it only while the unsplit pass
  would leave streaming multiprocessors idle (``split_fills``).
* ``d_block`` (int, 0 = none): the ``chunk_state_dsplit`` record (variant ``d_split``): the state
  pass split over d in blocks of ``d_block`` columns (any phi). Its signature has the scalars
  ``S0, S1`` after ``T`` (the steps one launch walks, ``chunk_split.dsplit_spans``) and the
  workspaces ``ws_z`` and ``ws_sync`` (int32, zeroed before a launch of more than one step) after
  the split prefill's; ``stage`` 0, then the ``chunk_readout`` record. Opt-in: compiled by
  ``--kernels chunk_state_dsplit``, in no plugin record list.
* ``plan``, ``stage``, ``grid_dims``, ``workspaces``: the split prefill (kernels ``chunk_state`` and
  ``chunk_readout``, ``trellis_memory/chunk_split.py``) is two launches on one stream, ``stage`` 0 then
  1. Their signature is the op's inputs, ``T``, the op's outputs, then the workspace pointers
  ``ws_memory``, ``ws_u`` (float32 scratch the caller allocates: ``workspaces`` maps each to its size
  in bytes as an expression of ``B, H, T`` and the constexprs). ``grid_dims`` holds the grid as three
  expressions (``cuda_launch.grid_for`` evaluates them; the read-out's first axis depends on T); the
  older ``grid`` string stays ``"(B*H, 1, 1)"`` for the one-launch kernels. Both stages must use the
  same workspace pointers. Compiled by ``compile_config(..., kernels=SPLIT_KERNELS)`` or
  ``--kernels chunk_state,chunk_readout``; not in the default kernel set.

The kernels must have been imported with ``TRITON_INTERPRET`` unset (interpreted kernels cannot be
compiled): run ``python -m trellis_export.kernels.aot ...`` in its own process when in doubt.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import json
import re
import sys
from dataclasses import dataclass, field
from typing import Any

from trellis_export.config import TrellisConfig
from trellis_export.errors import TrellisExportError
from trellis_export.opdef import PLUGIN_NAME, op_attributes

from .trellis_memory.chunk_split import (
    COUNTER_WORKSPACES,
    DSPLIT_SCALAR_ARGS,
    GRID_DIMS,
    KERNEL_WORKSPACES,
)
from .trellis_memory.utils import (
    CONSTEXPR_ARGS,
    D_SPLIT_KERNEL,
    DOT_PRECISIONS,
    INPUT_ARGS,
    KERNELS,
    M_SPLIT_BLOCK,
    OUTPUT_ARGS,
    SCALAR_ARGS,
    SPLIT_KERNELS,
    LaunchConfig,
    launch_config,
    nl_code,
)

#: Targets compiled by default: A100 / Orin / Ada / Hopper.
DEFAULT_TARGETS: tuple[int, ...] = (80, 87, 89, 90)
#: PTX ISA written per target (``.version`` 8.5 = CUDA 12.6, the JetPack 6 driver; triton's default,
#: the ISA of its bundled ptxas, was 8.7 = CUDA 12.8). Targets not listed get triton's default.
DEFAULT_PTX_VERSION: dict[int, int] = {80: 85, 87: 85, 89: 85, 90: 85}
#: CUDA driver that first accepts each PTX ISA (the PTX ISA release notes).
PTX_MIN_DRIVER: dict[str, str] = {"8.0": "12.0", "8.1": "12.1", "8.2": "12.2", "8.3": "12.3", "8.4": "12.4",
                                  "8.5": "12.6", "8.6": "12.7", "8.7": "12.8", "8.8": "12.9", "9.0": "13.0"}
#: Targets whose records carry the cubin by default (Jetson: an old driver, slow PTX JIT at load).
CUBIN_TARGETS: frozenset[int] = frozenset({87})
#: Pointer alignment of the ``aligned`` records (bytes).
ALIGNMENT = 16
_PTR = {"float32": "*fp32", "float16": "*fp16", "bfloat16": "*bf16"}
#: PTX parameter type of each triton signature type.
PTX_PARAM = {"ptr": "u64", "i32": "u32"}
#: How each scalar argument derives from the op's input shapes (q is [B, T, H, d]).
SCALAR_EXPRS: dict[str, str] = {"T": "q.shape[1]"}


class AOTError(TrellisExportError):
    """Ahead-of-time compilation could not run (bad flag or interpreter mode)."""


@dataclass
class AOTKernel:
    """One compiled kernel for one target: the launch record a plugin or a driver-API launcher needs."""

    kernel: str                       # "fused_recurrent" | "chunk"
    name: str                         # PTX entry name (cuModuleGetFunction)
    target: str                       # "sm_90"
    cc: int
    ptx: str
    ptx_target: str                   # as written in the PTX (.target), e.g. "sm_90a"
    ptx_version: str                  # PTX ISA (.version); the driver must support it
    triton_version: str
    dtype: str                        # q, k, v, a and o
    gate_dtype: str                   # beta, gamma
    constexprs: dict[str, Any]
    signature: list[tuple[str, str]]  # runtime args in launch order: (name, triton type)
    inputs: list[str]
    scalars: list[str]
    outputs: list[str]
    scalar_exprs: dict[str, str]
    hidden_params: list[str]          # trailing params triton adds (pass null pointers)
    ptx_params: list[str]             # .param types of the entry, in order
    num_warps: int
    num_stages: int
    shared_mem: int                   # dynamic shared memory bytes at launch
    global_scratch_size: int
    grid: str = LaunchConfig.GRID_EXPR
    block: tuple[int, int, int] = (32, 1, 1)
    plugin: dict[str, Any] = field(default_factory=dict)
    cubin_b64: str = ""               # optional: the cubin triton's ptxas made from the same PTX
    # issue 14 (see the module docstring); defaults = the meaning of records that predate them
    variant: str = "unaligned"
    aligned: bool = False
    alignment: int = ALIGNMENT
    decode: bool = False
    in_place: bool = False
    min_cuda_driver: str = ""
    cubin_ptxas: str = ""
    plan: str = ""                    # "chunk_split" for the two-launch prefill, else ""
    stage: int = 0                    # launch order inside the plan (0 = state pass, 1 = read-out)
    grid_dims: list[str] = field(default_factory=list)   # grid as expressions of B, H, T, constexprs
    workspaces: dict[str, str] = field(default_factory=dict)  # pointer arg -> bytes (expression)
    m_block: int = 0                  # slot block of chunk_state's m-axis split (0: the whole m axis)
    d_block: int = 0                  # column block of chunk_state_dsplit (0: not that kernel)

    def grid_fn(self, B: int, H: int, T: int = 1) -> tuple[int, int, int]:
        """The grid for B rows of H heads (the data in ``grid``: one program per (row, head); the
        split prefill's ``grid_dims`` when present, which may depend on T)."""
        if self.grid_dims:
            from .cuda_launch import grid_for
            return grid_for({"constexprs": {**self.constexprs, "H": H}, "grid_dims": self.grid_dims}, B, T)
        return (B * H, 1, 1)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["signature"] = [list(x) for x in self.signature]
        d["block"] = list(self.block)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AOTKernel:
        known = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in data.items() if k in known}      # fields of newer records are ignored
        d["signature"] = [tuple(x) for x in d["signature"]]
        d["block"] = tuple(d["block"])
        return cls(**d)


def _kernel_fn(kernel: str) -> Any:
    from triton.runtime.jit import JITFunction

    from .trellis_memory.chunk import chunk_trellis_fwd_kernel
    from .trellis_memory.chunk_split import (
        chunk_readout_kernel,
        chunk_state_dsplit_kernel,
        chunk_state_kernel,
    )
    from .trellis_memory.fused_recurrent import fused_recurrent_trellis_fwd_kernel
    fn = {"fused_recurrent": fused_recurrent_trellis_fwd_kernel, "chunk": chunk_trellis_fwd_kernel,
          "chunk_state": chunk_state_kernel, "chunk_readout": chunk_readout_kernel,
          D_SPLIT_KERNEL: chunk_state_dsplit_kernel}[kernel]
    if not isinstance(fn, JITFunction):
        raise AOTError("the kernels were imported with TRITON_INTERPRET=1 and cannot be compiled; run "
                       "`python -m trellis_export.kernels.aot` in a process without TRITON_INTERPRET")
    return fn


def parse_ptx_entry(ptx: str) -> tuple[str, list[str]]:
    """The entry's name and its ``.param`` types in order (e.g. ``["u64", ..., "u32", ...]``)."""
    mt = re.search(r"\.entry\s+(\w+)\s*\((.*?)\)", ptx, re.S)
    if mt is None:
        raise AOTError("no .entry found in the PTX")
    params = re.findall(r"\.param\s+\.(\w+)", mt.group(2))
    return mt.group(1), params


def ptx_target(ptx: str) -> str:
    mt = re.search(r"^\s*\.target\s+(\w+)", ptx, re.M)
    return mt.group(1) if mt else ""


def kernel_signature(dtype: str, gate_dtype: str, kernel: str = "chunk") -> list[tuple[str, str]]:
    """Triton types of the runtime arguments, in launch order."""
    for name, dt in (("dtype", dtype), ("gate_dtype", gate_dtype)):
        if dt not in _PTR:
            raise AOTError(f"{name} must be one of {', '.join(_PTR)}, got {dt!r}")
    types = {n: _PTR[dtype] for n in ("q", "k", "v", "a")}
    types.update(beta=_PTR[gate_dtype], gamma=_PTR[gate_dtype], position="*i64", T="i32",
                 out_o=_PTR[dtype], **dict.fromkeys(DSPLIT_SCALAR_ARGS, "i32"),
                 **dict.fromkeys(COUNTER_WORKSPACES, "*i32"))
    return [(n, types.get(n, "*fp32")) for n in kernel_args(kernel)]


def kernel_args(kernel: str) -> tuple[str, ...]:
    """A kernel's runtime argument names in launch order: the op's inputs, the scalars, the op's
    outputs, then its workspace pointers (``chunk_split.KERNEL_WORKSPACES``: the split prefill's;
    the d-axis split adds its steps ``S0, S1`` after ``T`` and its ``ws_z, ws_sync`` at the end)."""
    return INPUT_ARGS + kernel_scalars(kernel) + OUTPUT_ARGS + tuple(KERNEL_WORKSPACES.get(kernel, {}))


def kernel_scalars(kernel: str) -> tuple[str, ...]:
    """A kernel's integer scalar arguments: ``T``, and the d-axis split's steps ``S0, S1``."""
    return SCALAR_ARGS + (DSPLIT_SCALAR_ARGS if kernel == D_SPLIT_KERNEL else ())


def constexprs_for(cfg: LaunchConfig, *, heads: int, slots: int, head_dim: int, chunk_size: int,
                   phi: str, f: str, rho: str, eps: float, dot_precision: str = "ieee",
                   decode: bool = False, in_place: bool = False) -> dict[str, Any]:
    """The constexpr specialisation (one source for the JIT wrappers' keyword arguments too)."""
    if dot_precision not in DOT_PRECISIONS:
        raise ValueError(f"dot_precision must be one of {', '.join(DOT_PRECISIONS)}, got {dot_precision!r}")
    cx = {"H": heads, "M": slots, "D": head_dim, "C": chunk_size, "BM": cfg.BM, "BD": cfg.BD,
          "BC": cfg.BC, "PHI": nl_code(phi, "phi"), "F": nl_code(f, "f"), "RHO": nl_code(rho, "rho"),
          "EPS": float(eps), "DOT_PRECISION": dot_precision, "DECODE": bool(decode),
          "IN_PLACE": bool(in_place)}
    assert tuple(cx) == CONSTEXPR_ARGS
    return cx


def variant_name(*, aligned: bool, decode: bool, in_place: bool, dot_precision: str = "ieee",
                 m_block: int = 0, num_warps: int = 0, d_block: int = 0) -> str:
    """The ``variant`` field of a record (``num_warps``: a warp count other than ``launch_config``'s,
    suffix ``+w<n>``; 0 = the default)."""
    if decode:
        name = "decode_in_place" if in_place else "decode"
    elif m_block:
        name = "m_split_in_place" if in_place else "m_split"
    elif d_block:
        name = "d_split_in_place" if in_place else "d_split"
    else:
        name = "in_place" if in_place else "aligned" if aligned else "unaligned"
    if (decode or m_block or d_block) and not aligned:
        name += "_unaligned"
    name += f"+{dot_precision}" if dot_precision != "ieee" else ""
    return name + (f"+w{num_warps}" if num_warps else "")


def variants_for(kernel: str, which: str = "all", *, phi: str = "ln_silu", slots: int = 0
                 ) -> list[dict[str, Any]]:
    """The specialisations ``compile_config`` builds per kernel and target, most specialised first
    (the order ``cuda_launch.select_record`` expects). ``which="default"``: the aligned record only.
    ``phi`` and ``slots`` (the model's): ``chunk_state`` gets the m-axis split record first where
    the model allows it (``chunk_split.splits_m``: phi = identity, m above one block)."""
    if which == "default":
        return [dict(aligned=True)]
    if which != "all":
        raise AOTError(f"variants must be 'default' or 'all', got {which!r}")
    from .trellis_memory.chunk_split import splits_m
    if kernel == "chunk_state" and slots and splits_m(phi, slots):
        return [dict(aligned=True, m_block=M_SPLIT_BLOCK)] + variants_for(kernel, which)
    if kernel == "fused_recurrent":
        return [dict(aligned=True, decode=True, in_place=True), dict(aligned=True, decode=True),
                dict(aligned=True), dict(aligned=False)]
    if kernel in SPLIT_KERNELS:
        # tf32x3 (tensor cores) is opt-in: listed after the ieee records, never picked by select_record
        # before them
        return [dict(aligned=True), dict(aligned=False), dict(aligned=True, dot_precision="tf32x3")]
    return [dict(aligned=True), dict(aligned=False)]


def compile_kernel(kernel: str, cc: int, *, heads: int, slots: int, head_dim: int, chunk_size: int,
                   phi: str = "ln_silu", f: str = "ln_silu", rho: str = "identity", eps: float = 1e-5,
                   dtype: str = "float32", gate_dtype: str | None = None,
                   include_cubin: bool | None = None, aligned: bool = True, decode: bool = False,
                   in_place: bool = False, dot_precision: str = "ieee",
                   ptx_version: int | None = None, m_block: int = 0, num_warps: int = 0,
                   d_block: int = 0) -> AOTKernel:
    """Compile one kernel for ``sm_<cc>`` and return its launch record (no GPU needed).

    ``include_cubin`` adds the cubin of the same compilation (base64) for drivers older than the PTX
    (default: for the targets in ``CUBIN_TARGETS``). ``aligned``: pointers declared 16-byte aligned
    (vector loads; the launcher checks). ``decode``: T a compile-time 1. ``in_place``: outputs alias
    the input memories (snapshots stored only when a chunk starts). ``dot_precision``: the chunk
    kernel's ``tl.dot`` precision (ieee, tf32, tf32x3). ``ptx_version``: the PTX ISA as an int (85 =
    8.5; default ``DEFAULT_PTX_VERSION[cc]``). ``m_block``: the m-axis split of ``chunk_state``
    (slots per program; phi must be identity). ``num_warps``: override ``launch_config``'s warp count
    (0: keep it; the GPU suite's decode warp sweep; the records the plugin ships keep the default).
    ``d_block``: the column block of ``chunk_state_dsplit`` (the d-axis split; 0 there: the default,
    ``chunk_split.default_d_block``; its extra scalars ``S0, S1`` are the steps a launch walks, not
    shape expressions; it is compiled for ptxas and the GPU suite, and no plugin record list
    includes it)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    known = KERNELS + SPLIT_KERNELS + (D_SPLIT_KERNEL,)
    if kernel not in known:
        raise AOTError(f"kernel must be one of {', '.join(known)}, got {kernel!r}")
    gate_dtype = gate_dtype or "float32"        # gates are float32 (spec section 1)
    for name, val in (("heads", heads), ("slots", slots), ("head_dim", head_dim), ("chunk_size", chunk_size)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise AOTError(f"{name} must be an integer >= 1, got {val!r}")
    if m_block and phi != "identity":
        raise AOTError(f"the m-axis split (m_block = {m_block}) needs phi = identity, got phi = {phi!r}")
    if kernel == D_SPLIT_KERNEL:
        if decode:
            raise AOTError(f"{kernel} is a prefill kernel: no decode record (T = 1 takes fused_recurrent)")
        if not d_block:
            from .trellis_memory.chunk_split import default_d_block
            d_block = default_d_block(head_dim)
    if num_warps not in (0, 1, 2, 4, 8, 16, 32):
        raise AOTError(f"num_warps must be a power of two from 1 to 32 (0: the default), got {num_warps!r}")
    try:
        cfg = launch_config(kernel, slots, head_dim, chunk_size, dot_precision, m_block, d_block)
        warps_override = num_warps if num_warps and num_warps != cfg.num_warps else 0
        if warps_override:
            cfg = dataclasses.replace(cfg, num_warps=warps_override)
        cx = constexprs_for(cfg, heads=heads, slots=slots, head_dim=head_dim, chunk_size=chunk_size,
                            phi=phi, f=f, rho=rho, eps=eps, dot_precision=dot_precision, decode=decode,
                            in_place=in_place)
    except ValueError as exc:
        raise AOTError(str(exc)) from None
    if include_cubin is None:
        include_cubin = cc in CUBIN_TARGETS
    if ptx_version is None:
        ptx_version = DEFAULT_PTX_VERSION.get(cc)
    sig = kernel_signature(dtype, gate_dtype, kernel)
    full_sig = dict(sig)
    full_sig.update({k: "constexpr" for k in cx})
    fn = _kernel_fn(kernel)
    # 16-byte alignment of every pointer, as triton's JIT specialises when the pointers allow it
    attrs = {(i,): [["tt.divisibility", ALIGNMENT]] for i, (_, ty) in enumerate(sig) if ty.startswith("*")} \
        if aligned else {}
    src = ASTSource(fn, full_sig, constexprs=cx, attrs=attrs)
    options: dict[str, Any] = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    if ptx_version is not None:
        options["ptx_version"] = int(ptx_version)
    compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=options)
    md = compiled.metadata
    ptx = compiled.asm["ptx"]
    entry, params = parse_ptx_entry(ptx)
    n_hidden = len(params) - len(sig)
    hidden = ["global_scratch", "profile_scratch", *[f"hidden_{i}" for i in range(2, n_hidden)]][:n_hidden]
    gss = int(getattr(md, "global_scratch_size", 0) or 0)
    grid = f"({', '.join(GRID_DIMS[kernel])})" if kernel in GRID_DIMS else LaunchConfig.GRID_EXPR
    mver = re.search(r"^\s*\.version\s+([\d.]+)", ptx, re.M)
    op_attrs = op_attributes_from(chunk_size=chunk_size, phi=phi, f=f, rho=rho, eps=eps)
    return AOTKernel(
        kernel=kernel, name=entry, target=f"sm_{cc}", cc=cc, ptx=ptx, ptx_target=ptx_target(ptx),
        ptx_version=mver.group(1) if mver else "", triton_version=triton.__version__, dtype=dtype,
        gate_dtype=gate_dtype, constexprs=cx, signature=sig, inputs=list(INPUT_ARGS),
        scalars=list(kernel_scalars(kernel)),
        outputs=list(OUTPUT_ARGS), scalar_exprs=dict(SCALAR_EXPRS),
        hidden_params=hidden, ptx_params=params, num_warps=int(md.num_warps), num_stages=cfg.num_stages,
        shared_mem=int(md.shared), global_scratch_size=gss,
        grid=grid, block=(32 * int(md.num_warps), 1, 1),
        plugin={"plugin_id": PLUGIN_NAME, "attributes": op_attrs,
                "aot_impl_returns": f"(kernel_name=name, ptx, KernelLaunchParams(grid={grid}, "
                                    "block_x=32*num_warps, shared_mem), SymIntExprs([T]))",
                "hidden_params_note": "triton appends these pointer params after the outputs; a "
                                      "launcher passes null (global_scratch_size must be 0)"},
        cubin_b64=base64.b64encode(compiled.asm["cubin"]).decode() if include_cubin else "",
        variant=variant_name(aligned=aligned, decode=decode, in_place=in_place, dot_precision=dot_precision,
                             m_block=m_block, num_warps=warps_override, d_block=d_block),
        aligned=bool(aligned), alignment=ALIGNMENT, decode=bool(decode), in_place=bool(in_place),
        min_cuda_driver=PTX_MIN_DRIVER.get(mver.group(1) if mver else "", ""),
        cubin_ptxas=_bundled_ptxas_version() if include_cubin else "",
        plan="chunk_split" if kernel in KERNEL_WORKSPACES else "",
        stage=1 if kernel == "chunk_readout" else 0,
        grid_dims=list(GRID_DIMS.get(kernel, [])),
        workspaces=dict(KERNEL_WORKSPACES.get(kernel, {})),
        m_block=int(m_block), d_block=int(d_block))


def _bundled_ptxas_version() -> str:
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        return str(get_ptxas(80).version)
    except Exception:  # noqa: BLE001 - informational field only
        return ""


def op_attributes_from(**attrs: Any) -> dict[str, Any]:
    """The op attributes of opdef.op_attributes, built from loose values."""
    cfg = TrellisConfig().replace(chunk_size=attrs["chunk_size"], phi=attrs["phi"], f=attrs["f"],
                                  rho=attrs["rho"], eps=float(attrs["eps"]))
    return op_attributes(cfg)


def compile_config(config: TrellisConfig, targets: tuple[int, ...] = DEFAULT_TARGETS,
                   dtype: str = "float32", gate_dtype: str | None = None,
                   kernels: tuple[str, ...] = KERNELS, variants: str = "default") -> list[AOTKernel]:
    """Every kernel for every target, specialised to a model config. ``variants="default"``: one
    (aligned) record per kernel and target, as before issue 14; ``"all"``: every ``variants_for``
    specialisation, most specialised first within each (kernel, target)."""
    return [compile_kernel(k, cc, heads=config.n_heads, slots=config.n_slots, head_dim=config.head_dim,
                           chunk_size=config.chunk_size, phi=config.phi, f=config.f, rho=config.rho,
                           eps=config.eps, dtype=dtype, gate_dtype=gate_dtype, **var)
            for k in kernels for cc in targets
            for var in variants_for(k, variants, phi=config.phi, slots=config.n_slots)]


def _parse_targets(text: str) -> tuple[int, ...]:
    out = []
    for tok in text.split(","):
        tok = tok.strip().removeprefix("sm_")
        if not tok.isdigit():
            raise AOTError(f"--targets must be compute capabilities like 80,87,89,90 or sm_90; got {text!r}")
        out.append(int(tok))
    return tuple(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trellis_export.kernels.aot",
                                description="Compile the Trellis memory kernels to PTX (no GPU needed).")
    p.add_argument("--config", help="TrellisConfig JSON file (default: the default config)")
    p.add_argument("--targets", default=",".join(map(str, DEFAULT_TARGETS)))
    p.add_argument("--dtype", default="float32", choices=sorted(_PTR))
    p.add_argument("--gate-dtype", default=None, choices=sorted(_PTR))
    p.add_argument("--kernels", default=",".join(KERNELS))
    p.add_argument("--variants", default="default", choices=("default", "all"),
                   help="default: one aligned record per kernel and target; all: also the decode, "
                        "in-place decode and unaligned fallback records")
    p.add_argument("--out", required=True, help="JSON file of the launch records (written atomically)")
    args = p.parse_args(argv)
    try:
        config = TrellisConfig.load(args.config) if args.config else TrellisConfig()
        kernels = tuple(k.strip() for k in args.kernels.split(","))
        recs = compile_config(config, _parse_targets(args.targets), args.dtype, args.gate_dtype, kernels,
                              args.variants)
        from trellis_export.fileio import atomic_write_bytes
        atomic_write_bytes(args.out, json.dumps([r.to_dict() for r in recs], indent=1).encode())
    except TrellisExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for r in recs:
        print(f"{r.kernel:16s} {r.variant:16s} {r.target:6s} {r.name} ptx {r.ptx_version} "
              f"warps={r.num_warps} shared={r.shared_mem} params={len(r.ptx_params)} ptx={len(r.ptx)}B")
    return 0


if __name__ == "__main__":
    sys.exit(main())
