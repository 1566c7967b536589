"""``trellis-export bundle``: everything a device needs to build, check and run a Trellis engine.

The bundle is written into a temporary sibling directory and swapped in whole
(:mod:`trellis_export.outputs`); see docs/bundle.md for its contents.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from trellis_export import __version__
from trellis_export.outputs import (
    MARKER,
    OutputSpec,
    claim_outputs,
    current_umask,
    replace_dir,
    temporary_sibling,
    write_file,
)
from trellis_export.spec import SHORT_STREAM, TOL_FLOAT16, TOL_LONG, TOL_SHORT
from trellis_export.state import state_spec

from .targets import BundleError, Target, get_target

FORMAT, FORMAT_VERSION = "trellis-bundle", "1"
DEVICE_DIR = Path(__file__).resolve().parent / "device"
#: Device-side files copied verbatim (package data).
DEVICE_FILES: tuple[str, ...] = ("trellis_bundle.py", "verify_engine.py", "build_engine.py", "run_stream.py")
ONNX_FILE, ENGINE_FILE, SCRIPT = "model.onnx", "model.engine", "build_engine.sh"
REFERENCE_FILE, KERNELS_FILE = "reference/reference.safetensors", "kernels/aot_records.json"
#: The reference stream: row 0 starts at position 0, row 1 after this many warm-up tokens.
ROW_OFFSETS: tuple[int, ...] = (0, 37)
DEFAULT_PREFILL = 48
#: Reference logits are kept for every token while they fit in this many bytes (float64); beyond, for
#: the LOGITS_WINDOW tokens before each checkpoint only (large vocabularies).
LOGITS_BUDGET = 128 * 1024**2
LOGITS_WINDOW = 32


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, str | None]:
    """Versions of everything used to make a bundle."""
    out: dict[str, str | None] = {"trellis-export": __version__, "python": platform.python_version()}
    for dist in ("torch", "onnx", "onnxruntime", "numpy", "safetensors", "triton",
                 "tensorrt-rtx-cu12-bindings", "cuda-bindings"):
        out[dist] = _dist_version(dist)
    return out


def checkpoints(prefill: int, tokens: int) -> list[int]:
    """Stream positions (tokens consumed) at which logits and states are checked."""
    marks = {prefill, tokens}
    c = SHORT_STREAM
    while c < tokens:
        marks.add(c)
        c *= 2
    marks.update(range(512, tokens, 512))
    return sorted(m for m in marks if prefill <= m <= tokens)


# ------------------------------------------------------------------------------- reference
def make_reference(model: Any, *, tokens: int, prefill: int, seed: int, activation_dtype: str
                   ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The seeded stream and the float64 reference's logits (every token, or for a large vocabulary the
    ``LOGITS_WINDOW`` tokens before each checkpoint: ``logits_positions``) and states (at checkpoints).

    Two rows at different stream positions: row b starts after ``ROW_OFFSETS[b]`` warm-up tokens; the
    start state is stored in the engine's dtypes (float32 memories, activation-dtype conv) and the
    reference continues from exactly that state."""
    from trellis_export.runtime.torch_backend import TorchSession

    ref = TorchSession(model=model, dtype="float64")
    ref.check_finite = False
    spec = state_spec(model.config)
    vocab = model.config.vocab_size
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, size=(len(ROW_OFFSETS), tokens), dtype=np.int64)
    rows = []
    for off in ROW_OFFSETS:
        st = ref.init_state(1)
        if off:
            _, st = ref.step(rng.integers(0, vocab, size=(1, off), dtype=np.int64), st)
        rows.append(st)
    start = {t.name: np.concatenate([r[t.name] for r in rows]).astype(t.resolved_dtype(activation_dtype))
             for t in spec}
    arrays: dict[str, np.ndarray] = {"input_ids": ids}
    arrays.update({f"start.{n}": v for n, v in start.items()})
    state = {n: (v if v.dtype == np.int64 else v.astype(np.float64)) for n, v in start.items()}
    marks = checkpoints(prefill, tokens)
    if len(ROW_OFFSETS) * tokens * vocab * 8 <= LOGITS_BUDGET:
        keep = np.arange(tokens)
    else:
        keep = np.unique(np.concatenate([np.arange(max(0, m - LOGITS_WINDOW), m) for m in marks]))
    logits = []
    pos = 0
    for mark in marks:
        for r0 in range(pos, mark, 512):
            r1 = min(r0 + 512, mark)
            lo, state = ref.step(ids[:, r0:r1], state)
            sel = keep[(keep >= r0) & (keep < r1)] - r0
            logits.append(np.asarray(lo, dtype=np.float64)[:, sel])
        pos = mark
        arrays.update({f"state.{mark}.{n}": np.ascontiguousarray(v) for n, v in state.items()})
    arrays["logits"] = np.ascontiguousarray(np.concatenate(logits, axis=1))
    arrays["logits_positions"] = keep.astype(np.int64)
    info = {"file": REFERENCE_FILE, "tokens": tokens, "prefill": prefill, "rows": len(ROW_OFFSETS),
            "start_positions": [int(p) for p in start["position"]], "checkpoints": marks, "seed": seed,
            "dtype": "float64",
            "reference": "PyTorch float64 reference (trellis_export.runtime torch backend)",
            "keys": {"input_ids": "[rows, tokens] int64", "start.<state>": "the state both sides start from",
                     "logits": "[rows, len(logits_positions), vocab] float64",
                     "logits_positions": "stream indices (0-based) whose logits are stored",
                     "state.<checkpoint>.<state>": "float64"},
            "logits_stored": "every token" if len(keep) == tokens else
                             f"the {LOGITS_WINDOW} tokens before each checkpoint"}
    return arrays, info


# ------------------------------------------------------------------------------- build_engine.sh
def shape_spec(shapes: dict[str, list[list[int]]], which: int) -> str:
    """trtexec's ``name:AxB,name:C`` for min (0), opt (1) or max (2)."""
    return ",".join(f"{name}:{'x'.join(str(d) for d in rows[which])}" for name, rows in shapes.items())


def build_script(target: Target, profiles: list[dict[str, Any]], fingerprint: str) -> str:
    lines = ["#!/usr/bin/env bash",
             f"# Build {ENGINE_FILE} from {ONNX_FILE} on this device ({target.description}).",
             "# Written by trellis-export bundle: every input's min / opt / max shape, one profile each for "
             + " and ".join(f"{p['name']} (tokens {p['tokens']['min']}..{p['tokens']['max']})"
                            for p in profiles)
             + ".",
             "# Strongly typed: the ONNX model's types decide the precision (float32 memories and gates).",
             "# Extra arguments are passed to the builder, e.g. ./build_engine.sh --verbose",
             "set -euo pipefail",
             'cd "$(dirname "$0")"',
             f'BUILDER="${{TRTEXEC:-{target.builder}}}"',
             'if ! command -v "$BUILDER" >/dev/null 2>&1; then',
             '  echo "error: $BUILDER not found; set TRTEXEC=/path/to/trtexec or run python3 build_engine.py"'
             ' >&2',
             "  exit 1",
             "fi",
             f"rm -f {ENGINE_FILE}.json"]
    args = [f"--onnx={ONNX_FILE}", f"--saveEngine={ENGINE_FILE}"]
    if target.runtime == "tensorrt":
        args.append("--stronglyTyped")
    for p in profiles:
        for flag, which in (("--minShapes", 0), ("--optShapes", 1), ("--maxShapes", 2)):
            args.append(f"{flag}={shape_spec(p['shapes'], which)}")
    lines.append('"$BUILDER" \\')
    lines.extend(f"  {shlex.quote(a)} \\" for a in args)
    lines.append('  "$@"')
    info = json.dumps({"fingerprint": fingerprint, "runtime": target.builder, "plugin": False,
                       "built_by": SCRIPT})
    lines.append(f"printf '%s\\n' {shlex.quote(info)} > {ENGINE_FILE}.json")
    lines.append(f'echo "wrote {ENGINE_FILE}; next: python3 verify_engine.py"')
    return "\n".join(lines) + "\n"


def parse_build_script(text: str) -> list[dict[str, list[list[int]]]]:
    """The profiles of a build_engine.sh: for each, input -> [min, opt, max] shapes (parsed)."""
    words = shlex.split(text.replace("\\\n", " "), comments=True)
    profiles: list[dict[str, list[list[int]]]] = []
    for w in words:
        for which, flag in enumerate(("--minShapes=", "--optShapes=", "--maxShapes=")):
            if w.startswith(flag):
                if which == 0:
                    profiles.append({})
                for item in w[len(flag):].split(","):
                    name, _, dims = item.rpartition(":")
                    profiles[-1].setdefault(name, []).append([int(d) for d in dims.split("x")])
    return profiles


# ------------------------------------------------------------------------------- kernels
def compile_kernels(config: Any, target: Target, dtype: str, dest: Path) -> dict[str, Any]:
    """The plugin's AOT records for the target's compute capabilities (a subprocess without
    TRITON_INTERPRET); returns the manifest's ``kernels`` entry."""
    cfg = dest.parent / "config.tmp.json"
    cfg.write_text(config.to_json())
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "trellis_export.bundle.aot_records", "--config", str(cfg),
           "--ccs", ",".join(map(str, target.kernel_ccs)), "--dtype", dtype,
           "--ptx-versions", json.dumps({str(k): v for k, v in target.ptx_versions.items()}),
           "--cubin", ",".join(map(str, target.cubin_ccs)), "--out", str(dest)]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    finally:
        cfg.unlink(missing_ok=True)
    if proc.returncode != 0:
        msg = (proc.stderr.strip().splitlines() or ["no message"])[-1]
        raise BundleError(f"AOT compilation of the plugin's kernels for {target.name} "
                          f"(sm_{', sm_'.join(map(str, target.kernel_ccs))}) failed: {msg}")
    recs = json.loads(dest.read_text())
    return {"file": KERNELS_FILE, "compute_capabilities": list(target.kernel_ccs), "records": len(recs),
            "dtype": dtype, "variants": sorted({f"{r['kernel']}:{r['variant']}" for r in recs}),
            "ptx_versions": sorted({f"sm_{r['cc']}: PTX {r['ptx_version']} ({r['ptx_target']})"
                                    for r in recs}),
            "cubins": sorted({f"sm_{r['cc']}" for r in recs if r.get("cubin_b64")}),
            "note": target.kernel_note}


# ------------------------------------------------------------------------------- README
def readme(target: Target, manifest: dict[str, Any]) -> str:
    """The bundle's README.md: the three device commands, in order, and what each needs."""
    dtype = manifest["model"]["activation_dtype"]
    tol = manifest["tolerances"]
    ref = manifest["reference"]
    tol_line = (f"relative RMS <= {tol['float16_logits']:g} on the logits (a float16 engine; its state "
                "errors are reported, not judged)" if dtype == "float16" else
                f"relative RMS <= {tol['float32_short']:g} up to stream position {tol['short_stream']} and "
                f"<= {tol['float32_long']:g} beyond, on the logits and on every state tensor")
    builder = "tensorrt_rtx (TensorRT for RTX)" if target.runtime == "tensorrt-rtx" else "trtexec"
    kernels = manifest["kernels"]
    return f"""# Trellis engine bundle for {target.description}

Model `{manifest['model']['fingerprint'][:16]}`, {dtype} activations with float32 memories and gates,
made by trellis-export {manifest['versions']['trellis-export']}. Copy this whole directory to the device
(the engine is built there: engines are specific to the device's TensorRT version and GPU).

## On the device: three commands, in order

```bash
./build_engine.sh                                  # 1. build model.engine with {builder}
python3 verify_engine.py                           # 2. parity check: prints PASSED, exits 0
python3 run_stream.py --text "hello" --tokens 32   # 3. stream tokens, latency per token
```

1. `build_engine.sh` runs `{target.builder}` (set `TRTEXEC=/path/to/it` to use another) with
   every input's min / opt / max shape in two profiles: decode (1 token) and prefill (up to
   {manifest['engine']['tokens']['max']} tokens per call),
   each for batch sizes {manifest['engine']['batch']['min']}-{manifest['engine']['batch']['max']}.
   Without that binary,
   `python3 build_engine.py` does the same through the TensorRT Python API.
   TensorRT: {target.tensorrt}.
2. `verify_engine.py` streams {ref['tokens']} tokens on two rows that start at stream positions
   {' and '.join(map(str, ref['start_positions']))} (one prefill call of {ref['prefill']} tokens, then
   single-token steps) and compares with the float64 reference in `reference/`: {tol_line}
   (TRELLIS_SPEC.md section 8). It first checks every file against its sha256 in manifest.json and
   refuses a changed one. `--runtime ort` runs the same check on model.onnx with ONNX Runtime.
3. `run_stream.py`: a prompt in (one prefill call), greedy tokens out (one decode step each).

Steps 2 and 3 need Python 3 with `numpy`, `safetensors`, the TensorRT Python module (JetPack:
`sudo apt install python3-libnvinfer`) and `cuda-python`; `--runtime ort` needs `onnxruntime`
instead. No torch and no trellis-export.

## Function body or plugin

The engine of the commands above expands each `trellis::TrellisMemory` node from the standard-ops
function body model.onnx carries, so it needs nothing but TensorRT (on JetPack 6, TensorRT 10.3 has
no other way: mapping a node to a plugin by its `plugin_namespace` attribute needs TensorRT >= 10.7).
`python3 build_engine.py --plugin` builds plugin layers instead, running the Triton kernels compiled
ahead of time into `kernels/aot_records.json` ({kernels.get('note') or 'none'}): decode, the split
prefill (two workspaces, sized by the plugin and provided by TensorRT) and the one-launch prefill
fallback. Where TensorRT has the aliased plugin I/O preview feature (`ALIASED_PLUGIN_IO_10_03`),
build_engine.py turns it on so that the memories are updated in place. That plugin is
Python code of the trellis-export package, which must then be installed on the device with its
dependencies (its kernel launcher imports triton and torch); verify_engine.py and run_stream.py
register it for such an engine. The plugin path has never run on a GPU.

## What was tested, and where

`manifest.json` lists it (`tested`, `not_tested`). In short: the ONNX Runtime check and a
TensorRT-RTX build with these shapes ran on the CPU of the machine that made the bundle; nothing in
this bundle has run on the device, with {target.builder} or on any GPU before you run it there.
"""


# ------------------------------------------------------------------------------- the bundle
def file_hashes(root: Path) -> dict[str, str]:
    """sha256 of every bundle file, by the device scripts' own ``sha256`` (what verifies them)."""
    from . import device_module

    sha256 = device_module().sha256
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel not in ("manifest.json", MARKER):
            out[rel] = sha256(p)
    return out


def _write_json(path: Path, data: Any) -> None:
    write_file(path, (json.dumps(data, indent=1, sort_keys=False) + "\n").encode())


def build_bundle(source: str | os.PathLike[str] | None, out: str | os.PathLike[str], *, target: str,
                 dtype: str = "float32", batch: str = "1..2..8", tokens: str = "1..256",
                 stream_tokens: int = 2048, prefill: int | None = None, seed: int = 0,
                 check: bool = True, force: bool = False, model: Any = None,
                 echo: Any = None) -> dict[str, Any]:
    """Write the bundle of ``source`` (a checkpoint directory; None: the bundled checkpoint; or an
    in-memory ``model``) for ``target`` into the directory ``out``, atomically; returns the manifest.

    ``check``: run ``verify_engine.py --runtime ort`` on the finished bundle (and a TensorRT-RTX build
    of its ONNX with the same shapes when TensorRT-RTX is importable) and record the results in the
    manifest's ``tested`` list."""
    from trellis_export.plugins_trt.engine import EngineSettings, Range, profile_shapes

    say = echo or (lambda _msg: None)
    tgt = get_target(target)
    if dtype not in ("float32", "float16"):
        raise BundleError(f"--dtype must be float32 or float16, got {dtype!r}")
    settings = EngineSettings(batch=Range.parse(batch, "--batch"),
                              tokens=Range.parse(tokens, "--tokens", default_opt="max"))
    rows = len(ROW_OFFSETS)
    if not settings.batch.min <= rows <= settings.batch.max:
        raise BundleError(f"--batch {settings.batch}: the reference stream has {rows} rows, so the batch "
                          f"range must include {rows}")
    if isinstance(stream_tokens, bool) or not isinstance(stream_tokens, int) or stream_tokens < 2:
        raise BundleError(f"--stream-tokens must be an integer >= 2, got {stream_tokens!r}")
    profs = settings.profiles()
    lo = next((t.min for n, t in profs if n == "prefill"), 1)
    p_len = prefill if prefill is not None else max(lo, min(DEFAULT_PREFILL, settings.tokens.max))
    fits = any(t.min <= p_len <= t.max for _, t in profs)
    if not fits or p_len >= stream_tokens:
        raise BundleError(f"--prefill {p_len}: must fit a profile of --tokens {settings.tokens} and be "
                          f"shorter than --stream-tokens {stream_tokens}")
    specs = [OutputSpec(out, "-o/--output", kind="dir")]
    dest = claim_outputs(specs, [source], force=force)[0]

    from trellis_export.checkpoint import load_checkpoint
    from trellis_export.export.onnx_export import export_model_proto, save_model_atomic, wants_external_data

    if model is None:
        say(f"loading      {source or 'the bundled checkpoint'}")
        model = load_checkpoint(source)
    config = model.config
    with temporary_sibling(dest, directory=True) as tmp:
        say(f"exporting    {ONNX_FILE} ({dtype})")
        proto = export_model_proto(model, dtype=dtype)
        meta = {p.key: p.value for p in proto.metadata_props}
        fingerprint = meta["trellis.fingerprint"]
        save_model_atomic(proto, tmp / ONNX_FILE, external_data=wants_external_data(model, dtype))
        profiles = profile_shapes(config, settings)
        say(f"writing      {SCRIPT}, device scripts")
        write_file(tmp / SCRIPT, build_script(tgt, profiles, fingerprint).encode())
        os.chmod(tmp / SCRIPT, 0o755)
        for name in DEVICE_FILES:
            shutil.copyfile(DEVICE_DIR / name, tmp / name)
            if name != "trellis_bundle.py":
                os.chmod(tmp / name, 0o755)
        say(f"compiling    AOT kernels for sm_{', sm_'.join(map(str, tgt.kernel_ccs))}")
        (tmp / "kernels").mkdir()
        kernels = compile_kernels(config, tgt, dtype, tmp / KERNELS_FILE)
        say(f"reference    {stream_tokens} tokens x {rows} rows, float64")
        from safetensors.numpy import save_file

        arrays, ref_info = make_reference(model, tokens=stream_tokens, prefill=p_len, seed=seed,
                                          activation_dtype=dtype)
        (tmp / "reference").mkdir()
        save_file(arrays, str(tmp / REFERENCE_FILE), metadata={"format": "trellis-bundle-reference",
                                                               "fingerprint": fingerprint})
        os.chmod(tmp / REFERENCE_FILE, 0o666 & ~current_umask())
        manifest: dict[str, Any] = {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "target": {"name": tgt.name, "description": tgt.description, "runtime": tgt.runtime,
                       "builder": tgt.builder, "tensorrt": tgt.tensorrt,
                       "tensorrt_rtx_compute_capabilities": list(tgt.rtx_ccs),
                       "kernel_compute_capabilities": list(tgt.kernel_ccs)},
            "model": {"fingerprint": fingerprint, "config": config.to_dict(), "activation_dtype": dtype,
                      "source": str(source) if source is not None else "bundled checkpoint"},
            "state_spec": json.loads(meta["trellis.state_spec"]),
            "onnx": {"file": ONNX_FILE, "form": "one trellis::TrellisMemory node per layer with "
                     "plugin_namespace / plugin_version attributes, plus the portable standard-ops function "
                     "body (no run-time If) that TensorRT without the plugin expands",
                     "inputs": [n for n, _ in _inputs(config)], "opset": int(meta["trellis.opset"])},
            "engine": {"file": ENGINE_FILE, "strongly_typed": True, "batch": asdict(settings.batch),
                       "tokens": asdict(settings.tokens), "profiles": profiles},
            "kernels": kernels,
            "reference": ref_info,
            "tolerances": {"rule": "TRELLIS_SPEC.md section 8: relative RMS per tensor per check",
                           "short_stream": SHORT_STREAM, "float32_short": TOL_SHORT, "float32_long": TOL_LONG,
                           "float16_logits": TOL_FLOAT16},
            "plugin": {"default": "function body (needs TensorRT only)",
                       "optional": "build_engine.py --plugin: needs the trellis-export package on the device "
                                   "(its plugin imports triton at launch); kernels from "
                                   "kernels/aot_records.json"},
            "versions": versions(),
            "made_on": f"{platform.system()} {platform.machine()}, CPU only (no GPU)",
            "files": {},
            "tested": [{"check": f"AOT compilation of the plugin kernels for sm_"
                                 f"{', sm_'.join(map(str, tgt.kernel_ccs))} ({kernels['records']} records)",
                        "where": "the machine that made the bundle (CPU, triton "
                                 f"{versions().get('triton')})", "result": "compiled"}],
            "not_tested": [
                f"{tgt.builder} with {SCRIPT} (no trtexec where the bundle was made)",
                f"enterprise TensorRT ({tgt.tensorrt})" if tgt.runtime == "tensorrt" else
                "the tensorrt_rtx command-line builder",
                "running any engine of this model: no GPU where the bundle was made",
                f"the on-device check on a {tgt.name} device (verify_engine.py with TensorRT)",
                "loading the AOT kernels on a GPU, and the plugin path (build_engine.py --plugin)"],
        }
        manifest["files"] = file_hashes(tmp)
        write_file(tmp / "README.md", readme(tgt, manifest).encode())
        manifest["files"] = file_hashes(tmp)
        _write_json(tmp / "manifest.json", manifest)
        if check:
            manifest["tested"].extend(run_checks(tmp, manifest, say))
        else:
            manifest["not_tested"].append("verify_engine.py --runtime ort and the TensorRT-RTX build of "
                                          "model.onnx: skipped where the bundle was made (--no-check)")
        _write_json(tmp / "manifest.json", manifest)
        (tmp / MARKER).write_text("This directory was written by trellis-export bundle; it may be replaced "
                                  "by the next run that writes here.\n")
        replace_dir(tmp, dest)
    return manifest


def _inputs(config: Any) -> list[tuple[str, list[int]]]:
    from trellis_export.plugins_trt.engine import input_dims

    return input_dims(config)


def run_checks(bundle: Path, manifest: dict[str, Any], say: Any) -> list[dict[str, Any]]:
    """The CPU checks of a finished bundle, as the manifest's ``tested`` entries; a failure raises."""
    where = "the machine that made the bundle (CPU)"
    out = []
    say("checking     python3 verify_engine.py --runtime ort")
    proc = subprocess.run([sys.executable, str(bundle / "verify_engine.py"), "--runtime", "ort"],
                          capture_output=True, text=True, timeout=3600)
    last = (proc.stdout.strip().splitlines() or [""])[-1]
    if proc.returncode != 0:
        err = (proc.stderr.strip().splitlines() or [last])[-1]
        raise BundleError(f"the bundle's own check failed: verify_engine.py --runtime ort: {err or last}")
    out.append({"check": "verify_engine.py --runtime ort (model.onnx on ONNX Runtime "
                         f"{_dist_version('onnxruntime')} vs the float64 reference)",
                "where": where, "result": last.split("|")[0].replace("[I]", "").strip()})
    from trellis_export.plugins_trt.runtimes import available_runtimes

    if "tensorrt-rtx" not in available_runtimes():
        out.append({"check": "TensorRT-RTX build of model.onnx with the bundle's shapes", "where": where,
                    "result": "skipped: TensorRT-RTX is not installed"})
        return out
    say("checking     TensorRT-RTX build of model.onnx (build_engine.py, CPU)")
    ccs = manifest["target"]["tensorrt_rtx_compute_capabilities"]
    with temporary_sibling(bundle / ENGINE_FILE, tag="rtx") as eng:
        proc = subprocess.run([sys.executable, str(bundle / "build_engine.py"), "--runtime", "tensorrt-rtx",
                               "-o", str(eng)] + ([] if ccs else ["--compute-capability", "8.6"]),
                              capture_output=True, text=True, timeout=3600)
        eng.with_name(eng.name + ".json").unlink(missing_ok=True)
    if proc.returncode != 0:
        err = (proc.stderr.strip().splitlines() or ["no message"])[-1]
        raise BundleError(f"the bundle's own check failed: build_engine.py --runtime tensorrt-rtx: {err}")
    out.append({"check": "build_engine.py --runtime tensorrt-rtx: model.onnx parsed and built with the "
                         f"bundle's profiles ({'compute capability 8.6' if not ccs else ', '.join(ccs)}; "
                         "function body); the engine was not run and is not in the bundle",
                "where": where + f", TensorRT-RTX {_dist_version('tensorrt-rtx-cu12-bindings')}",
                "result": "built"})
    return out
