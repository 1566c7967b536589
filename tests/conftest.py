"""Shared test helpers for trellis-export (import them: ``from conftest import make_op_inputs``).

Helpers (plain functions, so other test modules can import them by name):

* ``make_op_inputs(B, T, H, m, d, ...)`` -> :class:`OpInputs`: random inputs of the TrellisMemory op
  at realistic ranges (q, k L2-normalised per head, v and a ~ N(0, 1), beta in (0.5, 1), gamma in
  (0, 1), memories and snapshots ~ N(0, 1/d) like the learned M0), positions differing per row.
* ``run_op(inputs, **op_kwargs)``: ``trellis_memory`` on an :class:`OpInputs`.
* ``OpInputs.to(dtype)``, ``OpInputs.slice(t0, t1)`` (a token range, positions advanced) and
  ``OpInputs.with_state(state)``.
* ``tiny_config(**overrides)``: a small valid :class:`TrellisConfig` (H = 3, d = 5, m = 7, C = 4).
* ``tiny_model(config=None, seed=0, dtype=torch.float64)``: a random ``TrellisLM`` in eval mode.
* ``random_ids(B, T, vocab, seed)``: int64 token ids.
* ``assert_rel_close(x, ref, tol, what)``: relative-RMS check (``metrics.rel_rms``) whose failure
  message carries the measured error.
* ``op_shape_grid()``: the odd shapes of the house rules.

Fixtures: ``tiny_checkpoint`` (a saved tiny model directory; returns ``(path, model)``).

torch runs single-threaded in the tests: the shapes are tiny, and on a shared, loaded 2-core machine
intra-op threads made a tiny forward 80x slower (measured 2.4 s vs 0.03 s).
"""

from __future__ import annotations

import dataclasses
import os

# Triton kernels run on this CPU only in interpreter mode, and the mode must be chosen before triton is
# first imported -- which any test module's imports may do (the bundle and AOT modules import the kernel
# modules). Set it once here, before every test module; AOT compilation (PTX for real targets) runs in
# child processes without it (kernels/aot.py, plugins_trt/plugin_v3.compile_records, the ptxas tests).
os.environ.setdefault("TRITON_INTERPRET", "1")
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from trellis_export.config import TrellisConfig
from trellis_export.metrics import rel_rms
from trellis_export.model.memory import MemoryState, trellis_memory

torch.set_num_threads(1)

#: Tolerances of TRELLIS_SPEC.md section 8 (float32 against the float64 reference): trellis_export.spec.
from trellis_export.spec import NONLINEARITIES, TOL_LONG, TOL_SHORT  # noqa: E402, F401 (re-exported)

#: float64 against float64 (two exact algorithms): rounding only.
TOL_F64 = 1e-10

#: The odd shapes of the house rules: m = 7 slots, d = 5, H = 3 heads.
M, D, H = 7, 5, 3
CHUNK_SIZES: tuple[int, ...] = (1, 3, 4, 16)
NONLINEARITY_NAMES: tuple[str, ...] = NONLINEARITIES


@dataclasses.dataclass
class OpInputs:
    """One call's worth of TrellisMemory op inputs (TRELLIS_SPEC.md section 4)."""

    q: Tensor
    k: Tensor
    v: Tensor
    a: Tensor
    beta: Tensor
    gamma: Tensor
    state: MemoryState
    position: Tensor

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        """(B, T, H, m, d)."""
        B, T, H_, d = self.q.shape
        return B, T, H_, self.a.shape[-1], d

    def activations(self) -> tuple[Tensor, ...]:
        return self.q, self.k, self.v, self.a, self.beta, self.gamma

    def to(self, dtype: torch.dtype, state_dtype: torch.dtype | None = None) -> OpInputs:
        """Cast activations to ``dtype`` and the state to ``state_dtype`` (default: same as dtype,
        but float32 for half types, as the spec keeps memories in float32)."""
        if state_dtype is None:
            state_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        acts = [t.to(dtype) for t in self.activations()]
        return OpInputs(*acts, MemoryState(*(s.to(state_dtype) for s in self.state)),
                        self.position.clone())

    def slice(self, t0: int, t1: int) -> OpInputs:
        """Tokens [t0, t1) of this call, positions advanced by t0; the state is kept as is (the
        caller swaps in the state reached after token t0 with :meth:`with_state`)."""
        acts = [t[:, t0:t1] for t in self.activations()]
        return OpInputs(*acts, self.state, self.position + t0)

    def with_state(self, state: MemoryState) -> OpInputs:
        return dataclasses.replace(self, state=state)

    def with_position(self, position: Tensor) -> OpInputs:
        return dataclasses.replace(self, position=position)

    def clone(self) -> OpInputs:
        return OpInputs(*(t.clone() for t in self.activations()),
                        MemoryState(*(s.clone() for s in self.state)), self.position.clone())


def _generator(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def make_op_inputs(B: int = 2, T: int = 11, H: int = H, m: int = M, d: int = D, *,
                   dtype: torch.dtype = torch.float64, seed: int = 0,
                   positions: list[int] | Tensor | None = None,
                   state_scale: float = 1.0, v_scale: float = 1.0,
                   gamma_scale: float = 1.0) -> OpInputs:
    """Random TrellisMemory op inputs at realistic ranges.

    ``positions`` defaults to different values per row (0, 5, 10, ...: rows at chunk start and
    mid-chunk for every C of the grid). Memories and snapshots are independent N(0, 1/d) draws so that
    a wrong choice between snapshot and running memory shows. Everything is drawn in float64 then
    cast to ``dtype`` (activations; the state is float64 for float64, float32 otherwise).

    Why |v| ~ 1: the value pass is one gradient step of size gamma * |v|^2 on the inner loss; with
    v ~ N(0, 1) (|v|^2 ~ d) and gamma near 1 that step overshoots, the recurrence becomes chaotic and
    even rounding the inputs to float32 moves the result by ~1e-4 (measured), so no float32 path
    could meet the spec's 1e-5. ``v_scale`` scales v further for tests that want that regime.
    ``gamma_scale`` shrinks gamma to (0, gamma_scale): long streams with C = 16 at d = 5 need it (16
    stale steps on nearly collinear keys overshoot; measured rounding-only error 7e-4 at T = 2000).
    """
    g = _generator(seed)
    f64 = torch.float64

    def normal(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g, dtype=f64)

    def unit(*shape: int) -> Tensor:
        x = normal(*shape)
        return x / x.norm(dim=-1, keepdim=True)

    q, k = unit(B, T, H, d), unit(B, T, H, d)
    v = normal(B, T, H, d) * (v_scale / d ** 0.5)
    a = normal(B, T, H, m)
    beta = 0.5 + 0.5 * torch.rand(B, T, H, generator=g, dtype=f64) * (1 - 1e-3) + 2.5e-4
    gamma = (torch.rand(B, T, H, generator=g, dtype=f64) * (1 - 2e-3) + 1e-3) * gamma_scale
    state = MemoryState(*(state_scale * normal(B, H, m, d) / d ** 0.5 for _ in range(4)))
    if positions is None:
        position = torch.arange(B, dtype=torch.int64) * 5
    else:
        position = torch.as_tensor(positions, dtype=torch.int64).clone()
    if tuple(position.shape) != (B,):
        raise ValueError(f"positions must have {B} entries, got {tuple(position.shape)}")
    base = OpInputs(q, k, v, a, beta, gamma, state, position)
    return base if dtype == f64 else base.to(dtype)


def run_op(inputs: OpInputs, **op_kwargs: Any) -> tuple[Tensor, MemoryState]:
    """``trellis_memory(*inputs, **op_kwargs)``; ``chunk_size`` defaults to 4 and ``mode`` to step."""
    op_kwargs.setdefault("chunk_size", 4)
    return trellis_memory(*inputs.activations(), inputs.state, inputs.position, **op_kwargs)


def run_op_split(inputs: OpInputs, cuts: list[int], modes: list[str] | None = None,
                 **op_kwargs: Any) -> tuple[Tensor, MemoryState]:
    """Run the op over ``inputs`` in pieces split at ``cuts`` (token indices), threading the state
    and advancing positions; ``modes`` gives each piece's mode (default: op_kwargs' mode)."""
    T = inputs.q.shape[1]
    bounds = [0, *sorted(c for c in cuts if 0 < c < T), T]
    outs = []
    state = inputs.state
    for i, (t0, t1) in enumerate(zip(bounds[:-1], bounds[1:])):
        kw = dict(op_kwargs)
        if modes is not None:
            kw["mode"] = modes[i % len(modes)]
        o, state = run_op(inputs.slice(t0, t1).with_state(state), **kw)
        outs.append(o)
    return torch.cat(outs, dim=1), state


def op_shape_grid() -> list[tuple[int, int]]:
    """(C, T) pairs of the house grid: every C, T never a multiple of C > 1, T < C and T > 2C."""
    return [(1, 5), (1, 13), (3, 4), (3, 17), (4, 5), (4, 11), (16, 7), (16, 37)]


def assert_rel_close(x: Any, ref: Any, tol: float, what: str = "tensor") -> float:
    """Assert ``rel_rms(x, ref) <= tol``; returns the error (the failure message carries it)."""
    if hasattr(x, "shape") and hasattr(ref, "shape"):
        assert tuple(x.shape) == tuple(ref.shape), f"{what}: shape {tuple(x.shape)} vs {tuple(ref.shape)}"
    err = rel_rms(x, ref)
    assert err <= tol, f"{what}: relative RMS error {err:.3e} > {tol:.1e}"
    return err


def assert_state_close(state: MemoryState, ref: MemoryState, tol: float, what: str = "state",
                       fields: tuple[str, ...] = MemoryState._fields) -> None:
    """``assert_rel_close`` on the named fields of two MemoryStates."""
    for name in fields:
        assert_rel_close(getattr(state, name), getattr(ref, name), tol, f"{what}.{name}")


# --------------------------------------------------------------------------- models
def tiny_config(**overrides: Any) -> TrellisConfig:
    """A small valid config at the odd shapes (H = 3, d = 5, m = 7, C = 4, 2 layers, vocab 19)."""
    base: dict[str, Any] = dict(vocab_size=19, d_model=12, n_layers=2, n_heads=H, head_dim=D,
                                n_slots=M, chunk_size=4, ffn_dim=16)
    base.update(overrides)
    return TrellisConfig(**base)


def tiny_model(config: TrellisConfig | None = None, seed: int = 0,
               dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    """A randomly initialised TrellisLM (eval mode) in ``dtype``; gates and projections are scaled up
    from the init so that the memory path matters in the logits."""
    from trellis_export.model import TrellisLM

    torch.manual_seed(seed)
    model = TrellisLM(config or tiny_config())
    with torch.no_grad():
        for layer in model.layers:
            layer.gamma_proj.bias.fill_(-0.5)
            layer.gamma_proj.weight.mul_(5.0)
            layer.beta_proj.weight.mul_(5.0)
    return model.to(dtype).eval()


def random_ids(B: int, T: int, vocab: int, seed: int = 0) -> Tensor:
    return torch.randint(0, vocab, (B, T), generator=_generator(seed), dtype=torch.int64)


@pytest.fixture
def tiny_checkpoint(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    """A tiny float32 model saved at ``tmp_path / "ckpt"``; returns (path, model)."""
    from trellis_export.checkpoint import save_checkpoint

    model = tiny_model(dtype=torch.float32)
    path = tmp_path / "ckpt"
    save_checkpoint(model, path, metadata={"note": "test"})
    return path, model


# --------------------------------------------------------------------------- export cache
_EXPORTS: dict[tuple[str, str], Path] = {}
_EXPORT_DIR: list[Path] = []


def export_cached(model: torch.nn.Module, dtype: str = "float32") -> Path:
    """The ONNX export of ``model`` (one file per fingerprint and dtype for the whole test session):
    tests that only *use* an exported tiny or bundled model share one export instead of paying 5-10 s
    each. The file is read-only by convention: copy it before changing it."""
    import atexit
    import shutil
    import tempfile

    from trellis_export.checkpoint import model_fingerprint
    from trellis_export.export.onnx_export import export_onnx

    fp = getattr(model, "fingerprint", None) or model_fingerprint(model)
    key = (fp, dtype)
    if key not in _EXPORTS:
        if not _EXPORT_DIR:
            _EXPORT_DIR.append(Path(tempfile.mkdtemp(prefix="trellis-test-exports-")))
            atexit.register(shutil.rmtree, _EXPORT_DIR[0], True)
        _EXPORTS[key] = export_onnx(model, _EXPORT_DIR[0] / f"{fp[:16]}_{dtype}.onnx", dtype=dtype)
    return _EXPORTS[key]


def bundled_onnx() -> Path:
    """The bundled checkpoint's export, made once per session."""
    from trellis_export.checkpoint import load_checkpoint

    return export_cached(load_checkpoint())
