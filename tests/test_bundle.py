"""``trellis-export bundle``: the deployment bundle a device needs, checked as far as a CPU can.

* complete, hashes match, manifest states the state spec, tolerances, versions, tested / not tested;
* the stored reference is the float64 reference (recomputed here) and the stream has two rows at
  different positions, a prefill and >= 2k single-token steps;
* build_engine.sh: its shapes, parsed, agree with the ONNX inputs and with ``profile_shapes``; shellcheck;
* verify_engine.py --runtime ort PASSES in a fresh venv with only numpy, safetensors and onnxruntime,
  FAILS (exit 1) for a model that is wrong, and refuses a tampered file with one ``error:`` line;
* the TensorRT-RTX build of the bundle's ONNX with the bundle's shapes (on this CPU);
* the scripts' TensorRT path on a host-memory stand-in of ``tensorrt`` / ``cuda.bindings`` (an engine
  that runs model.onnx on ONNX Runtime): profiles, state sets used in turn, engine identity;
* the AOT kernels compile for the target's architecture (sm_87 Orin, sm_110 Thor);
* the CLI: bad flags and foreign output directories give one error line, nothing written.

Models: the tiny odd-shaped model (H = 3, d = 5, m = 7, C = 4) with phi = l2_silu (contractive, so a
float32 runtime stays within 1e-4 of float64 over 2k tokens; see DEVIATIONS.md), and the bundled
checkpoint once, through the CLI.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from conftest import tiny_config, tiny_model
from trellis_export.cli.main import main
from trellis_export.plugins_trt.engine import EngineSettings, Range, profile_shapes
from trellis_export.plugins_trt.runtimes import load_tensorrt

from trellis_export.bundle import TARGETS, BundleError, check_bundle, gpu_check
from trellis_export.bundle.build import (
    DEVICE_FILES,
    KERNELS_FILE,
    REFERENCE_FILE,
    build_bundle,
    parse_build_script,
)
from trellis_export.outputs import MARKER
from trellis_export.state import state_spec
from trellis_export.verify import SHORT_STREAM, TOL_FLOAT16, TOL_LONG, TOL_SHORT

CONFIG = tiny_config(phi="l2_silu")          # H 3, d 5, m 7, C 4, 2 layers, vocab 19
BATCH, TOKENS = "1..2..5", "1..37"           # odd engine ranges
HAVE_RTX = any(importlib.util.find_spec(m) is not None for m in ("tensorrt_rtx_bindings", "tensorrt_rtx"))
REQUIRED = {"model.onnx", "build_engine.sh", "build_engine.py", "verify_engine.py", "run_stream.py",
            "trellis_bundle.py", "README.md", REFERENCE_FILE, KERNELS_FILE}


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_script(bundle: Path, script: str, *args: str, python: str = sys.executable,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([python, str(bundle / script), *args], capture_output=True, text=True,
                          timeout=600, env=env, cwd=bundle.parent)


@pytest.fixture(scope="module")
def model() -> Any:
    return tiny_model(CONFIG, dtype=torch.float32)


@pytest.fixture(scope="module")
def orin(tmp_path_factory: pytest.TempPathFactory, model: Any) -> tuple[Path, dict[str, Any]]:
    """An Orin bundle of the tiny model, with its own checks (ORT parity, RTX build) run."""
    out = tmp_path_factory.mktemp("orin") / "bundle"
    manifest = build_bundle(None, out, target="orin", model=model, batch=BATCH, tokens=TOKENS, check=True)
    return out, manifest


@pytest.fixture()
def copy(orin: tuple[Path, dict[str, Any]], tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(orin[0], dst)
    return dst


# ------------------------------------------------------------------------------------- contents
def test_bundle_is_complete_and_its_hashes_match(orin: tuple[Path, dict[str, Any]]) -> None:
    bundle, manifest = orin
    on_disk = {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()}
    assert on_disk == set(manifest["files"]) | {"manifest.json", MARKER}
    assert REQUIRED <= set(manifest["files"]) and set(DEVICE_FILES) <= set(manifest["files"])
    for rel, digest in manifest["files"].items():
        assert sha(bundle / rel) == digest, rel
    assert json.loads((bundle / "manifest.json").read_text()) == manifest
    assert check_bundle(bundle) == manifest
    assert os.access(bundle / "build_engine.sh", os.X_OK) and os.access(bundle / "verify_engine.py", os.X_OK)


def test_manifest_says_what_the_device_needs_and_what_was_tested(orin: tuple[Path, dict[str, Any]],
                                                               model: Any) -> None:
    _, m = orin
    assert m["state_spec"]["tensors"] == [t.to_dict() for t in state_spec(CONFIG)]
    assert m["model"]["config"] == CONFIG.to_dict() and m["model"]["activation_dtype"] == "float32"
    assert m["model"]["fingerprint"] == model.fingerprint if hasattr(model, "fingerprint") else True
    assert m["tolerances"] == {"rule": m["tolerances"]["rule"], "short_stream": SHORT_STREAM,
                               "float32_short": TOL_SHORT, "float32_long": TOL_LONG,
                               "float16_logits": TOL_FLOAT16}
    for dist in ("trellis-export", "torch", "onnx", "onnxruntime", "numpy", "safetensors", "triton"):
        assert m["versions"][dist], dist
    checks = {t["check"].split(" ")[0]: t for t in m["tested"]}
    assert checks["verify_engine.py"]["result"] == "PASSED"
    assert checks["AOT"]["result"] == "compiled"
    if HAVE_RTX:
        assert checks["build_engine.py"]["result"] == "built"
    not_tested = " | ".join(m["not_tested"])
    for needle in ("trtexec", "enterprise TensorRT", "no GPU", "on-device check"):
        assert needle in not_tested
    readme = (orin[0] / "README.md").read_text()
    steps = [readme.index(c) for c in ("./build_engine.sh", "python3 verify_engine.py",
                                        "python3 run_stream.py")]
    assert steps == sorted(steps)


def test_reference_is_the_float64_reference(orin: tuple[Path, dict[str, Any]],
                                            model: Any) -> None:
    from safetensors.numpy import load_file

    from trellis_export.runtime.torch_backend import TorchSession

    bundle, m = orin
    info = m["reference"]
    ref = load_file(str(bundle / REFERENCE_FILE))
    names = [t.name for t in state_spec(CONFIG)]
    assert ref["input_ids"].shape == (2, info["tokens"]) and info["tokens"] >= 2048
    assert info["rows"] == 2 and len(set(info["start_positions"])) == 2
    assert list(ref["start.position"]) == info["start_positions"]
    assert info["prefill"] > 1 and info["checkpoints"][0] == info["prefill"]
    assert SHORT_STREAM in info["checkpoints"] and info["checkpoints"][-1] == info["tokens"]
    assert ref["logits"].dtype == np.float64
    assert ref["logits"].shape == (2, info["tokens"], CONFIG.vocab_size)
    assert ref["start.0.key_memory"].dtype == np.float32       # what the engine is given
    # recompute: prefill in one call, then 1-token steps up to the second checkpoint, float64
    s = TorchSession(model=model, dtype="float64")
    state = {n: ref[f"start.{n}"] if n == "position" else ref[f"start.{n}"].astype(np.float64) for n in names}
    p, c2 = info["prefill"], info["checkpoints"][1]
    lo, state = s.step(ref["input_ids"][:, :p], state)
    outs = [lo]
    for t in range(p, c2):
        lo, state = s.step(ref["input_ids"][:, t:t + 1], state)
        outs.append(lo)
    got = np.concatenate(outs, axis=1)
    assert np.abs(got - ref["logits"][:, :c2]).max() <= 1e-10 * max(1.0, np.abs(got).max())
    for n in names:
        np.testing.assert_allclose(state[n], ref[f"state.{c2}.{n}"], rtol=1e-10, atol=1e-12, err_msg=n)
    # row 1 really starts later in its stream: its memories are not the learned start memories
    assert not np.allclose(ref["start.0.key_memory"][0], ref["start.0.key_memory"][1])


def test_large_vocabulary_keeps_logit_windows_and_still_checks(copy: Path, model: Any,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Past LOGITS_BUDGET the reference keeps the logits of the LOGITS_WINDOW tokens before each
    checkpoint; verify_engine.py checks those (and every state) and still PASSES / FAILS."""
    from safetensors.numpy import save_file

    import trellis_export.bundle.build as build

    monkeypatch.setattr(build, "LOGITS_BUDGET", 0)
    m = json.loads((copy / "manifest.json").read_text())
    info = m["reference"]
    arrays, new_info = build.make_reference(model, tokens=info["tokens"], prefill=info["prefill"],
                                            seed=info["seed"], activation_dtype="float32")
    kept = arrays["logits_positions"]
    assert arrays["logits"].shape == (2, len(kept), CONFIG.vocab_size) and len(kept) < info["tokens"]
    assert all(c - 1 in kept for c in info["checkpoints"])
    assert "before each checkpoint" in new_info["logits_stored"]
    save_file(arrays, str(copy / REFERENCE_FILE))
    m["files"][REFERENCE_FILE] = sha(copy / REFERENCE_FILE)
    (copy / "manifest.json").write_text(json.dumps(m))
    proc = run_script(copy, "verify_engine.py", "--runtime", "ort", "--json", str(copy.parent / "r.json"))
    assert proc.returncode == 0, proc.stdout[-3000:]
    rep = json.loads((copy.parent / "r.json").read_text())
    assert rep["tensors"]["logits"]["checks"] == 2 * len(info["checkpoints"])


# ------------------------------------------------------------------------------------- build_engine.sh
def _onnx_inputs(path: Path) -> list[tuple[str, list[int | str]]]:
    proto = onnx.load(str(path), load_external_data=False)
    return [(i.name, [d.dim_value if d.HasField("dim_value") else d.dim_param
                      for d in i.type.tensor_type.shape.dim]) for i in proto.graph.input]


def test_build_script_shapes_agree_with_the_onnx_inputs(orin: tuple[Path, dict[str, Any]]) -> None:
    bundle, m = orin
    profiles = parse_build_script((bundle / "build_engine.sh").read_text())
    inputs = _onnx_inputs(bundle / "model.onnx")
    settings = EngineSettings(batch=Range.parse(BATCH, "b"),
                              tokens=Range.parse(TOKENS, "t", default_opt="max"))
    want = settings.profiles()
    assert len(profiles) == len(want) == 2
    batch = Range.parse(BATCH, "b")
    for prof, (pname, tokens) in zip(profiles, want):
        assert list(prof) == [n for n, _ in inputs], pname          # every input, in graph order
        for name, dims in inputs:
            rows = prof[name]
            assert len(rows) == 3 and all(len(r) == len(dims) for r in rows), name
            assert [r[0] for r in rows] == [batch.min, batch.opt, batch.max], name
            for j, d in enumerate(dims[1:], start=1):
                if name == "input_ids":
                    assert d == "tokens" and [r[1] for r in rows] == [tokens.min, tokens.opt, tokens.max]
                else:
                    assert isinstance(d, int) and all(r[j] == d for r in rows), (name, j)
            assert dims[0] == "batch", name
    # the same numbers trellis-export engine builds with, and the manifest's
    assert [{n: s for n, s in p["shapes"].items()} for p in profile_shapes(CONFIG, settings)] == profiles
    assert [p["shapes"] for p in m["engine"]["profiles"]] == profiles
    assert "--stronglyTyped" in (bundle / "build_engine.sh").read_text()


@pytest.mark.skipif(shutil.which("shellcheck") is None,
                    reason="shellcheck is not installed (apt-get install -y shellcheck; CI installs it)")
def test_build_script_is_shellcheck_clean(orin: tuple[Path, dict[str, Any]]) -> None:
    proc = subprocess.run(["shellcheck", "--severity=style", str(orin[0] / "build_engine.sh")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_build_script_says_when_the_builder_is_missing(copy: Path) -> None:
    env = {**os.environ, "TRTEXEC": str(copy / "no-such-trtexec")}
    proc = subprocess.run(["bash", str(copy / "build_engine.sh")], capture_output=True, text=True, env=env)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ")
    assert not (copy / "model.engine").exists()


@pytest.mark.tensorrt_rtx
@pytest.mark.skipif(not HAVE_RTX, reason='TensorRT-RTX is not installed (pip install -e ".[tensorrt-rtx]")')
def test_bundle_onnx_builds_with_tensorrt_rtx_and_the_bundle_shapes(copy: Path) -> None:
    """build_engine.py (the device script) with TensorRT-RTX on this CPU; the network's inputs get
    exactly the bundle's profile shapes (engine._profile_shapes, what trellis-export engine sets)."""
    proc = run_script(copy, "build_engine.py", "--runtime", "tensorrt-rtx", "--compute-capability", "8.6")
    assert proc.returncode == 0, proc.stderr[-2000:]
    info = json.loads((copy / "model.engine.json").read_text())
    manifest = json.loads((copy / "manifest.json").read_text())
    assert info["fingerprint"] == manifest["model"]["fingerprint"] and info["plugin"] is False
    assert (copy / "model.engine").stat().st_size == info["bytes"] > 0
    from trellis_export.plugins_trt.engine import _profile_shapes
    from trellis_export.plugins_trt.runtimes import load_tensorrt

    trt = load_tensorrt("tensorrt-rtx").trt
    logger = trt.Logger(trt.Logger.ERROR)
    network = trt.Builder(logger).create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    assert trt.OnnxParser(network, logger).parse((copy / "model.onnx").read_bytes())
    settings = EngineSettings(batch=Range.parse(BATCH, "b"),
                              tokens=Range.parse(TOKENS, "t", default_opt="max"))
    for prof, (_, tokens) in zip(manifest["engine"]["profiles"], settings.profiles()):
        assert _profile_shapes(network, settings, tokens) == prof["shapes"]


@pytest.mark.tensorrt_rtx
@pytest.mark.skipif(not HAVE_RTX, reason='TensorRT-RTX is not installed (pip install -e ".[tensorrt-rtx]")')
def test_plugin_build_uses_the_bundled_kernels(copy: Path) -> None:
    """build_engine.py --plugin (with trellis-export installed, as its README says): every TrellisMemory
    node becomes a plugin layer carrying the bundle's sm_87 records, compiled nowhere else."""
    proc = run_script(copy, "build_engine.py", "--plugin", "--runtime", "tensorrt-rtx",
                      "--compute-capability", "8.6")
    assert proc.returncode == 0, proc.stderr[-2000:]
    info = json.loads((copy / "model.engine.json").read_text())
    assert info["plugin"] is True and info["plugin_layers"] == CONFIG.n_layers
    records = json.loads((copy / KERNELS_FILE).read_text())
    assert info["kernel_records"] == len(records)
    assert b".target sm_87" in (copy / "model.engine").read_bytes()
    # the split prefill travels in the engine, and TensorRT was asked for its two workspaces at each
    # profile's max shapes (none for decode), the sizes the plugin's own sizing gives for these records
    from trellis_export.plugins_trt import plugin_v3

    assert info["prefill_kernels"] == list(plugin_v3.SPLIT_PREFILL)
    engine = (copy / "model.engine").read_bytes()
    for r in records:
        assert r["name"].encode() in engine, r["name"]
    manifest = json.loads((copy / "manifest.json").read_text())
    want = sorted((p["batch"]["max"], p["tokens"]["max"]) for p in manifest["engine"]["profiles"])
    assert sorted((w["B"], w["T"]) for w in info["workspace_requests"]) == want
    for w in info["workspace_requests"]:
        assert w["bytes"] == plugin_v3.workspace_size(records, w["B"], w["T"]), w
        assert (w["bytes"] > 0) == (w["T"] > 1), w
    # TensorRT-RTX 1.7.1 has the aliased plugin I/O preview feature: build_engine.py turns it on, as
    # trellis-export engine does, and the plugin declared the four memories in place (C = 4)
    trt = load_tensorrt("tensorrt-rtx").trt
    assert hasattr(trt.PreviewFeature, plugin_v3.ALIAS_PREVIEW_FEATURE)
    assert info["aliasing_preview_feature"] == plugin_v3.ALIAS_PREVIEW_FEATURE
    from trellis_export.opdef import INPUTS, OUTPUTS

    pairs = plugin_v3.aliased_outputs(CONFIG.chunk_size)
    assert len(pairs) == 4
    assert info["aliased_outputs"] == {OUTPUTS[o]: INPUTS[i] for o, i in sorted(pairs.items())}
    assert info["decode_record"] == "decode_in_place"


@pytest.mark.tensorrt_rtx
@pytest.mark.skipif(not HAVE_RTX, reason='TensorRT-RTX is not installed (pip install -e ".[tensorrt-rtx]")')
def test_build_script_enables_aliasing_only_where_tensorrt_has_it(copy: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """build_engine.enable_aliasing on a real TensorRT-RTX builder config turns the preview feature on
    and tells the plugin (``build_state["alias_io"]``); a TensorRT module without ``PreviewFeature``
    (TensorRT < 10.3) leaves both alone and the engine keeps the general decode record."""
    import types

    from trellis_export.plugins_trt import plugin_v3

    from trellis_export.bundle import device_module

    monkeypatch.setattr(sys, "path", list(sys.path))                 # the script prepends its folder
    monkeypatch.setitem(sys.modules, "trellis_bundle", device_module())    # and imports this beside it
    spec = importlib.util.spec_from_file_location("bundle_build_engine", copy / "build_engine.py")
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    trt = load_tensorrt("tensorrt-rtx").trt
    feature = getattr(trt.PreviewFeature, plugin_v3.ALIAS_PREVIEW_FEATURE)
    config = trt.Builder(trt.Logger(trt.Logger.ERROR)).create_builder_config()
    assert not config.get_preview_feature(feature)
    holder = types.SimpleNamespace(build_state={})
    assert script.enable_aliasing(trt, config, holder) == plugin_v3.ALIAS_PREVIEW_FEATURE
    assert config.get_preview_feature(feature) and holder.build_state == {"alias_io": True}
    older = types.SimpleNamespace(IPluginV3OneBuildV2=trt.IPluginV3OneBuildV2)      # no PreviewFeature
    untouched = types.SimpleNamespace(build_state={})
    assert script.enable_aliasing(older, None, untouched) is None and untouched.build_state == {}


# ------------------------------------------------------------------------------------- verify_engine.py
def test_verify_engine_ort_passes_and_reports(copy: Path) -> None:
    proc = run_script(copy, "verify_engine.py", "--runtime", "ort", "--json", str(copy.parent / "r.json"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[-1].startswith("[I] PASSED | Runtime:")
    assert "relative RMS <= 1e-05 up to position 64, <= 0.0001 beyond" in proc.stdout
    rep = json.loads((copy.parent / "r.json").read_text())
    names = ["logits"] + [t.name for t in state_spec(CONFIG)]
    assert list(rep["tensors"]) == names and all(r["status"] == "PASSED" for r in rep["tensors"].values())
    assert all(r["checks"] == 2 * len(rep["checkpoints"]) for r in rep["tensors"].values())   # per row
    assert rep["top1_agreement"] == 1.0


def _wrong_model(bundle: Path, model: Any, dest: Path) -> Path:
    """The bundle's model with one gate bias moved by 0.05, carrying the bundle's fingerprint: what a
    mis-converted engine would be."""
    from trellis_export.export.onnx_export import export_model_proto, save_model_atomic

    bad: Any = tiny_model(CONFIG, dtype=torch.float32)
    bad.load_state_dict(model.state_dict())
    with torch.no_grad():
        bad.layers[1].beta_proj.bias.add_(0.05)
    fp = json.loads((bundle / "manifest.json").read_text())["model"]["fingerprint"]
    return save_model_atomic(export_model_proto(bad, fingerprint=fp), dest)


def test_verify_engine_fails_for_a_wrong_model(copy: Path, model: Any, tmp_path: Path) -> None:
    wrong = _wrong_model(copy, model, tmp_path / "wrong.onnx")
    proc = run_script(copy, "verify_engine.py", "--runtime", "ort", "--model", str(wrong))
    assert proc.returncode == 1, proc.stdout[-2000:]
    assert proc.stdout.strip().splitlines()[-1].startswith("[I] FAILED | Runtime:")
    assert "FAILED" in next(line for line in proc.stdout.splitlines() if line.strip().startswith("logits"))


def test_verify_engine_refuses_another_models_onnx(copy: Path, tmp_path: Path) -> None:
    from trellis_export.export.onnx_export import export_onnx

    other_model: Any = tiny_model(CONFIG, seed=3, dtype=torch.float32)
    other = export_onnx(other_model, tmp_path / "other.onnx")
    proc = run_script(copy, "verify_engine.py", "--runtime", "ort", "--model", str(other))
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("error: ") and "fingerprint" in proc.stderr and proc.stdout == ""


@pytest.mark.parametrize("victim", [REFERENCE_FILE, "model.onnx", KERNELS_FILE, "build_engine.sh",
                                    "run_stream.py"])
def test_a_tampered_file_is_refused_with_one_error_line(copy: Path, victim: str) -> None:
    """One flipped bit in a data file, one added line in a script. (A script cannot vouch for itself:
    the checker, trellis_bundle.py, is covered by the hash check of the other scripts and of CI.)"""
    path = copy / victim
    data = bytearray(path.read_bytes())
    if victim.endswith((".py", ".sh")):
        data += b"echo tampered\n" if victim.endswith(".sh") else b"print('tampered')\n"
    else:
        data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    script = "run_stream.py" if victim == REFERENCE_FILE else "verify_engine.py"
    proc = run_script(copy, script, "--runtime", "ort")
    assert proc.returncode == 1, proc.stdout
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: "), proc.stderr
    assert victim in proc.stderr and "sha256" in proc.stderr and "PASSED" not in proc.stdout
    with pytest.raises(BundleError, match="sha256"):
        check_bundle(copy)


def test_a_missing_file_is_refused(copy: Path) -> None:
    (copy / KERNELS_FILE).unlink()
    proc = run_script(copy, "verify_engine.py", "--runtime", "ort")
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "missing" in proc.stderr


def test_verify_engine_without_an_engine_says_how_to_build_it(copy: Path) -> None:
    proc = run_script(copy, "verify_engine.py")
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ")
    assert "build_engine.sh" in proc.stderr or "TensorRT" in proc.stderr or "cuda" in proc.stderr


def test_verify_engine_ort_in_a_fresh_venv_without_torch(orin: tuple[Path, dict[str, Any]],
                                                         tmp_path: Path) -> None:
    """The device side needs numpy, safetensors and onnxruntime only: no torch, no trellis-export."""
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True, clear=True).create(env_dir)
    py = str(env_dir / "bin" / "python")
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    pip = subprocess.run([py, "-m", "pip", "install", "-q", "--disable-pip-version-check", "numpy",
                          "safetensors", "onnxruntime==1.32.0"], capture_output=True, text=True, env=clean,
                         timeout=900)
    assert pip.returncode == 0, pip.stderr[-3000:]
    probe = subprocess.run([py, "-c", "import importlib.util as u; print([m for m in ('torch', "
                            "'trellis_export', 'onnx', 'tensorrt') if u.find_spec(m)])"],
                           capture_output=True, text=True, env=clean, cwd=tmp_path)
    assert probe.stdout.strip() == "[]", probe.stdout + probe.stderr
    bundle = tmp_path / "on-device"
    shutil.copytree(orin[0], bundle)
    proc = run_script(bundle, "verify_engine.py", "--runtime", "ort", python=py, env=clean)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1].startswith("[I] PASSED")
    demo = run_script(bundle, "run_stream.py", "--runtime", "ort", "--ids", "3,1,4,1,5", "--tokens", "7",
                      python=py, env=clean)
    assert demo.returncode == 0, demo.stderr
    assert sum(line.startswith("token ") for line in demo.stdout.splitlines()) == 7
    assert "decode median" in demo.stdout.splitlines()[-1]


# A stand-in for the device: ``tensorrt`` and ``cuda.bindings.runtime`` modules whose "device memory"
# is host memory and whose engine runs the bundle's model.onnx on ONNX Runtime. The engine file is JSON
# naming the ONNX file and the profiles; each execution context checks that the shapes it is given fit
# its profile. This runs the device scripts' TensorRT path (profile choice, the two state sets used in
# turn, uploads and downloads) on the CPU; it proves nothing about TensorRT itself.
_FAKE_CUDA = """
import ctypes
_keep = {}
class cudaMemcpyKind:
    cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost, cudaMemcpyDeviceToDevice = 1, 2, 3
def cudaStreamCreate():
    return (0, 7)
def cudaStreamSynchronize(stream):
    return (0,)
def cudaMalloc(n):
    buf = ctypes.create_string_buffer(int(n))
    _keep[ctypes.addressof(buf)] = buf
    return (0, ctypes.addressof(buf))
def cudaMemcpyAsync(dst, src, n, kind, stream):
    ctypes.memmove(int(dst), int(src), int(n))
    return (0,)
"""
_FAKE_TRT = """
import ctypes, json
import numpy as np
import onnxruntime as ort
__version__ = "0.0-fake"
class Logger:
    WARNING, ERROR = 2, 1
    def __init__(self, level=2):
        pass
def _array(ptr, shape, dtype):
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    return np.frombuffer((ctypes.c_char * n).from_address(ptr), dtype=dtype).reshape(shape)
class _Context:
    def __init__(self, engine):
        self.e, self.shapes, self.ptrs, self.profile = engine, {}, {}, None
    def set_optimization_profile_async(self, index, stream):
        assert isinstance(stream, int)
        self.profile = self.e.profiles[index]
    def set_input_shape(self, name, shape):
        self.shapes[name] = tuple(int(d) for d in shape)
    def set_tensor_address(self, name, ptr):
        self.ptrs[name] = int(ptr)
    def execute_async_v3(self, stream):
        assert isinstance(stream, int)
        B, T = self.shapes["input_ids"]
        p = self.profile
        assert p["batch"]["min"] <= B <= p["batch"]["max"] and p["tokens"]["min"] <= T <= p["tokens"]["max"]
        s = self.e.session
        feeds = {i.name: _array(self.ptrs[i.name], self.shapes[i.name], self.e.types[i.name]).copy()
                 for i in s.get_inputs()}
        names = [o.name for o in s.get_outputs()]
        for name, value in zip(names, s.run(names, feeds)):
            _array(self.ptrs[name], value.shape, value.dtype)[...] = value
        return True
class _Engine:
    def __init__(self, spec):
        self.profiles = spec["profiles"]
        self.session = ort.InferenceSession(spec["onnx"], providers=["CPUExecutionProvider"])
        t = {"tensor(int64)": np.int64, "tensor(float)": np.float32, "tensor(float16)": np.float16}
        self.types = {i.name: t[i.type] for i in self.session.get_inputs()}
    def create_execution_context(self):
        return _Context(self)
class Runtime:
    def __init__(self, logger):
        pass
    def deserialize_cuda_engine(self, data):
        return _Engine(json.loads(data))
"""


def _fake_device(tmp: Path, bundle: Path) -> dict[str, str]:
    fakes = tmp / "fakes"
    (fakes / "cuda" / "bindings").mkdir(parents=True)
    (fakes / "cuda" / "__init__.py").write_text("")
    (fakes / "cuda" / "bindings" / "__init__.py").write_text("")
    (fakes / "cuda" / "bindings" / "runtime.py").write_text(_FAKE_CUDA)
    (fakes / "tensorrt.py").write_text(_FAKE_TRT)
    manifest = json.loads((bundle / "manifest.json").read_text())
    (bundle / "model.engine").write_text(json.dumps({"onnx": str(bundle / "model.onnx"),
                                                     "profiles": manifest["engine"]["profiles"]}))
    return {**os.environ, "PYTHONPATH": str(fakes)}


def test_device_scripts_tensorrt_path_on_a_host_memory_stand_in(copy: Path, tmp_path: Path) -> None:
    env = _fake_device(tmp_path, copy)
    proc = run_script(copy, "verify_engine.py", env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.startswith("[I] tensorrt 0.0-fake vs float64 reference")
    assert proc.stdout.strip().splitlines()[-1].startswith("[I] PASSED")
    demo = run_script(copy, "run_stream.py", "--ids", "1,2,3", "--tokens", "5", env=env)
    assert demo.returncode == 0, demo.stderr
    ort_demo = run_script(copy, "run_stream.py", "--runtime", "ort", "--ids", "1,2,3", "--tokens", "5")
    tokens = [[line.split()[2] for line in out.splitlines() if line.startswith("token ")]
              for out in (demo.stdout, ort_demo.stdout)]
    assert tokens[0] == tokens[1] and len(tokens[0]) == 5
    # an engine built from another model (its model.engine.json says so) is refused
    (copy / "model.engine.json").write_text(json.dumps({"fingerprint": "0" * 64, "plugin": False}))
    proc = run_script(copy, "verify_engine.py", env=env)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "another model" in proc.stderr


def test_run_stream_refuses_bad_prompts(copy: Path) -> None:
    for args in (["--ids", "3,99"], ["--ids", "x"], ["--tokens", "0"]):
        proc = run_script(copy, "run_stream.py", "--runtime", "ort", *args)
        assert proc.returncode == 1 and proc.stderr.count("\n") == 1, args
        assert proc.stderr.startswith("error: "), args


# ------------------------------------------------------------------------------------- float16, kernels
def test_aot_kernels_are_compiled_for_the_target(orin: tuple[Path, dict[str, Any]], tmp_path: Path,
                                                 model: Any) -> None:
    """The bundle carries exactly the records the engine builder compiles (plugin_v3.compile_records,
    the same function trellis-export engine --plugin calls): decode, the split prefill and the
    one-launch fallback, every specialisation the plugin can pick; Thor's get PTX ISA 9.0 + cubin."""
    import base64

    from trellis_export.plugins_trt import plugin_v3

    from trellis_export.opdef import ATTRIBUTES, op_attributes

    def check(recs: list[dict[str, Any]], cc: int, ptx: str) -> None:
        for r in recs:
            assert r["cc"] == cc and f".target sm_{cc}" in r["ptx"] and r["ptx_version"] == ptx
            assert r["constexprs"]["H"] == CONFIG.n_heads and r["constexprs"]["M"] == CONFIG.n_slots
            assert base64.b64decode(r["cubin_b64"])[:4] == b"\x7fELF"
        assert plugin_v3.prefill_kernels(recs) == list(plugin_v3.SPLIT_PREFILL)
        assert plugin_v3.workspace_layout(recs, 2, 37)                 # the split's two workspaces
        assert {r["kernel"] for r in recs} == set(plugin_v3.PLUGIN_KERNELS)

    orin_recs = json.loads((orin[0] / KERNELS_FILE).read_text())
    check(orin_recs, 87, "8.5")
    attrs = {k: v for k, v in op_attributes(CONFIG).items() if k in ATTRIBUTES}
    engine_recs = plugin_v3.compile_records(attrs, heads=CONFIG.n_heads, slots=CONFIG.n_slots,
                                            head_dim=CONFIG.head_dim, dtype="float32", targets=[87])
    assert orin_recs == engine_recs          # sm_87: the engine builder's defaults are the bundle's
    out = tmp_path / "thor"
    m = build_bundle(None, out, target="thor", model=model, check=False)
    thor_recs = json.loads((out / KERNELS_FILE).read_text())
    check(thor_recs, 110, "9.0")
    names = [(r["kernel"], r["variant"]) for r in engine_recs]
    assert [(r["kernel"], r["variant"]) for r in thor_recs] == names
    assert m["kernels"]["compute_capabilities"] == [110] and "sm_110" in m["kernels"]["note"]


# ------------------------------------------------------------------------------------- CLI
def bundle_cli(*args: str) -> tuple[int, str, str]:
    res = CliRunner().invoke(main, ["bundle", *args])
    return res.exit_code, res.stdout, res.stderr


def test_cli_float16_bundle_of_the_bundled_checkpoint(tmp_path: Path) -> None:
    """The bundled checkpoint, float16, TensorRT-RTX target, through the CLI, replacing a previous
    bundle: float16 activations, float32 memories and gates, float16 tolerance (5e-3 on the logits,
    states reported), and the bundle's own ORT check PASSED. (Random tiny models drift past 5e-3 in
    float16 over 2k tokens; the trained checkpoint stays near 1.5e-3.)"""
    out = tmp_path / "b"
    out.mkdir()
    (out / MARKER).write_text("x")
    (out / "stale.txt").write_text("from the previous run")
    code, stdout, stderr = bundle_cli("-o", str(out), "--target", "rtx", "--dtype", "float16")
    assert code == 0, stderr
    assert "tested       verify_engine.py --runtime ort" in stdout and ": PASSED" in stdout
    assert not (out / "stale.txt").exists() and (out / MARKER).is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]       # no temporaries left
    m = json.loads((out / "manifest.json").read_text())
    assert m["model"]["activation_dtype"] == "float16" and m["model"]["source"] == "bundled checkpoint"
    types = {i.name: i.type.tensor_type.elem_type for i in onnx.load(str(out / "model.onnx")).graph.input}
    assert types["past.0.conv"] == onnx.TensorProto.FLOAT16
    assert types["past.0.key_memory"] == onnx.TensorProto.FLOAT
    assert "--stronglyTyped" not in (out / "build_engine.sh").read_text()    # TensorRT-RTX always is
    recs = json.loads((out / KERNELS_FILE).read_text())
    assert {r["dtype"] for r in recs} == {"float16"} and {r["gate_dtype"] for r in recs} == {"float32"}
    assert sorted({r["cc"] for r in recs}) == sorted(TARGETS["rtx"].kernel_ccs)
    proc = run_script(out, "verify_engine.py", "--runtime", "ort")
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert f"relative RMS <= {TOL_FLOAT16:g} on logits (states reported)" in proc.stdout
    states = [line for line in proc.stdout.splitlines() if "key_memory" in line]
    assert states and all(line.rstrip().endswith("REPORTED") for line in states)


@pytest.mark.parametrize("args,code,needle", [
    (["--target", "xavier"], 2, "--target"),
    (["--target", "orin", "--batch", "3..8"], 1, "--batch"),
    (["--target", "orin", "--tokens", "1..x"], 1, "--tokens"),
    (["--target", "orin", "--stream-tokens", "1"], 1, "--stream-tokens"),
])
def test_cli_bad_flags_one_error_line_nothing_written(tmp_path: Path, args: list[str], code: int,
                                                      needle: str) -> None:
    out = tmp_path / "b"
    rc, _, stderr = bundle_cli("-o", str(out), *args)
    assert rc == code and stderr.count("\n") == 1 and stderr.startswith("error: ") and needle in stderr
    assert not out.exists() and not list(tmp_path.iterdir())


def test_cli_refuses_a_foreign_directory(tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    rc, _, stderr = bundle_cli("-o", str(out), "--target", "orin")
    assert rc == 1 and stderr.count("\n") == 1 and "--force" in stderr
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"] and len(list(tmp_path.iterdir())) == 1


def test_gpu_check_without_a_gpu_says_why_it_skipped(orin: tuple[Path, dict[str, Any]], copy: Path,
                                                    tmp_path: Path) -> None:
    eng = tmp_path / "e.engine"
    res = gpu_check(orin[0], engine=eng, timeout=600)                       # enterprise TensorRT
    assert res["status"] == "SKIPPED" and res["reason"], res
    if HAVE_RTX:
        res = gpu_check(orin[0], runtime="tensorrt-rtx", engine=eng, timeout=600)
        assert res["status"] == "SKIPPED" and "GPU" in res["reason"], res
    assert not eng.exists() and check_bundle(orin[0])
    before = sorted(p.name for p in tmp_path.iterdir())
    res = gpu_check(orin[0], timeout=600)                     # default: a temporary directory of its own
    assert res["status"] == "SKIPPED" and sorted(p.name for p in tmp_path.iterdir()) == before
    assert not orin[0].with_name(orin[0].name + ".engine").exists()
    for taken in (eng, eng.with_name(eng.name + ".verify.json")):   # a user's file is never overwritten
        taken.write_bytes(b"users file")
        res = gpu_check(orin[0], engine=eng, timeout=600)
        assert res["status"] == "ERROR" and str(taken) in res["reason"] and "exists" in res["reason"], res
        assert taken.read_bytes() == b"users file"
        taken.unlink()
    (copy / "run_stream.py").write_text("tampered\n")
    res = gpu_check(copy, engine=eng)
    assert res["status"] == "ERROR" and "sha256" in res["reason"]


@pytest.mark.parametrize("signame,code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_signal_mid_bundle_leaves_the_previous_bundle_and_no_temporaries(
        tiny_checkpoint: tuple[Path, torch.nn.Module], tmp_path: Path, signame: str, code: int) -> None:
    """The signal arrives right after build_engine.sh was written inside the temporary directory."""
    import textwrap

    ckpt, _ = tiny_checkpoint
    out = tmp_path / "b"
    out.mkdir()
    (out / MARKER).write_text("x")
    (out / "previous.txt").write_text("the previous bundle")
    script = textwrap.dedent(f"""
        import os, signal, sys
        from pathlib import Path
        import trellis_export.outputs as outputs
        real = outputs.write_file
        def write_then_signal(path, data):
            real(path, data)
            if Path(path).name == "build_engine.sh":
                assert Path(path).parent.name.startswith("."), path
                os.kill(os.getpid(), signal.{signame})
        outputs.write_file = write_then_signal
        import trellis_export.bundle.build as build
        build.write_file = write_then_signal
        from trellis_export.cli.main import main
        sys.argv = ["trellis-export", "bundle", {str(ckpt)!r}, "-o", {str(out)!r}, "--target", "orin"]
        main()
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert proc.returncode == code, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("error: ") and sum(ln.startswith("error: ") for ln in lines) == 1
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted([MARKER, "previous.txt"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "ckpt"]
