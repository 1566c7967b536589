"""Shared pieces of the Trellis memory kernels: nonlinearity codes, the in-kernel nonlinearities
(masked, over one axis), the launch configuration and the kernels' argument order.

The launch configuration is computed here once and used by the JIT wrappers, the AOT compiler
(``trellis_export.kernels.aot``) and the GPU suite, so the three launch the same specialisation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import triton
import triton.language as tl

from trellis_export.config import NONLINEARITIES
from trellis_export.opdef import INPUTS, OUTPUTS

if TYPE_CHECKING:
    from torch import Tensor

#: constexpr code of each nonlinearity inside the kernels (index into config.NONLINEARITIES).
NL_CODE: dict[str, int] = {name: i for i, name in enumerate(NONLINEARITIES)}
assert NL_CODE == {"identity": 0, "ln_silu": 1, "l2_silu": 2}

#: Runtime arguments of every kernel, in the order TensorRT's AOT Python plugins launch them:
#: the op's input pointers, then the integer scalars (``T``: tokens in this call), then the op's
#: output pointers. Names are the op's input / output names (``trellis_export.opdef``).
INPUT_ARGS: tuple[str, ...] = INPUTS
SCALAR_ARGS: tuple[str, ...] = ("T",)
OUTPUT_ARGS: tuple[str, ...] = tuple(f"out_{n}" for n in OUTPUTS)
RUNTIME_ARGS: tuple[str, ...] = INPUT_ARGS + SCALAR_ARGS + OUTPUT_ARGS
#: What the kernels' Python wrappers return: o and the four new memories (OUTPUT_ARGS order).
MemoryOutputs = tuple["Tensor", "Tensor", "Tensor", "Tensor", "Tensor"]
#: Kernel constexprs, in signature order after the runtime arguments.
#: ``DECODE`` (T a compile-time 1) and ``IN_PLACE`` (outputs alias the input memories) default to
#: False and come last, so records and callers that predate them keep their meaning.
CONSTEXPR_ARGS: tuple[str, ...] = ("H", "M", "D", "C", "BM", "BD", "BC", "PHI", "F", "RHO", "EPS",
                                   "DOT_PRECISION", "DECODE", "IN_PLACE")
#: ``tl.dot`` precisions: ieee (FMA, meets 1e-5), tf32 (tensor cores, misses 1e-5), tf32x3 (three
#: tf32 passes on tensor cores, float32-like accuracy).
DOT_PRECISIONS: tuple[str, ...] = ("ieee", "tf32", "tf32x3")

KERNELS: tuple[str, ...] = ("fused_recurrent", "chunk")
#: The two launches of the split prefill (``chunk_split.py``): sequential state pass, parallel read-out.
SPLIT_KERNELS: tuple[str, ...] = ("chunk_state", "chunk_readout")
#: The d-axis split of the state pass (``chunk_split.py``): takes ``chunk_state``'s place before the
#: read-out when the caller asks for it (``d_block``).
D_SPLIT_KERNEL = "chunk_state_dsplit"


def nl_code(name: str, what: str) -> int:
    if name not in NL_CODE:
        raise ValueError(f"{what} must be one of {', '.join(NONLINEARITIES)}; got {name!r}")
    return NL_CODE[name]


@dataclass(frozen=True)
class LaunchConfig:
    """Block sizes and warps of one kernel for one (m, d, C); no autotuning (the interpreter and the
    AOT path both need a fixed choice)."""

    kernel: str
    BM: int
    BD: int
    BC: int
    num_warps: int
    num_stages: int = 1

    def grid(self, B: int, H: int) -> tuple[int, int, int]:
        """One program per (row, head)."""
        return (B * H, 1, 1)

    #: the grid as data (what a plugin needs to rebuild it from symbolic shapes)
    GRID_EXPR = "(B*H, 1, 1)"


#: Slot block of the m-axis split of the state pass (``chunk_split.py``; phi = identity only): the
#: smallest tile ``tl.dot`` takes.
M_SPLIT_BLOCK = 16


def launch_config(kernel: str, m: int, d: int, chunk_size: int, dot_precision: str = "ieee",
                  m_block: int = 0, d_block: int = 0) -> LaunchConfig:
    """Pick block sizes: m and d padded to powers of two (>= 16 for tl.dot in the chunk kernel).
    Warps of the split prefill kernels: chosen from ``ptxas -v`` (docs/kernels.md): 16 warps at
    BM * BD = 8192 in ieee (8 warps spill on sm_87), 8 with tf32x3 (16 warps cap the registers at 128
    and spill; 8 do not). ``m_block`` (``chunk_state`` only; 0 = the whole m axis): the slot block of
    the m-axis split, a power of two >= 16 below m's padded size (the kernel then runs
    ``cdiv(m, m_block)`` programs per (row, head, pass); phi must be identity). ``d_block``
    (``chunk_state_dsplit`` only, where it is required): the column block of the d-axis split, a
    power of two from 16 to d's padded size (``cdiv(d, d_block)`` programs per (row, head, pass),
    any phi; the padded size itself is one program that walks the chunks alone)."""
    if kernel == D_SPLIT_KERNEL:
        if m_block:
            raise ValueError(f"m_block splits the chunk_state kernel only, not {kernel} (choose one split)")
        top = max(16, triton.next_power_of_2(d))
        if not d_block or d_block < 16 or d_block & (d_block - 1) or d_block > top:
            raise ValueError(f"d_block must be a power of two from 16 to {top} (d = {d}), got {d_block}")
        BM = max(16, triton.next_power_of_2(m))
        BC = max(16, triton.next_power_of_2(chunk_size))
        tile = BM * d_block                  # the memory block and its step; Z is [BC, BM]
        num_warps = 4 if tile <= 1024 else 8 if tile <= 4096 or dot_precision == "tf32x3" else 16
        return LaunchConfig(kernel, BM, d_block, BC, num_warps)
    if d_block:
        raise ValueError(f"d_block is the {D_SPLIT_KERNEL} kernel's, not {kernel}'s")
    if kernel not in KERNELS + SPLIT_KERNELS:
        raise ValueError(f"kernel must be one of {', '.join(KERNELS + SPLIT_KERNELS)}; got {kernel!r}")
    if m_block:
        if kernel != "chunk_state":
            raise ValueError(f"m_block splits the chunk_state kernel only, not {kernel}")
        if m_block < 16 or m_block & (m_block - 1) or m_block >= triton.next_power_of_2(m):
            raise ValueError(f"m_block must be a power of two >= 16 below {triton.next_power_of_2(m)} "
                             f"(m = {m}), got {m_block}")
    if kernel in SPLIT_KERNELS:
        BM = m_block or max(16, triton.next_power_of_2(m))
        BD = max(16, triton.next_power_of_2(d))
        BC = max(16, triton.next_power_of_2(chunk_size))
        tile = BM * BD                       # two [BM, BD] tiles live (M and S; or K0 and V0)
        num_warps = 4 if tile <= 1024 else 8 if tile <= 4096 or dot_precision == "tf32x3" else 16
        return LaunchConfig(kernel, BM, BD, BC, num_warps)
    if kernel == "fused_recurrent":
        BM = max(2, triton.next_power_of_2(m))
        BD = max(2, triton.next_power_of_2(d))
        BC = 1
        tile = BM * BD                       # four [BM, BD] fp32 tiles live in registers
        num_warps = 1 if tile <= 256 else 2 if tile <= 1024 else 4 if tile <= 2048 else 8 if tile <= 4096 \
            else 16
    else:
        BM = max(16, triton.next_power_of_2(m))
        BD = max(16, triton.next_power_of_2(d))
        BC = max(16, triton.next_power_of_2(chunk_size))
        tile = max(BM * BD, BC * BM, BC * BD)
        num_warps = 4 if tile <= 1024 else 8
    return LaunchConfig(kernel, BM, BD, BC, num_warps)


# --------------------------------------------------------------------------- in-kernel math
# Reductions over the m (or d) axis cross warps: every tl.sum is a round of shared-memory exchange and
# barriers, and one token of the decode kernel runs about a dozen of them in a dependent chain. The
# ln_silu statistics therefore come from one reduction each: the mean and the centred sum of squares
# by Chan et al.'s parallel (Welford) combination -- numerically as stable as the two-pass form, unlike
# E[s^2] - E[s]^2 -- and the two sums of the vector-Jacobian product together (``ONE_ROUND``). Used
# by the decode kernel, where those rounds form the per-token dependent chain; the chunk kernels keep
# the two-pass sums (few barriers saved there, measured, and triton's interpreter runs a tl.reduce with
# a combine function on a 2-D tile about 10x slower than tl.sum, which the CPU tests cannot afford).
@triton.jit
def _welford_combine(n_a, m_a, q_a, n_b, m_b, q_b):
    n = n_a + n_b
    w = tl.where(n > 0, n_b / tl.maximum(n, 1.0), 0.0)
    delta = m_b - m_a
    return n, m_a + delta * w, q_a + q_b + delta * delta * n_a * w


@triton.jit
def _mean_m2(s, mask, AXIS: tl.constexpr):
    """Mean and centred sum of squares of ``s`` over AXIS (entries outside ``mask`` excluded), in one
    reduction."""
    n0 = tl.where(mask, 1.0, 0.0) + tl.zeros_like(s)
    _, mu, m2 = tl.reduce((n0, tl.where(mask, s, 0.0), tl.zeros_like(s)), axis=AXIS,
                          combine_fn=_welford_combine, keep_dims=True)
    return mu, m2


@triton.jit
def _add2(a0, a1, b0, b1):
    return a0 + b0, a1 + b1


@triton.jit
def _centred_sd(s, mask, N: tl.constexpr, EPS: tl.constexpr, AXIS: tl.constexpr, ONE_ROUND: tl.constexpr):
    """(s - mean s, sqrt(var s + EPS)) over axis AXIS (population variance; 0 on padding), the
    statistics of ln_silu: in one reduction (Welford) with ``ONE_ROUND``, else two passes."""
    if ONE_ROUND:
        mu, m2 = _mean_m2(s, mask, AXIS)
        c = tl.where(mask, s - mu, 0.0)
    else:
        mu = tl.sum(s, axis=AXIS, keep_dims=True) / N
        c = tl.where(mask, s - mu, 0.0)
        m2 = tl.sum(c * c, axis=AXIS, keep_dims=True)
    return c, tl.sqrt(m2 / N + EPS)


@triton.jit
def nl_fwd(z, mask, N: tl.constexpr, EPS: tl.constexpr, KIND: tl.constexpr, AXIS: tl.constexpr,
           ONE_ROUND: tl.constexpr = False):
    """y = g(z) over axis AXIS; entries outside ``mask`` are padding (the result there is 0).
    ``ONE_ROUND``: the ln_silu statistics in one reduction (Welford); the decode kernel uses it."""
    if KIND == 0:
        y = tl.where(mask, z, 0.0)
    elif KIND == 1:
        s = tl.where(mask, z * tl.sigmoid(z), 0.0)
        c, sd = _centred_sd(s, mask, N, EPS, AXIS, ONE_ROUND)
        y = c / sd
    else:
        s = tl.where(mask, z * tl.sigmoid(z), 0.0)
        nrm = tl.sqrt(tl.sum(s * s, axis=AXIS, keep_dims=True) + EPS)
        y = s / nrm
    return y


@triton.jit
def inner_grad(z, a, mask, N: tl.constexpr, EPS: tl.constexpr, KIND: tl.constexpr, AXIS: tl.constexpr,
               ONE_ROUND: tl.constexpr = False):
    """u = J_g(z)^T (g(z) - a) over axis AXIS (the gradient of 1/2 ||g(z) - a||^2); 0 on padding."""
    if KIND == 0:
        u = tl.where(mask, z - a, 0.0)
    elif KIND == 1:
        sig = tl.sigmoid(z)
        s = tl.where(mask, z * sig, 0.0)
        ds = sig * (1.0 + z * (1.0 - sig))
        c, sd = _centred_sd(s, mask, N, EPS, AXIS, ONE_ROUND)
        y = c / sd
        e = tl.where(mask, y - a, 0.0)
        if ONE_ROUND:
            se, sey = tl.reduce((e, e * y), axis=AXIS, combine_fn=_add2, keep_dims=True)
        else:
            se = tl.sum(e, axis=AXIS, keep_dims=True)
            sey = tl.sum(e * y, axis=AXIS, keep_dims=True)
        me = se / N
        mey = sey / N
        u = tl.where(mask, ds * (e - me - y * mey) / sd, 0.0)
    else:
        sig = tl.sigmoid(z)
        s = tl.where(mask, z * sig, 0.0)
        ds = sig * (1.0 + z * (1.0 - sig))
        nrm = tl.sqrt(tl.sum(s * s, axis=AXIS, keep_dims=True) + EPS)
        y = s / nrm
        e = tl.where(mask, y - a, 0.0)
        u = tl.where(mask, ds * (e - y * tl.sum(y * e, axis=AXIS, keep_dims=True)) / nrm, 0.0)
    return u
