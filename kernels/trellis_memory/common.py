"""Input checks and preparation shared by the kernel wrappers."""

from __future__ import annotations

import torch

_ACT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def prepare(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor, beta: torch.Tensor,
            gamma: torch.Tensor, key_memory: torch.Tensor, value_memory: torch.Tensor,
            key_snapshot: torch.Tensor, value_snapshot: torch.Tensor, position: torch.Tensor,
            ) -> tuple[list[torch.Tensor], tuple[int, int, int, int, int]]:
    """Validate shapes / dtypes and return contiguous kernel inputs plus (B, T, H, m, d)."""
    if q.dim() != 4:
        raise ValueError(f"q must be [B, T, H, d], got shape {tuple(q.shape)}")
    B, T, H, d = q.shape
    if T < 1:
        raise ValueError("the kernels need T >= 1 tokens per call")
    if a.dim() != 4 or tuple(a.shape[:3]) != (B, T, H):
        raise ValueError(f"a must be [B, T, H, m] = [{B}, {T}, {H}, m], got {tuple(a.shape)}")
    m = a.shape[3]
    acts = {"q": q, "k": k, "v": v, "a": a, "beta": beta, "gamma": gamma}
    for name, t in acts.items():
        if t.dtype not in _ACT_DTYPES:
            raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    for name, t in (("k", k), ("v", v)):
        if tuple(t.shape) != (B, T, H, d):
            raise ValueError(f"{name} must have shape {(B, T, H, d)} like q, got {tuple(t.shape)}")
    for name, t in (("beta", beta), ("gamma", gamma)):
        if tuple(t.shape) != (B, T, H):
            raise ValueError(f"{name} must have shape {(B, T, H)}, got {tuple(t.shape)}")
    states = {"key_memory": key_memory, "value_memory": value_memory, "key_snapshot": key_snapshot,
              "value_snapshot": value_snapshot}
    for name, t in states.items():
        if tuple(t.shape) != (B, H, m, d):
            raise ValueError(f"{name} must have shape {(B, H, m, d)}, got {tuple(t.shape)}")
    if tuple(position.shape) != (B,) or position.dtype != torch.int64:
        raise ValueError(f"position must be an int64 tensor of shape ({B},), got "
                         f"{position.dtype} {tuple(position.shape)}")
    for name in ("k", "v", "a"):
        if acts[name].dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {acts[name].dtype}")
    # beta / gamma keep their own dtype (the spec wants float32 gates; float16 gates are loaded and
    # widened inside the kernel)
    args = [t.contiguous() for t in (q, k, v, a, beta, gamma)]
    args += [t.to(torch.float32).contiguous() for t in states.values()]
    args.append(position.contiguous())
    return args, (B, T, H, m, d)


def _check_out(out: tuple[torch.Tensor, ...], q: torch.Tensor, B: int, T: int, H: int, m: int, d: int
               ) -> tuple[torch.Tensor, ...]:
    """Validate preallocated outputs (o, K, V, S_K, S_V)."""
    shapes = [(B, T, H, d)] + [(B, H, m, d)] * 4
    dtypes = [q.dtype] + [torch.float32] * 4
    if len(out) != 5:
        raise ValueError(f"out must hold 5 tensors (o, K, V, S_K, S_V), got {len(out)}")
    for i, (t, s, dt) in enumerate(zip(out, shapes, dtypes)):
        if tuple(t.shape) != s or t.dtype != dt or not t.is_contiguous() or t.device != q.device:
            raise ValueError(f"out[{i}] must be a contiguous {dt} tensor of shape {s} on {q.device}, "
                             f"got {t.dtype} {tuple(t.shape)} on {t.device}")
    return tuple(out)


def outputs(args: list[torch.Tensor], state: tuple[torch.Tensor, ...], out: tuple[torch.Tensor, ...] | None,
            in_place: bool, dims: tuple[int, int, int, int, int]) -> tuple[torch.Tensor, ...]:
    """The five output tensors (o, K, V, S_K, S_V) of a launch: with ``in_place`` the four caller's
    state tensors themselves (they must be what :func:`prepare` passed through: contiguous float32)
    and ``out[0]`` or a new o; else ``out`` validated, or new tensors."""
    B, T, H, m, d = dims
    q = args[0]
    if in_place:
        if any(a is not s for a, s in zip(args[6:10], state)):
            raise ValueError("in_place needs contiguous float32 state tensors (they are updated in place)")
        o = out[0] if out is not None else torch.empty(B, T, H, d, dtype=q.dtype, device=q.device)
        return _check_out((o, *state), q, B, T, H, m, d)
    if out is not None:
        return _check_out(out, q, B, T, H, m, d)
    o = torch.empty(B, T, H, d, dtype=q.dtype, device=q.device)
    return (o, *(torch.empty(B, H, m, d, dtype=torch.float32, device=q.device) for _ in range(4)))
