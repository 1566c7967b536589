"""Which bench backends can run here, and the timed callables for each (model, backend).

* ``torch``: PyTorch eager on CPU (Trellis: reference op, step mode for T = 1, chunked otherwise;
  baseline: ``scaled_dot_product_attention``);
* ``ort``: ONNX Runtime on the exported graphs (Trellis: ``export_onnx``, baseline:
  ``export_baseline_onnx``), providers from ``runtime.ort_backend.default_providers``;
* ``triton``: the Trellis model on CUDA with the Triton memory kernels (``use_backend(model, "triton")``),
  the baseline in PyTorch on the same GPU;
* ``trt``: a TensorRT engine of the exported Trellis model (``trellis_export.plugins_trt.engine``,
  function body, profiles over the bench's batch and tokens) run by the TensorRT session
  (``runtime.trt_backend``, state kept on the device between calls); needs a TensorRT module and a
  GPU (engines build without one, but run only on one). The KV baseline has no TensorRT path.
"""

from __future__ import annotations

import copy
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..errors import first_line
from . import BACKENDS, DEFAULT_BACKENDS  # noqa: F401  (defined torch-free in the package)


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
        from ..plugins_trt.runtimes import available_runtimes

        have = available_runtimes()
        if not have:
            return BackendStatus(name, False, "no TensorRT module is importable (pip install -e "
                                              '".[tensorrt-rtx]", or NVIDIA TensorRT for your device)')
        try:
            from ..kernels.cuda_launch import CudaDriver

            cc = CudaDriver().compute_capability()
        except Exception as exc:  # no libcuda / no device
            first = first_line(exc)
            return BackendStatus(name, False, f"TensorRT ({', '.join(have)}) is importable, but no usable "
                                              f"CUDA GPU ({first}): engines build here (trellis-export "
                                              "engine) and run on a GPU")
        return BackendStatus(name, True, None, {"runtimes": have, "compute_capability": cc})
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


def trt_session(onnx_path: Any, engine_path: Any, max_batch: int, max_tokens: int) -> Any:
    """A TensorRT session of an exported Trellis ONNX model: an engine built for this GPU (function
    body; profiles decode and 1..``max_tokens``), written to ``engine_path`` (bench's work directory)."""
    from ..plugins_trt.engine import EngineSettings, Range, build_engine, onnx_for_engine, write_engine
    from ..plugins_trt.runtimes import load_tensorrt
    from ..runtime import open_session

    rt = load_tensorrt()
    ccs: tuple[str, ...] = ()
    if rt.is_rtx:
        from ..kernels.cuda_launch import CudaDriver

        cc = CudaDriver().compute_capability()
        ccs = (f"{cc // 10}.{cc % 10}",)
    settings = EngineSettings(batch=Range(1, max_batch, max_batch), tokens=Range(1, max_tokens, max_tokens),
                              compute_capabilities=ccs)
    src = onnx_for_engine(onnx_path, plugin=False)
    data, report = build_engine(src, settings, rt)
    write_engine(engine_path, data, report, src)
    return open_session("trt", engine_path=engine_path, runtime=rt.name)


def triton_model(model: torch.nn.Module, trellis: bool) -> torch.nn.Module:
    """A CUDA copy of ``model``; the Trellis model's memory runs the Triton kernels."""
    m = copy.deepcopy(model)
    m.to("cuda").eval()
    if trellis:
        from ..model import TrellisLM
        from ..model.backends import use_backend

        assert isinstance(m, TrellisLM)
        use_backend(m, "triton")
    return m
