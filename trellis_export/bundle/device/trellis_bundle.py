"""Device-side helpers of a Trellis deployment bundle (copied verbatim into every bundle).

Needs numpy and safetensors, plus onnxruntime (``--runtime ort``) or a TensorRT module and cuda-python
(``cuda.bindings``) for engines. Never imports torch or trellis_export (except for the optional plugin
path, see README.md). Everything model-specific -- state names, shapes and dtypes, profiles,
tolerances, file hashes -- is read from ``manifest.json``, which trellis-export wrote.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

MANIFEST = "manifest.json"
FORMAT = "trellis-bundle"
PAST, PRESENT = "past.", "present."


class BundleError(Exception):
    """The bundle or an input cannot be used; the message is one line."""


def fail(message: str, code: int = 1) -> None:
    """Print one ``error:`` line and exit."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


# ------------------------------------------------------------------------------- manifest and files
def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_manifest(bundle: Path) -> dict[str, Any]:
    path = bundle / MANIFEST
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise BundleError(f"{path}: no manifest (is {bundle} a bundle written by trellis-export bundle?)") \
            from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path}: not a readable bundle manifest ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise BundleError(f"{path}: not a trellis bundle manifest (format {data.get('format')!r})"
                          if isinstance(data, dict) else f"{path}: not a trellis bundle manifest")
    return data


def check_files(bundle: Path, manifest: dict[str, Any]) -> None:
    """Every file the manifest lists is present with its sha256; raises BundleError naming the first
    that is not."""
    for rel, want in sorted(manifest["files"].items()):
        path = bundle / rel
        if not path.is_file():
            raise BundleError(f"{path}: missing from the bundle (listed in {MANIFEST})")
        got = sha256(path)
        if got != want:
            raise BundleError(f"{path}: sha256 {got[:16]}... differs from the manifest's {want[:16]}...; the "
                              "file was changed after the bundle was made: copy the bundle again")


def open_bundle(bundle: Path) -> dict[str, Any]:
    """The manifest of ``bundle``, after checking every file's hash."""
    manifest = load_manifest(bundle)
    check_files(bundle, manifest)
    return manifest


def state_tensors(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The state spec with the dtype resolved (``activation`` -> the bundle's activation dtype)."""
    act = manifest["model"]["activation_dtype"]
    return [{**t, "dtype": act if t["dtype"] == "activation" else t["dtype"]}
            for t in manifest["state_spec"]["tensors"]]


def concrete(shape: list[Any], batch: int) -> tuple[int, ...]:
    return tuple(batch if s == "B" else int(s) for s in shape)


def zero_state(manifest: dict[str, Any], batch: int) -> dict[str, np.ndarray]:
    """A zero state (position 0: every runtime starts such rows from the model's learned memories)."""
    return {t["name"]: np.zeros(concrete(t["shape"], batch), dtype=t["dtype"])
            for t in state_tensors(manifest)}


def load_reference(bundle: Path, manifest: dict[str, Any]) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(bundle / manifest["reference"]["file"]))


# ------------------------------------------------------------------------------- runtimes
class OrtRunner:
    """The bundle's model.onnx on ONNX Runtime (CPU unless asked otherwise); host state."""

    name = "onnxruntime"

    def __init__(self, model: Path, manifest: dict[str, Any], providers: list[str] | None = None,
                 threads: int = 1) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(model), sess_options=so,
                                                providers=providers or ["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types
            raise BundleError(f"{model}: onnxruntime cannot load it ({str(exc).splitlines()[0]})") from None
        meta = dict(self.session.get_modelmeta().custom_metadata_map)
        fp = meta.get("trellis.fingerprint")
        if fp != manifest["model"]["fingerprint"]:
            raise BundleError(f"{model}: fingerprint {str(fp)[:16]} is not the bundle's model "
                              f"({manifest['model']['fingerprint'][:16]})")
        self.version = ort.__version__
        self.providers = self.session.get_providers()
        self.names = [t["name"] for t in manifest["state_spec"]["tensors"]]
        self.state: dict[str, np.ndarray] = {}

    def set_state(self, state: dict[str, np.ndarray]) -> None:
        self.state = {k: np.ascontiguousarray(v) for k, v in state.items()}

    def get_state(self) -> dict[str, np.ndarray]:
        return self.state

    def step(self, ids: np.ndarray) -> np.ndarray:
        feeds = {"input_ids": np.ascontiguousarray(ids, dtype=np.int64)}
        feeds.update({PAST + n: self.state[n] for n in self.names})
        out = self.session.run(["logits"] + [PRESENT + n for n in self.names], feeds)
        self.state = dict(zip(self.names, out[1:]))
        return out[0]


def import_tensorrt(prefer: str | None = None, strict: bool = False) -> Any:
    """The TensorRT module: ``tensorrt`` (enterprise: Jetson, datacenter) or TensorRT-RTX's bindings;
    ``prefer`` ("tensorrt" | "tensorrt-rtx") is tried first, and only it when ``strict``."""
    import importlib

    modules = {"tensorrt": ["tensorrt"], "tensorrt-rtx": ["tensorrt_rtx_bindings", "tensorrt_rtx"]}
    first = modules.get(prefer or "tensorrt", modules["tensorrt"])
    order = first if strict else first + [m for ms in modules.values() for m in ms if m not in first]
    for name in order:
        try:
            mod = importlib.import_module(name)
        except Exception:  # absent, or a stub wheel that fails to import
            continue
        if hasattr(mod, "Builder") or hasattr(mod, "Runtime"):
            return mod
    raise BundleError(f"no TensorRT Python module ({' or '.join(order)}); on Jetson: sudo apt install "
                      "python3-libnvinfer; TensorRT-RTX: pip install tensorrt-rtx")


def register_plugin(trt: Any) -> None:
    """The trellis::TrellisMemory plugin (optional path; needs the trellis-export package)."""
    try:
        from trellis_export.plugins_trt import plugin_v3
    except ImportError as exc:
        raise BundleError(f"this engine holds trellis::TrellisMemory plugin layers, whose Python plugin "
                          f"comes "
                          f"with trellis-export ({exc}); rebuild without --plugin (function body) or "
                          "install trellis-export") from None
    plugin_v3.register(trt)


class _Cuda:
    """The few cuda.bindings runtime calls a TensorRT session needs."""

    def __init__(self) -> None:
        try:
            from cuda.bindings import runtime as cudart
        except ImportError:
            try:
                from cuda import cudart  # cuda-python < 12.8
            except ImportError:
                raise BundleError('TensorRT engines need cuda-python: pip install "cuda-python"') from None
        self.rt = cudart
        self._stream = self.check(cudart.cudaStreamCreate(), "cudaStreamCreate")
        self.stream = int(self._stream)          # TensorRT takes the handle as an int

    def check(self, res: Any, what: str) -> Any:
        err, *rest = res if isinstance(res, tuple) else (res,)
        if int(err) != 0:
            raise BundleError(f"{what} failed: CUDA error {int(err)}")
        return rest[0] if len(rest) == 1 else (rest or None)

    def malloc(self, n: int) -> int:
        return int(self.check(self.rt.cudaMalloc(max(int(n), 1)), "cudaMalloc"))

    def h2d(self, dst: int, src: np.ndarray) -> None:
        src = np.ascontiguousarray(src)
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self.check(self.rt.cudaMemcpyAsync(dst, src.ctypes.data, src.nbytes, kind, self._stream),
                   "cudaMemcpyAsync (host to device)")
        self.sync()

    def d2h(self, dst: np.ndarray, src: int) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self.check(self.rt.cudaMemcpyAsync(dst.ctypes.data, src, dst.nbytes, kind, self._stream),
                   "cudaMemcpyAsync (device to host)")
        self.sync()

    def sync(self) -> None:
        self.check(self.rt.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")


class TrtRunner:
    """A TensorRT engine built from the bundle: state kept on the device between calls in two buffer
    sets used in turn (call n reads ``past.*`` from one set and writes ``present.*`` to the other).
    One execution context per optimization profile (decode for T = 1, prefill otherwise)."""

    name = "tensorrt"

    def __init__(self, engine: Path, manifest: dict[str, Any], runtime: str | None = None) -> None:
        info_path = engine.with_name(engine.name + ".json")
        info = json.loads(info_path.read_text()) if info_path.is_file() else {}
        if info and info.get("fingerprint") != manifest["model"]["fingerprint"]:
            raise BundleError(f"{engine}: built from another model than this bundle's ({info_path})")
        trt = import_tensorrt(runtime or manifest["target"]["runtime"])
        self.trt = trt
        self.version = getattr(trt, "__version__", "?")
        if info.get("plugin"):
            register_plugin(trt)
        self.cuda = _Cuda()
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(engine.read_bytes())
        if self.engine is None:
            raise BundleError(f"{engine}: TensorRT {self.version} cannot deserialise it (built by another "
                              "TensorRT version or for another GPU? rebuild it here with build_engine.sh)")
        self.profiles = manifest["engine"]["profiles"]
        self.contexts = []
        for p in self.profiles:
            ctx = self.engine.create_execution_context()
            ctx.set_optimization_profile_async(int(p["index"]), self.cuda.stream)
            self.contexts.append(ctx)
        self.tensors = state_tensors(manifest)
        self.vocab = int(manifest["model"]["config"]["vocab_size"])
        self.act = manifest["model"]["activation_dtype"]
        self.max_b = int(manifest["engine"]["batch"]["max"])
        self.max_t = max(int(p["tokens"]["max"]) for p in self.profiles)
        nbytes = {t["name"]: int(np.prod(concrete(t["shape"], self.max_b))) * np.dtype(t["dtype"]).itemsize
                  for t in self.tensors}
        self.sets = [{n: self.cuda.malloc(b) for n, b in nbytes.items()} for _ in range(2)]
        self.ids_buf = self.cuda.malloc(self.max_b * self.max_t * 8)
        self.logits_buf = self.cuda.malloc(self.max_b * self.max_t * self.vocab * np.dtype(self.act).itemsize)
        self.cur = 0
        self.batch = 0

    def set_state(self, state: dict[str, np.ndarray]) -> None:
        self.batch = int(state["position"].shape[0])
        for t in self.tensors:
            self.cuda.h2d(self.sets[self.cur][t["name"]], np.asarray(state[t["name"]], dtype=t["dtype"]))

    def get_state(self) -> dict[str, np.ndarray]:
        out = {}
        for t in self.tensors:
            arr = np.empty(concrete(t["shape"], self.batch), dtype=t["dtype"])
            self.cuda.d2h(arr, self.sets[self.cur][t["name"]])
            out[t["name"]] = arr
        return out

    def _profile(self, B: int, T: int) -> int:
        order = sorted(range(len(self.profiles)),
                       key=lambda i: (self.profiles[i]["name"] != "decode") == (T == 1))
        for i in order:
            p = self.profiles[i]
            if p["batch"]["min"] <= B <= p["batch"]["max"] and p["tokens"]["min"] <= T <= p["tokens"]["max"]:
                return i
        raise BundleError(f"input_ids [B={B}, T={T}] fits no profile of the engine")

    def step(self, ids: np.ndarray) -> np.ndarray:
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        B, T = ids.shape
        ctx = self.contexts[self._profile(B, T)]
        src, dst = self.sets[self.cur], self.sets[1 - self.cur]
        self.cuda.h2d(self.ids_buf, ids)
        ctx.set_input_shape("input_ids", (B, T))
        ctx.set_tensor_address("input_ids", self.ids_buf)
        for t in self.tensors:
            ctx.set_input_shape(PAST + t["name"], concrete(t["shape"], B))
            ctx.set_tensor_address(PAST + t["name"], src[t["name"]])
            ctx.set_tensor_address(PRESENT + t["name"], dst[t["name"]])
        ctx.set_tensor_address("logits", self.logits_buf)
        if not ctx.execute_async_v3(self.cuda.stream):
            raise BundleError("TensorRT execute_async_v3 failed (see the TensorRT log above)")
        logits = np.empty((B, T, self.vocab), dtype=self.act)
        self.cuda.d2h(logits, self.logits_buf)
        self.cur = 1 - self.cur
        return logits


def open_runner(kind: str, bundle: Path, manifest: dict[str, Any], engine: Path | None = None,
                model: Path | None = None) -> Any:
    if kind == "ort":
        return OrtRunner(model or bundle / manifest["onnx"]["file"], manifest)
    path = engine or bundle / manifest["engine"]["file"]
    if not path.is_file():
        raise BundleError(f"{path}: no engine; build it first (./build_engine.sh or python3 build_engine.py)")
    return TrtRunner(path, manifest)


# ------------------------------------------------------------------------------- statistics
def rel_rms(x: np.ndarray, ref: np.ndarray) -> float:
    """||x - ref|| / ||ref|| (inf when x is not finite); the spec's error measure."""
    a, b = np.asarray(x, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    if not np.isfinite(a).all():
        return math.inf
    den = float(np.linalg.norm(b.ravel()))
    num = float(np.linalg.norm((a - b).ravel()))
    return num / den if den > 0 else num
