"""The benchmark baseline: a softmax-attention Transformer with a KV cache, as wide and deep as a Trellis
model of the same :class:`TrellisConfig` (d_model, n_layers, n_heads, head_dim, ffn_dim, vocab).

Each block is ``x + W_o Attn(RoPE(q), RoPE(k), v)`` then ``x + SwiGLU(RMSNorm(x))`` (pre-norm), the LM
head is tied to the embedding when the config says so. The memory mixer is the only difference from
the Trellis block (no conv, no slot target, no gates, no output gate), so the two models compare the
cost of a KV cache against the cost of a fixed-size learned memory.

Streaming state, a flat dict like :meth:`TrellisLM.init_state` (names without prefix; graphs use
``past.`` / ``present.`` from :mod:`trellis_export.state`):

| name | shape | dtype |
|---|---|---|
| ``position`` | [B] | int64 |
| ``{L}.key``, ``{L}.value`` | [B, H, N, d] (past) -> [B, H, N + T, d] (present) | float32 |

All rows of a batch share the cache length N (no padding masks): a batch of streams that started
together. ``position`` only feeds the rotary embedding; every row's ``position`` must equal N.
RoPE rotates the first ``2 * (head_dim // 2)`` channels (an odd head_dim leaves its last channel as is).
"""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import TrellisConfig
from .errors import TrellisExportError
from .model.lm import RMSNorm, SwiGLU
from .state import PAST_PREFIX, PRESENT_PREFIX

__all__ = ["KVCacheLM", "KVCacheLayer", "kv_state_names", "kv_state_shapes", "kv_state_bytes_per_stream",
           "export_baseline_onnx", "BaselineError", "ROPE_BASE"]

State = dict[str, Tensor]
ROPE_BASE = 10000.0
#: Names of the dynamic axes of the exported baseline graph.
BATCH_DIM, TOKENS_DIM, PAST_DIM = "batch", "tokens", "past"


class BaselineError(TrellisExportError):
    """The baseline cannot be run or exported with these inputs."""


def kv_state_names(config: TrellisConfig) -> list[str]:
    """State tensor names in graph order: position, then per layer key and value."""
    names = ["position"]
    for layer in range(config.n_layers):
        names += [f"{layer}.key", f"{layer}.value"]
    return names


def kv_state_shapes(config: TrellisConfig, batch: int, context: int) -> dict[str, tuple[int, ...]]:
    """Concrete shapes of a KV state of ``batch`` rows holding ``context`` tokens."""
    H, d = config.n_heads, config.head_dim
    return {n: ((batch,) if n == "position" else (batch, H, context, d)) for n in kv_state_names(config)}


def kv_state_bytes_per_stream(config: TrellisConfig, context: int) -> int:
    """Bytes of KV state one stream carries at ``context`` tokens: grows linearly with context."""
    return 8 + config.n_layers * 2 * config.n_heads * context * config.head_dim * 4


def _rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half RoPE on the first ``2 * (d // 2)`` channels. x [B, H, T, d], cos/sin [B, 1, T, d//2]."""
    half = cos.shape[-1]
    x1, x2, rest = x[..., :half], x[..., half:2 * half], x[..., 2 * half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)


class KVCacheLayer(nn.Module):
    """Pre-norm softmax attention with a KV cache, then a SwiGLU FFN."""

    def __init__(self, config: TrellisConfig) -> None:
        super().__init__()
        c = config
        self.config = c
        D, HD = c.d_model, c.memory_dim
        self.norm_attn = RMSNorm(D, c.norm_eps)
        self.qkv_proj = nn.Linear(D, 3 * HD, bias=False)
        self.out_proj = nn.Linear(HD, D, bias=False)
        self.norm_ffn = RMSNorm(D, c.norm_eps)
        self.ffn = SwiGLU(D, c.ffn_dim)

    def forward(self, x: Tensor, past_key: Tensor, past_value: Tensor, cos: Tensor, sin: Tensor
                ) -> tuple[Tensor, Tensor, Tensor]:
        c = self.config
        B, T, _ = x.shape
        H, d = c.n_heads, c.head_dim
        q, k, v = self.qkv_proj(self.norm_attn(x)).view(B, T, 3, H, d).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        key = torch.cat([past_key.to(k.dtype), k], dim=2)                 # [B, H, N + T, d]
        value = torch.cat([past_value.to(v.dtype), v], dim=2)
        n_past = past_key.shape[2]
        # query t (absolute n_past + t) sees keys 0 .. n_past + t
        allowed = (torch.arange(key.shape[2], device=x.device).unsqueeze(0)
                   <= (torch.arange(T, device=x.device) + n_past).unsqueeze(1))   # [T, N + T]
        o = F.scaled_dot_product_attention(q, key, value, attn_mask=allowed)       # [B, H, T, d]
        x = x + self.out_proj(o.transpose(1, 2).reshape(B, T, H * d))
        x = x + self.ffn(self.norm_ffn(x))
        return x, key, value


class KVCacheLM(nn.Module):
    """Token embedding -> KV-cache attention layers -> RMSNorm -> LM head (the benchmark baseline)."""

    inv_freq: Tensor           # rotary frequencies (a non-persistent buffer)

    def __init__(self, config: TrellisConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        nn.init.normal_(self.embed.weight, std=1.0 / math.sqrt(config.d_model))
        self.layers = nn.ModuleList(KVCacheLayer(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.d_model, config.vocab_size,
                                                                      bias=False)
        half = config.head_dim // 2
        inv_freq = 1.0 / (ROPE_BASE ** (torch.arange(half, dtype=torch.float64) * 2.0 / max(2 * half, 1)))
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)

    def init_state(self, batch: int, context: int = 0, device: torch.device | str | None = None) -> State:
        """An empty cache (``context = 0``), or zero-filled one of ``context`` tokens at position N."""
        device = device if device is not None else self.embed.weight.device
        dtype = self.embed.weight.dtype
        out: State = {}
        for name, shape in kv_state_shapes(self.config, batch, context).items():
            if name == "position":
                out[name] = torch.full(shape, context, dtype=torch.int64, device=device)
            else:
                out[name] = torch.zeros(shape, dtype=dtype, device=device)
        return out

    def forward(self, input_ids: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        """Logits ``[B, T, vocab]`` and the state after these tokens (any split gives the same logits)."""
        if input_ids.dim() != 2 or input_ids.shape[1] < 1:
            raise BaselineError(f"input_ids must be [B, T] with T >= 1, got shape {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        if state is None:
            state = self.init_state(B, 0, input_ids.device)
        position = state["position"]
        pos = (position.unsqueeze(1) + torch.arange(T, device=input_ids.device)).to(self.inv_freq.dtype)
        angles = pos.unsqueeze(-1) * self.inv_freq                           # [B, T, d // 2]
        x = self.embed(input_ids)
        cos = angles.cos().unsqueeze(1).to(x.dtype)                           # [B, 1, T, d // 2]
        sin = angles.sin().unsqueeze(1).to(x.dtype)
        new_state: State = {"position": position + T}
        for i, layer in enumerate(self.layers):
            x, key, value = layer(x, state[f"{i}.key"], state[f"{i}.value"], cos, sin)
            new_state[f"{i}.key"], new_state[f"{i}.value"] = key, value
        x = self.norm(x)
        logits = F.linear(x, self.embed.weight) if self.lm_head is None else self.lm_head(x)
        return logits, new_state

    step = forward

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


class _StepGraph(nn.Module):
    def __init__(self, model: KVCacheLM, names: list[str]) -> None:
        super().__init__()
        self.model = model
        self.names = names

    def forward(self, input_ids: Tensor, *past: Tensor) -> tuple[Tensor, ...]:
        logits, new = self.model(input_ids, dict(zip(self.names, past)))
        return (logits, *(new[n] for n in self.names))


def export_baseline_onnx(model: KVCacheLM, path: str | os.PathLike[str]) -> Path:
    """Export the baseline's streaming step (torch dynamo exporter, opset 18, standard ops only).

    Inputs ``input_ids [batch, tokens]`` and ``past.*``; outputs ``logits`` and ``present.*``; the batch,
    token and cache-length axes are dynamic. Written through a temporary file and a rename.
    """
    from .fileio import atomic_write_bytes

    dest = Path(path)
    if dest.is_dir():
        raise BaselineError(f"{dest}: is a directory; expected an output file path such as kv.onnx")
    if not dest.parent.exists():
        raise BaselineError(f"{dest.parent}: output directory does not exist")
    config = model.config
    names = kv_state_names(config)
    m = copy.deepcopy(model).to("cpu").float().eval()
    state = m.init_state(2, 5)
    ids = torch.zeros(2, 3, dtype=torch.int64)
    B = torch.export.Dim(BATCH_DIM, min=1)
    T = torch.export.Dim(TOKENS_DIM, min=1)
    N = torch.export.Dim(PAST_DIM, min=0)
    dyn = ({0: B, 1: T}, tuple({0: B} if n == "position" else {0: B, 2: N} for n in names))
    input_names = ["input_ids", *(PAST_PREFIX + n for n in names)]
    output_names = ["logits", *(PRESENT_PREFIX + n for n in names)]
    from .export.onnx_export import torch_export

    proto = torch_export(_StepGraph(m, names), (ids, *(state[n] for n in names)), input_names=input_names,
                         output_names=output_names, dynamic_shapes=dyn, error=BaselineError,
                         what="the KV-cache baseline")
    proto.producer_name = "trellis-export (kv-cache baseline)"
    atomic_write_bytes(dest, proto.SerializeToString())
    return dest
