"""The PyTorch streaming backend: a :class:`TrellisLM` behind the numpy :class:`Session` interface.

``dtype="float64"`` gives the high-precision reference (activations and memories float64) that
``trellis-export verify`` and the tests compare the other runtimes against.
"""

from __future__ import annotations

import copy
import os

import numpy as np
import torch

from ..checkpoint import load_checkpoint, model_fingerprint
from ..model import TrellisLM
from ..threads import torch_threads
from .base import Session, SessionError, StateDict

_DTYPES = {"float32": torch.float32, "float64": torch.float64}
MEMORY_MODES = ("auto", "step", "chunked")


class TorchSession(Session):
    """Streams a PyTorch :class:`TrellisLM`.

    Give either ``model`` (an in-memory TrellisLM; its fingerprint is computed from its weights) or
    ``checkpoint`` (a checkpoint directory; None -> the bundled default). ``memory_mode`` picks the
    reference op's mode: ``"auto"`` runs token by token for T = 1 and the chunked form otherwise
    (both compute the same function).
    """

    backend = "torch"

    def __init__(self, model: TrellisLM | None = None, checkpoint: str | os.PathLike[str] | None = None,
                 *, dtype: str = "float32", memory_mode: str = "auto", threads: int | None = None) -> None:
        if dtype not in _DTYPES:
            raise SessionError(f"torch backend dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
        if memory_mode not in MEMORY_MODES:
            raise SessionError(f"memory_mode must be one of {', '.join(MEMORY_MODES)}, got {memory_mode!r}")
        if model is None:
            model = load_checkpoint(checkpoint)
            fp = model.fingerprint
        else:
            fp = getattr(model, "fingerprint", None) or model_fingerprint(model)
        self.threads = int(threads) if threads is not None else None   # applied around each call only
        if model.embed.weight.dtype != _DTYPES[dtype]:
            model = copy.deepcopy(model)          # never change the caller's model in place
        self.model = model.to(_DTYPES[dtype]).eval()
        self.config = model.config
        self.fingerprint = fp
        self.activation_dtype = dtype
        self.memory_dtype = dtype
        self.memory_mode = memory_mode
        self.providers = [f"torch-{torch.__version__}-cpu"]

    def _run(self, input_ids: np.ndarray, state: StateDict) -> tuple[np.ndarray, StateDict]:
        mode = self.memory_mode
        if mode == "auto":
            mode = "step" if input_ids.shape[1] == 1 else "chunked"
        with torch_threads(self.threads), torch.inference_mode():
            ts = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}
            logits, new = self.model(torch.from_numpy(input_ids), ts, mode=mode)
            return logits.numpy(), {k: v.contiguous().numpy() for k, v in new.items()}
