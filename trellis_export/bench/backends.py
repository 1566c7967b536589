"""Which bench backends can run here, and the timed callables for each (model, backend).

* ``torch``: PyTorch eager on CPU (Trellis: reference op, step mode for T = 1, chunked otherwise;
  baseline: ``scaled_dot_product_attention``);
* ``ort``: ONNX Runtime on the exported graphs (Trellis: ``export_onnx``, baseline:
  ``export_baseline_onnx``), providers from ``runtime.ort_backend.default_providers``;
* ``triton``: the Trellis model on CUDA with the Triton memory kernels (``use_backend(model, "triton")``),
  the baseline in PyTorch on the same GPU;
* ``trt``: TensorRT. This tool does not build engines: it reports the backend unavailable, with why.
"""

from __future__ import annotations

import copy
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

BACKENDS: tuple[str, ...] = ("torch", "ort", "triton", "trt")


@dataclass
class BackendStatus:
    name: str
    available: bool
    reason: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"available": self.available, "reason": self.reason, **self.detail}


def check_backend(name: str) -> BackendStatus:
    """Whether ``name`` can run on this machine; when not, the reason in one line."""
    if name == "torch":
        return BackendStatus(name, True, None, {"device": "cpu", "torch": torch.__version__})
    if name == "ort":
        if importlib.util.find_spec("onnxruntime") is None:
            return BackendStatus(name, False, "onnxruntime is not installed")
        import onnxruntime as ort

        from ..runtime.ort_backend import default_providers
        return BackendStatus(name, True, None, {"onnxruntime": ort.__version__,
                                               "providers_requested": default_providers()})
    if name == "triton":
        if importlib.util.find_spec("triton") is None:
            return BackendStatus(name, False, "triton is not installed (pip install trellis-export[triton])")
        if not torch.cuda.is_available():
            return BackendStatus(name, False, f"no CUDA GPU visible to torch {torch.__version__} "
                                              "(the Triton kernels run on a GPU)")
        return BackendStatus(name, True, None, {"device": torch.cuda.get_device_name(0)})
    if name == "trt":
        if importlib.util.find_spec("tensorrt") is None:
            return BackendStatus(name, False, "TensorRT is not installed (the Python package 'tensorrt' "
                                              "is not importable)")
        return BackendStatus(name, False, "TensorRT is installed, but trellis-export bench does not build "
                                          "TensorRT engines; time the exported model with trtexec and the "
                                          "trellis::TrellisMemory plugin instead")
    raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {name!r}")


TimedCall = tuple[Callable[[], Any], Callable[[], None] | None]


def torch_call(model: torch.nn.Module, ids: np.ndarray, state: dict[str, np.ndarray], *, trellis: bool,
               device: str = "cpu") -> TimedCall:
    """A closure running one forward of ``model`` on fixed inputs (output state discarded), + sync."""
    ids_t = torch.from_numpy(ids).to(device)
    state_t = {k: torch.from_numpy(v).to(device) for k, v in state.items()}
    tokens = ids.shape[1]
    if trellis:
        mode = "step" if tokens == 1 else "chunked"

        def fn() -> Any:
            with torch.inference_mode():
                return model(ids_t, state_t, mode=mode)
    else:
        def fn() -> Any:
            with torch.inference_mode():
                return model(ids_t, state_t)
    sync = torch.cuda.synchronize if device.startswith("cuda") else None
    return fn, sync


def ort_call(session: Any, ids: np.ndarray, state: dict[str, np.ndarray]) -> TimedCall:
    """A closure running ``session`` once on fixed feeds (``input_ids`` and ``past.*``)."""
    from ..export.ort import ORT_NUMPY_TYPES
    from ..state import PAST_PREFIX

    feeds: dict[str, np.ndarray] = {}
    for inp in session.get_inputs():
        value = ids if inp.name == "input_ids" else state[inp.name[len(PAST_PREFIX):]]
        feeds[inp.name] = np.ascontiguousarray(value, dtype=ORT_NUMPY_TYPES.get(inp.type))
    names = [o.name for o in session.get_outputs()]

    def fn() -> Any:
        return session.run(names, feeds)
    return fn, None


def triton_model(model: torch.nn.Module, trellis: bool) -> torch.nn.Module:
    """A CUDA copy of ``model``; the Trellis model's memory runs the Triton kernels."""
    m = copy.deepcopy(model).to("cuda").eval()
    if trellis:
        from ..model.backends import use_backend
        use_backend(m, "triton")
    return m
