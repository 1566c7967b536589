#!/usr/bin/env python3
"""Build the bundle's TensorRT engine on this device through the TensorRT Python API (what
build_engine.sh does with trtexec): the same profiles and shapes, from manifest.json.

    python3 build_engine.py                # function body: needs only the TensorRT Python module
    python3 build_engine.py --plugin       # trellis::TrellisMemory plugin layers (see README.md)

With --plugin the layers carry the bundle's AOT records (kernels/aot_records.json: decode, the split
prefill and the one-launch prefill fallback) and, where this TensorRT has the aliased plugin I/O
preview feature (ALIASED_PLUGIN_IO_10_03), it is turned on as trellis-export engine does, so the
memory outputs alias their inputs and decode runs in place (model.engine.json says what was built).

The network is strongly typed: model.onnx's types decide the precision (a float16 bundle has float16
activations and float32 memories and gates). Writes model.engine and model.engine.json (the model's
fingerprint and the profiles, read by verify_engine.py and run_stream.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from trellis_bundle import BundleError, fail, import_tensorrt, open_bundle  # noqa: E402


def plugin_creator(trt: Any, bundle: Path, manifest: dict, used: list[int]) -> Any:
    """Register the plugin with the bundle's AOT kernels (no compiler needed on the device)."""
    try:
        from trellis_export.plugins_trt import plugin_v3
    except ImportError as exc:
        raise BundleError(f"--plugin needs the trellis-export package on this device ({exc}); without "
                          "--plugin the engine uses the function body and needs nothing else") from None
    kernels = manifest.get("kernels") or {}
    if not kernels.get("file"):
        raise BundleError(f"this bundle has no AOT kernels for its target ({kernels.get('note', '')})")
    records = json.loads((bundle / kernels["file"]).read_text())

    def bundled_records(attrs: dict, *, heads: int, slots: int, head_dim: int, dtype: str,
                        targets: object) -> list:
        mine = [r for r in records if r["dtype"] == dtype and r["constexprs"]["H"] == heads
                and r["constexprs"]["M"] == slots and r["constexprs"]["D"] == head_dim]
        if not mine:
            raise BundleError(f"no bundled kernels for heads={heads} slots={slots} head_dim={head_dim} "
                              f"{dtype}")
        used.append(len(mine))
        return mine

    plugin_v3.compile_records = bundled_records          # the records come from the bundle
    creator = plugin_v3.register(trt, targets=[int(c) for c in kernels["compute_capabilities"]])
    getattr(creator, "build_state", {}).clear()          # this build's settings and callback log
    if hasattr(plugin_v3, "shape_key"):                  # plugins that look records up before the build
        shapes = {(r["constexprs"]["H"], r["constexprs"]["M"], r["constexprs"]["D"], r["dtype"])
                  for r in records}
        for h, m, d, dt in sorted(shapes):
            key = plugin_v3.shape_key(heads=h, slots=m, head_dim=d, dtype=dt)
            creator.compiled[key] = bundled_records({}, heads=h, slots=m, head_dim=d, dtype=dt, targets=())
    if "rtx" in trt.__name__:     # TensorRT-RTX 1.7.1's parser dlopens an unversioned library name
        from trellis_export.plugins_trt.runtimes import ensure_rtx_library_link

        ensure_rtx_library_link(quiet=True)
    return creator


def enable_aliasing(trt: Any, config: Any, creator: Any) -> str | None:
    """In-place state, as ``trellis-export engine`` builds it (plugins_trt/engine.py): turn on
    TensorRT's preview feature for aliased plugin I/O when this TensorRT has it (TensorRT-RTX 1.7,
    enterprise TensorRT >= 10.3: ``trt.PreviewFeature.ALIASED_PLUGIN_IO_10_03``) and the installed
    plugin can alias (``IPluginV3OneBuildV2``), and tell the plugin so: it then declares each memory
    output aliased to its input (none at chunk_size 1) and decode runs the in-place record. Returns
    the feature's name, or None where it is not available (the engine gets the general decode
    record)."""
    from trellis_export.plugins_trt import plugin_v3

    name = getattr(plugin_v3, "ALIAS_PREVIEW_FEATURE", None)      # None: a plugin without aliasing
    feature = getattr(getattr(trt, "PreviewFeature", None), name, None) if name else None
    state = getattr(creator, "build_state", None)
    if feature is None or state is None or not hasattr(trt, "IPluginV3OneBuildV2"):
        return None
    config.set_preview_feature(feature, True)
    state["alias_io"] = True
    return str(name)


def plugin_report(creator: Any, aliasing: str | None) -> dict:
    """What the plugin layers were built with, from the plugin's own build log (the fields
    ``trellis-export engine`` reports): the kernels a prefill call launches, the workspace TensorRT
    was asked for per profile, the outputs declared aliased to inputs and so the decode record."""
    from trellis_export.plugins_trt import plugin_v3

    from trellis_export.opdef import INPUTS, OUTPUTS

    state = getattr(creator, "build_state", None) or {}
    recs = [r for key, rs in creator.compiled.items() if key != "missing" for r in rs]
    asked = state.get("workspace") or []
    aliased = {OUTPUTS[o]: INPUTS[i] for o, i in sorted(set(state.get("aliased") or [])) if i >= 0}
    prefill = getattr(plugin_v3, "prefill_kernels", None)
    return {"aliasing_preview_feature": aliasing,
            "prefill_kernels": prefill(recs) if prefill is not None else ["chunk"],
            "workspace_requests": [dict(t) for t in sorted({tuple(sorted(w.items())) for w in asked})],
            "aliased_outputs": aliased,
            "decode_record": "decode_in_place"
            if aliased and len(aliased) == len(getattr(plugin_v3, "ALIASED_OUTPUTS", ())) else "decode"}


def build(bundle: Path, manifest: dict, output: Path, plugin: bool, runtime: str | None,
          rtx_ccs: list[str] | None = None, verbose: bool = False) -> dict:
    trt = import_tensorrt(runtime or manifest["target"]["runtime"], strict=runtime is not None)
    version = getattr(trt, "__version__", "?")
    rtx = "rtx" in trt.__name__
    logger = trt.Logger(trt.Logger.WARNING if verbose else trt.Logger.ERROR)
    builder = trt.Builder(logger)
    used: list[int] = []
    creator = plugin_creator(trt, bundle, manifest, used) if plugin else None
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    onnx_path = bundle / manifest["onnx"]["file"]
    if not parser.parse(onnx_path.read_bytes()):
        err = parser.get_error(0) if parser.num_errors else None
        where = f"node {err.node_name()!r}: {err.desc()}" if err is not None else "no message"
        raise BundleError(f"{onnx_path}: TensorRT {version} cannot parse it ({where})")
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    n_plugin = sum(1 for la in layers if la.type == trt.LayerType.PLUGIN_V3)
    if plugin and n_plugin == 0:
        print(f"[W] TensorRT {version} did not map trellis::TrellisMemory to the plugin (it needs TensorRT "
              ">= 10.7 for plugin_namespace); the engine uses the function body", file=sys.stderr)
    config = builder.create_builder_config()
    if rtx:
        names = rtx_ccs or manifest["target"]["tensorrt_rtx_compute_capabilities"]
        if not names:
            raise BundleError(f"TensorRT-RTX needs --compute-capability for a {manifest['target']['name']} "
                              "bundle (its GPUs are not TensorRT-RTX targets)")
        try:
            ccs = [getattr(trt.ComputeCapability, "SM" + c.replace(".", "")) for c in names]
        except AttributeError:
            raise BundleError(f"--compute-capability {','.join(names)}: not a TensorRT-RTX target") from None
        config.num_compute_capabilities = len(ccs)
        for i, cc in enumerate(ccs):
            config.set_compute_capability(cc, i)
    aliasing = enable_aliasing(trt, config, creator) if creator is not None else None
    for prof in manifest["engine"]["profiles"]:
        op = builder.create_optimization_profile()
        for name, (mn, opt, mx) in prof["shapes"].items():
            op.set_shape(name, mn, opt, mx)
        config.add_optimization_profile(op)
    t0 = time.perf_counter()
    blob = builder.build_serialized_network(network, config)
    if blob is None:
        raise BundleError(f"TensorRT {version} failed to build the engine (see its log above)")
    seconds = time.perf_counter() - t0
    missing = creator.compiled.get("missing") if creator is not None else None
    if missing:
        raise BundleError(f"the bundle's kernels do not cover the plugin layers' shapes {missing}")
    plugin_info = plugin_report(creator, aliasing) if creator is not None and n_plugin else {}
    tmp = output.with_name(output.name + ".tmp")
    tmp.write_bytes(bytes(blob))
    tmp.replace(output)
    info = {"fingerprint": manifest["model"]["fingerprint"], "runtime": trt.__name__, "version": version,
            "plugin": bool(n_plugin), "plugin_layers": n_plugin, "kernel_records": sum(used),
            "layers": len(layers),
            "profiles": manifest["engine"]["profiles"], "build_seconds": round(seconds, 3),
            "bytes": output.stat().st_size, **plugin_info}
    output.with_name(output.name + ".json").write_text(json.dumps(info, indent=1) + "\n")
    return info


def main(argv: list[str] | None = None) -> int:
    here = Path(__file__).resolve().parent
    p = argparse.ArgumentParser(description="Build the bundle's engine with the TensorRT Python API.")
    p.add_argument("--bundle", type=Path, default=here)
    p.add_argument("-o", "--output", type=Path, help="engine file [default: the bundle's model.engine]")
    p.add_argument("--plugin", action="store_true", help="plugin layers (needs trellis-export; README.md)")
    p.add_argument("--runtime", choices=("tensorrt", "tensorrt-rtx"), default=None)
    p.add_argument("--compute-capability", help="TensorRT-RTX only: targets such as 8.6,12.0")
    p.add_argument("--verbose", action="store_true", help="show TensorRT's warnings (many, harmless)")
    args = p.parse_args(argv)
    try:
        manifest = open_bundle(args.bundle)
        out = args.output or args.bundle / manifest["engine"]["file"]
        ccs = [c.strip() for c in args.compute_capability.split(",")] if args.compute_capability else None
        info = build(args.bundle, manifest, out, args.plugin, args.runtime, ccs, args.verbose)
    except BundleError as exc:
        fail(str(exc))
    print(f"wrote {out} ({info['bytes']:,} bytes, {info['runtime']} {info['version']}, "
          f"{'plugin' if info['plugin'] else 'function body'}, {info['build_seconds']:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
