"""The Trellis layer and language model of TRELLIS_SPEC.md section 5, with explicit streaming state.

State is a flat ``dict[str, Tensor]`` keyed by the names of :mod:`trellis_export.state`
(``position``, ``{L}.key_memory`` ...). ``model.step(ids, state)`` streams; ``model(ids)`` is the
training forward over whole sequences (chunked memory mode). Both return ``(logits, new_state)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import TrellisConfig
from ..state import memory_fields, state_spec
from .memory import MemoryState, trellis_memory

State = dict[str, Tensor]
#: Signature of a memory backend: same as :func:`trellis_memory`.
MemoryFn = Callable[..., tuple[Tensor, MemoryState]]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w_gate = nn.Linear(dim, hidden, bias=False)
        self.w_up = nn.Linear(dim, hidden, bias=False)
        self.w_down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class TrellisLayer(nn.Module):
    """One block: Trellis memory mixer (paper Fig. 1) then a SwiGLU FFN, both pre-norm residual."""

    def __init__(self, config: TrellisConfig) -> None:
        super().__init__()
        c = config
        self.config = c
        D, HD, H, m, d = c.d_model, c.memory_dim, c.n_heads, c.n_slots, c.head_dim
        self.norm_mixer = RMSNorm(D, c.norm_eps)
        self.qkv_proj = nn.Linear(D, 3 * HD, bias=False)           # [W_q; W_k; W_v]
        self.conv_weight = nn.Parameter(torch.empty(3 * HD, c.conv_size))
        self.a_proj = nn.Linear(D, H * m, bias=False)
        self.beta_proj = nn.Linear(D, H)
        self.gamma_proj = nn.Linear(D, H)
        self.m0_key = nn.Parameter(torch.randn(H, m, d) / math.sqrt(d))
        self.m0_value = nn.Parameter(torch.randn(H, m, d) / math.sqrt(d))
        self.out_norm = RMSNorm(HD, c.norm_eps)
        self.gate_proj = nn.Linear(D, HD, bias=False)
        self.out_proj = nn.Linear(HD, D, bias=False)
        self.norm_ffn = RMSNorm(D, c.norm_eps)
        self.ffn = SwiGLU(D, c.ffn_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        c = self.config
        bound = 1.0 / math.sqrt(c.conv_size)
        nn.init.uniform_(self.conv_weight, -bound, bound)
        with torch.no_grad():
            self.beta_proj.weight.mul_(0.1)
            self.beta_proj.bias.fill_(math.log(c.beta_init / (1.0 - c.beta_init)))
            self.gamma_proj.weight.mul_(0.1)
            self.gamma_proj.bias.fill_(math.log(c.gamma_init / (1.0 - c.gamma_init)))

    def conv(self, x: Tensor, cache: Tensor) -> tuple[Tensor, Tensor]:
        """Causal depthwise conv over time. x ``[B, T, Ch]``, cache ``[B, Ch, K-1]``."""
        xc = torch.cat([cache.to(x.dtype), x.transpose(1, 2)], dim=2)     # [B, Ch, K-1+T]
        y = F.conv1d(xc, self.conv_weight.unsqueeze(1), groups=xc.shape[1])
        return y.transpose(1, 2), xc[:, :, xc.shape[2] - (self.config.conv_size - 1):]

    def forward(self, x: Tensor, memory: MemoryState, conv_cache: Tensor, position: Tensor,
                memory_fn: MemoryFn, mode: str) -> tuple[Tensor, MemoryState, Tensor]:
        c = self.config
        B, T, _ = x.shape
        H, m, d = c.n_heads, c.n_slots, c.head_dim
        fresh = (position == 0)
        f4 = fresh.view(B, 1, 1, 1)
        m0k = self.m0_key.to(memory.key.dtype).expand(B, H, m, d)
        m0v = self.m0_value.to(memory.value.dtype).expand(B, H, m, d)
        memory = MemoryState(torch.where(f4, m0k, memory.key), torch.where(f4, m0v, memory.value),
                             torch.where(f4, m0k, memory.key_snapshot),
                             torch.where(f4, m0v, memory.value_snapshot))
        conv_cache = torch.where(fresh.view(B, 1, 1), torch.zeros_like(conv_cache), conv_cache)

        h = self.norm_mixer(x)
        qkv, new_cache = self.conv(self.qkv_proj(h), conv_cache)
        q, k, v = F.silu(qkv).view(B, T, 3, H, d).unbind(2)
        if c.qk_norm == "l2":
            q = F.normalize(q, dim=-1, eps=1e-6)
            k = F.normalize(k, dim=-1, eps=1e-6)
        a = self.a_proj(h).view(B, T, H, m)
        # Gates are float32 even for float16/bfloat16 activations (spec section 1): the recurrence
        # compounds beta over the whole stream, and a float16 beta drifts by 1e-2 in 300 tokens.
        gd = torch.promote_types(h.dtype, torch.float32)
        hg = h.to(gd)
        beta = torch.sigmoid(F.linear(hg, self.beta_proj.weight.to(gd), self.beta_proj.bias.to(gd)))
        gamma = torch.sigmoid(F.linear(hg, self.gamma_proj.weight.to(gd), self.gamma_proj.bias.to(gd)))
        o, new_memory = memory_fn(q, k, v, a, beta, gamma, memory, position, chunk_size=c.chunk_size,
                                  phi=c.phi, f=c.f, rho=c.rho, eps=c.eps, mode=mode)
        o = o.to(x.dtype).reshape(B, T, H * d)
        x = x + self.out_proj(self.out_norm(o) * F.gelu(self.gate_proj(h)))
        x = x + self.ffn(self.norm_ffn(x))
        return x, new_memory, new_cache


class TrellisLM(nn.Module):
    """Token embedding -> Trellis layers -> RMSNorm -> LM head, with explicit streaming state.

    A model loaded by :func:`trellis_export.checkpoint.load_checkpoint` also carries ``fingerprint``,
    ``fingerprint_version`` and ``checkpoint_path``."""

    config: TrellisConfig
    fingerprint: str
    fingerprint_version: int
    checkpoint_path: str

    def __init__(self, config: TrellisConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        nn.init.normal_(self.embed.weight, std=1.0 / math.sqrt(config.d_model))
        self.layers = nn.ModuleList(TrellisLayer(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.d_model, config.vocab_size,
                                                                      bias=False)
        self.memory_fn: MemoryFn = trellis_memory

    # ----------------------------------------------------------------- state
    def state_dtype(self) -> torch.dtype:
        """Memories are float32; float64 only when the whole model is float64 (test oracle)."""
        return torch.float64 if self.embed.weight.dtype == torch.float64 else torch.float32

    def init_state(self, batch: int, device: torch.device | str | None = None) -> State:
        """A zero state with position 0: valid start for every row (the layers reset on position 0)."""
        device = device if device is not None else self.embed.weight.device
        act = self.embed.weight.dtype
        out: State = {}
        for t in state_spec(self.config):
            dtype = {"int64": torch.int64, "float32": self.state_dtype(), "activation": act}[t.dtype]
            out[t.name] = torch.zeros(t.concrete_shape(batch), dtype=dtype, device=device)
        return out

    def _layer_memory(self, state: State, i: int) -> MemoryState:
        fields = memory_fields(self.config)
        t = [state[f"{i}.{f}"] for f in fields]
        if len(t) == 2:   # C = 1: snapshots are not state; they equal the running memories
            t = t + t
        return MemoryState(*t)

    # ----------------------------------------------------------------- forward
    def forward(self, input_ids: Tensor, state: State | None = None, *, mode: str = "chunked",
                memory_fn: MemoryFn | None = None) -> tuple[Tensor, State]:
        """Logits ``[B, T, vocab]`` and the state after these tokens."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        if T < 1:
            raise ValueError("input_ids must hold at least one token per row (T >= 1)")
        if state is None:
            state = self.init_state(B, input_ids.device)
        fn = memory_fn or self.memory_fn
        position = state["position"]
        x = self.embed(input_ids)
        new_state: State = {"position": position + T}
        fields = memory_fields(self.config)
        for i, layer in enumerate(self.layers):
            x, mem, conv = layer(x, self._layer_memory(state, i), state[f"{i}.conv"], position, fn, mode)
            for fld, tensor in zip(fields, mem):
                new_state[f"{i}.{fld}"] = tensor
            new_state[f"{i}.conv"] = conv
        x = self.norm(x)
        logits = F.linear(x, self.embed.weight) if self.lm_head is None else self.lm_head(x)
        return logits, new_state

    def step(self, input_ids: Tensor, state: State, *, mode: str = "step") -> tuple[Tensor, State]:
        """Streaming call: any split of a stream into calls gives the logits of one whole call."""
        return self.forward(input_ids, state, mode=mode)

    # ----------------------------------------------------------------- info
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def describe(self) -> dict[str, Any]:
        from ..state import state_bytes_per_stream
        return {"parameters": self.num_parameters(),
                "state_bytes_per_stream": state_bytes_per_stream(self.config)}
