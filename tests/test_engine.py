"""TensorRT engines built on this CPU with TensorRT-RTX (``pip install -e ".[tensorrt-rtx]"``, which CI
installs), through ``trellis-export engine``: the bundled checkpoint with and without the plugin, and
an odd config (C = 1, phi = l2_silu, m = 7, d = 5, H = 3) both ways. Each build's report is checked
against what the network must hold; the engines are never *run* here (that needs a GPU and driver).

Canaries for TensorRT-RTX 1.7.1's known bugs run in subprocesses (two of them crash or abort the
process); each fails when a release fixes its bug, so that the workaround can go.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from conftest import tiny_config, tiny_model
from trellis_export.cli.main import main
from trellis_export.plugins_trt.engine import (
    EngineError,
    EngineSettings,
    Range,
    read_sidecar,
    sidecar_path,
)
from trellis_export.plugins_trt.plugin_v3 import (
    PLUGIN_KERNELS,
    SPLIT_PREFILL,
    decode_fields,
    io_dtype_rule,
    records_for_device,
)

from trellis_export.checkpoint import default_checkpoint_path, read_checkpoint, save_checkpoint
from trellis_export.config import TrellisConfig
from trellis_export.export.onnx_export import export_onnx, tensorrt_view
from trellis_export.opdef import INPUTS, OUTPUTS
from trellis_export.state import state_spec

HAVE_RTX = any(importlib.util.find_spec(m) is not None for m in ("tensorrt_rtx_bindings", "tensorrt_rtx"))
_skip = pytest.mark.skipif(not HAVE_RTX,
                           reason='TensorRT-RTX is not installed (pip install -e ".[tensorrt-rtx]")')


def rtx(fn):  # type: ignore[no-untyped-def]
    """Needs TensorRT-RTX: marked ``tensorrt_rtx`` and skipped (with the install line) without it."""
    return pytest.mark.tensorrt_rtx(_skip(fn))
TARGET = "8.6"          # one target keeps the builds short; the default set is tested in test_default_targets
ODD = tiny_config(n_layers=1, chunk_size=1, phi="l2_silu", f="ln_silu", rho="identity")   # H 3, d 5, m 7
#: phi = identity with m = 19: the plugin's records carry the state pass's m-axis split (two 16-slot
#: programs per row, head and pass)
IDENT = tiny_config(n_layers=1, chunk_size=3, phi="identity", f="ln_silu", rho="identity", n_slots=19)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def engine_cli(*args: str) -> tuple[int, str, str]:
    res = CliRunner().invoke(main, ["engine", *args])
    return res.exit_code, res.stdout, res.stderr


# ------------------------------------------------------------------------------------------ pure parts
def test_range_parse() -> None:
    assert Range.parse("4", "--batch") == Range(4, 4, 4)
    assert Range.parse("1..8", "--batch") == Range(1, 1, 8)
    assert Range.parse("1..8", "--tokens", default_opt="max") == Range(1, 8, 8)
    assert Range.parse("1..3..8", "--batch") == Range(1, 3, 8)
    for bad in ("8..1", "0..4", "a..b", "1..2..3..4", "3..1..8"):
        with pytest.raises(EngineError, match="--batch"):
            Range.parse(bad, "--batch")


def test_profiles_from_settings() -> None:
    s = EngineSettings(tokens=Range(1, 64, 256))
    assert s.profiles() == [("decode", Range(1, 1, 1)), ("prefill", Range(2, 64, 256))]
    assert EngineSettings(tokens=Range(1, 1, 1)).profiles() == [("decode", Range(1, 1, 1))]
    assert EngineSettings(tokens=Range(16, 64, 256), decode_profile=False).profiles() == \
        [("prefill", Range(16, 64, 256))]


def test_plugin_dtype_rules_follow_the_op() -> None:
    """Spec section 1: activations (q, k, v, a in; o out) take q's dtype; gates and memories float32;
    position int64 -- at every I/O position of the plugin, inputs then outputs."""
    names = [*INPUTS, *(f"out_{n}" for n in OUTPUTS)]
    got = {n: io_dtype_rule(p, "float16") for p, n in enumerate(names)}
    assert {n for n, v in got.items() if v == "float16"} == {"q", "k", "v", "a", "out_o"}
    assert {n for n, v in got.items() if v == "int64"} == {"position"}
    assert {n for n, v in got.items() if v == "float32"} == {
        "beta", "gamma", "key_memory", "value_memory", "key_snapshot", "value_snapshot",
        "out_key_memory", "out_value_memory", "out_key_snapshot", "out_value_snapshot"}
    assert {io_dtype_rule(p, "float32") for p, n in enumerate(names) if n != "position"} == {"float32"}


def test_plugin_fields_decode_as_the_parser_hands_them() -> None:
    fields = {"chunk_size": np.array([4], np.int32), "phi": np.frombuffer(b"ln_silu\0", np.int8),
              "f": np.frombuffer(b"l2_silu", np.int8), "rho": np.frombuffer(b"identity\0", np.int8),
              "eps": np.array([1e-5], np.float32)}
    got = decode_fields(fields)
    assert got["chunk_size"] == 4 and got["phi"] == "ln_silu" and got["f"] == "l2_silu"
    assert got["rho"] == "identity" and abs(got["eps"] - 1e-5) < 1e-12
    del fields["eps"]
    with pytest.raises(ValueError, match="missing field"):
        decode_fields(fields)


def test_records_for_device_picks_exact_then_lower_target() -> None:
    recs = [{"kernel": k, "cc": cc, "variant": v} for cc in (80, 86) for k in ("chunk", "fused_recurrent")
            for v in ("aligned", "unaligned")]
    assert {r["cc"] for r in records_for_device(recs, 86, "chunk")} == {86}
    assert {r["cc"] for r in records_for_device(recs, 89, "chunk")} == {86}
    assert [r["variant"] for r in records_for_device(recs, 80, "fused_recurrent")] == ["aligned", "unaligned"]
    with pytest.raises(ValueError, match="sm_75"):
        records_for_device(recs, 75, "chunk")


def test_read_sidecar_refuses_bad_sidecars(tmp_path: Path) -> None:
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"not an engine")
    with pytest.raises(EngineError, match="sidecar is missing"):
        read_sidecar(engine)
    cfg = tiny_config()
    good = {"format": "trellis-engine", "fingerprint": "f" * 64, "config": cfg.to_dict(),
            "state_spec": {"tensors": [t.to_dict() for t in state_spec(cfg)]}, "profiles": []}
    sidecar_path(engine).write_text(json.dumps(good))
    assert read_sidecar(engine)["fingerprint"] == "f" * 64
    for broken, needle in ((dict(good, format="x"), "not a trellis engine sidecar"),
                           ({k: v for k, v in good.items() if k != "fingerprint"}, "lacks 'fingerprint'"),
                           (dict(good, state_spec={"tensors": good["state_spec"]["tensors"][:-1]}),
                            "does not match")):
        sidecar_path(engine).write_text(json.dumps(broken))
        with pytest.raises(EngineError, match=needle):
            read_sidecar(engine)
    sidecar_path(engine).write_text("{not json")
    with pytest.raises(EngineError, match="not a readable engine sidecar"):
        read_sidecar(engine)


# ------------------------------------------------------------------------------------------ builds
class Built:
    def __init__(self, root: Path, name: str, args: list[str]) -> None:
        self.engine = root / f"{name}.engine"
        self.json = root / f"{name}.json"
        self.code, self.out, self.err = engine_cli(*args, "-o", str(self.engine), "--json", str(self.json))
        assert self.code == 0, self.err + self.out
        self.report = json.loads(self.json.read_text())
        self.sidecar = read_sidecar(self.engine)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Built]:
    if not HAVE_RTX:
        pytest.skip("TensorRT-RTX is not installed")
    root = tmp_path_factory.mktemp("engines")
    odd_ckpt = root / "odd"
    save_checkpoint(tiny_model(ODD, seed=5, dtype=torch.float32), odd_ckpt)
    odd_onnx = export_onnx(read_model(odd_ckpt), root / "odd.onnx")
    ident_ckpt = root / "ident"
    save_checkpoint(tiny_model(IDENT, seed=6, dtype=torch.float32), ident_ckpt)
    common = ["--compute-capability", TARGET]
    return {
        "bundled": Built(root, "bundled", common),
        "bundled_plugin": Built(root, "bundled_plugin", ["--plugin", *common, "--batch", "1..2..4",
                                                         "--tokens", "1..32..64"]),
        "odd": Built(root, "odd", [str(odd_onnx), *common]),
        "odd_plugin": Built(root, "odd_plugin", [str(odd_ckpt), "--plugin", *common, "--no-decode-profile",
                                                 "--tokens", "3..17..40"]),
        "ident_plugin": Built(root, "ident_plugin", [str(ident_ckpt), "--plugin", *common,
                                                     "--batch", "1..2..4", "--tokens", "1..8..16"]),
    }


def read_model(path: Path) -> object:
    from trellis_export.checkpoint import load_checkpoint

    return load_checkpoint(path)


def _layers(report: dict) -> dict[str, int]:
    return report["layers_by_type"]


@rtx
@pytest.mark.parametrize("key", ["bundled", "bundled_plugin", "odd", "odd_plugin", "ident_plugin"])
def test_engine_report_matches_the_network(built: dict[str, Built], key: str) -> None:
    b = built[key]
    rep = b.report
    plugin = key.endswith("plugin")
    cfg = TrellisConfig.from_dict(rep["config"])
    assert rep["runtime"] == "tensorrt-rtx" and rep["runtime_version"].startswith("1.")
    assert rep["plugin"] is plugin and rep["targets"] == [TARGET]
    assert rep["engine_bytes"] == b.engine.stat().st_size > 0
    assert len(rep["memory_nodes"]) == cfg.n_layers
    if plugin:
        assert _layers(rep).get("PLUGIN_V3") == cfg.n_layers
        assert all(n["became"] == "plugin layer" for n in rep["memory_nodes"])
        assert not {"TRIP_LIMIT", "RECURRENCE", "LOOP_OUTPUT"} & set(_layers(rep))
        (k,) = rep["plugin_kernels"]
        assert k["shape"] == {"heads": cfg.n_heads, "slots": cfg.n_slots, "head_dim": cfg.head_dim,
                              "dtype": "float32"}
        assert k["targets"] == ["sm_86"]
        assert {v.split(":")[0] for v in k["variants"]} == set(PLUGIN_KERNELS)
        # the state pass's m-axis split travels in the engine exactly when the model allows it
        assert ("chunk_state:m_split" in k["variants"]) == (cfg.phi == "identity" and cfg.n_slots > 16)
        assert k["decode_kernel"] == "fused_recurrent" and k["prefill_kernels"] == list(SPLIT_PREFILL)
        data = b.engine.read_bytes()
        assert data.count(b".target sm_86") >= k["records"], "the AOT kernels travel inside the engine"
        for kernel in PLUGIN_KERNELS:
            assert f'"kernel": "{kernel}"'.encode() in data, kernel
        assert "prefill chunk_state + chunk_readout" in b.out
        # TensorRT asked the plugin which outputs alias inputs and was told the four memories (the
        # aliased-plugin-I/O preview feature is on): decode then launches the in-place record
        # (at C = 1 the snapshot inputs are the memory tensors: nothing is aliased)
        mem = [n for n in OUTPUTS if n in INPUTS and cfg.chunk_size > 1]
        assert k["aliased_outputs"] == {n: n for n in mem}
        assert k["decode_record"] == ("decode_in_place" if cfg.chunk_size > 1 else "decode")
    else:
        assert "PLUGIN_V3" not in _layers(rep)
        assert all(n["became"].startswith("function body") for n in rep["memory_nodes"])
        assert {"TRIP_LIMIT", "RECURRENCE", "LOOP_OUTPUT"} <= set(_layers(rep)), "the body's Loop"
        assert not {"CONDITION", "CONDITIONAL_INPUT", "CONDITIONAL_OUTPUT"} & set(_layers(rep)), \
            "the portable body has no run-time If"
    # every summary line the CLI printed agrees with the report
    assert f"{rep['layers']} (" in b.out and f"{rep['engine_bytes']:,} bytes" in b.out


@rtx
@pytest.mark.parametrize("key", ["bundled_plugin", "odd_plugin", "ident_plugin"])
def test_plugin_workspace_is_the_split_prefills_at_profile_max(built: dict[str, Built], key: str) -> None:
    """What the plugin's get_workspace_size told TensorRT during the build (logged by the callback):
    per profile, the split prefill's two workspaces at its max batch and tokens (none for decode)."""
    from trellis_export.plugins_trt.plugin_v3 import compile_records, workspace_size

    from trellis_export.opdef import ATTRIBUTES, op_attributes

    rep = built[key].report
    cfg = TrellisConfig.from_dict(rep["config"])
    attrs = {k: v for k, v in op_attributes(cfg).items() if k in ATTRIBUTES}
    recs = compile_records(attrs, heads=cfg.n_heads, slots=cfg.n_slots, head_dim=cfg.head_dim,
                           dtype="float32", targets=[86])       # the build's records (cached)
    (k,) = rep["plugin_kernels"]
    want = []
    for p in rep["profiles"]:
        B, T = p["input_ids"][2]
        want.append({"B": B, "T": T, "bytes": workspace_size(recs, B, T)})
    assert sorted(k["workspace_requests"], key=lambda w: w["T"]) == sorted(want, key=lambda w: w["T"])
    assert all((w["bytes"] > 0) == (w["T"] > 1) for w in want)


@rtx
def test_engine_profiles_follow_the_flags(built: dict[str, Built]) -> None:
    p = built["bundled_plugin"].report["profiles"]
    assert [x["name"] for x in p] == ["decode", "prefill"]
    assert p[0]["input_ids"] == [[1, 1], [2, 1], [4, 1]]
    assert p[1]["input_ids"] == [[1, 2], [2, 32], [4, 64]]
    q = built["odd_plugin"].report["profiles"]
    assert [x["name"] for x in q] == ["prefill"] and q[0]["input_ids"] == [[1, 3], [1, 17], [8, 40]]


@rtx
@pytest.mark.parametrize("key", ["bundled", "odd_plugin"])
def test_engine_sidecar_carries_the_models_identity(built: dict[str, Built], key: str) -> None:
    b = built[key]
    ckpt = default_checkpoint_path() if key == "bundled" else b.engine.parent / "odd"
    cfg, _, meta = read_checkpoint(ckpt)
    side = b.sidecar
    assert side["fingerprint"] == meta["fingerprint"]
    assert side["config"] == cfg.to_dict()
    assert side["state_spec"]["tensors"] == [t.to_dict() for t in state_spec(cfg)]
    assert side["plugin"] is key.endswith("plugin") and side["profiles"] == b.report["profiles"]


@rtx
def test_float16_engine(tmp_path: Path) -> None:
    out = tmp_path / "f16.engine"
    code, stdout, err = engine_cli("--dtype", "float16", "--compute-capability", TARGET, "--tokens", "1..16",
                                   "-o", str(out))
    assert code == 0, err
    side = read_sidecar(out)
    assert side["activation_dtype"] == "float16"
    assert "float16 activations, float32 memories and gates" in stdout


@rtx
def test_default_targets_and_plugin_build_of_the_bundled_model(tmp_path: Path) -> None:
    """No --compute-capability: the four default TensorRT-RTX targets, kernels compiled for each."""
    out = tmp_path / "all.engine"
    code, stdout, err = engine_cli("--plugin", "--tokens", "1..8", "--batch", "1..2", "-o", str(out),
                                   "--json", str(tmp_path / "r.json"))
    assert code == 0, err
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["targets"] == ["8.0", "8.6", "8.9", "12.0"]
    assert rep["plugin_kernels"][0]["targets"] == ["sm_120", "sm_80", "sm_86", "sm_89"]


@rtx
def test_verify_and_sessions_take_an_engine(built: dict[str, Built]) -> None:
    """``verify`` and ``open_session("trt")`` accept the engine; without a GPU they say so in one line
    (with a GPU, bench/gpu_suite.py streams it against the float64 reference)."""
    from trellis_export.kernels.cuda_launch import CudaDriver

    try:
        CudaDriver()
        pytest.skip("a CUDA driver is present: the GPU suite covers this path")
    except Exception:
        pass
    res = CliRunner().invoke(main, ["verify", str(built["bundled"].engine), "--tokens", "16"])
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert res.exit_code == 1 and len(errors) == 1
    assert str(built["bundled"].engine) in errors[0] and "CUDA GPU" in errors[0]


def test_plugin_kernels_compile_under_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    """With TRITON_INTERPRET set (as the kernel tests set it), kernels cannot be compiled in-process:
    compile_records does it in a child process, and the records are real PTX for the target."""
    from trellis_export.plugins_trt.plugin_v3 import compile_records

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    attrs = {"chunk_size": 3, "phi": "l2_silu", "f": "identity", "rho": "ln_silu", "eps": 1e-5}
    recs = compile_records(attrs, heads=3, slots=7, head_dim=5, dtype="float32", targets=[89])
    assert {r["kernel"] for r in recs} == set(PLUGIN_KERNELS)
    assert all(r["target"] == "sm_89" and f".entry {r['name']}" in r["ptx"] for r in recs)


# ------------------------------------------------------------------------------------------ errors
@rtx
@pytest.mark.parametrize("args,needle", [
    (["--compute-capability", "9.0"], "--compute-capability '9.0' is not a TensorRT-RTX target"),
    (["--compute-capability", "x86"], "--compute-capability expects"),
    (["--batch", "8..1"], "--batch expects 1 <= MIN"),
    (["--tokens", "0..4"], "--tokens expects 1 <= MIN"),
])
def test_engine_bad_flags_one_line_nothing_written(tmp_path: Path, args: list[str], needle: str) -> None:
    out = tmp_path / "x.engine"
    code, stdout, err = engine_cli(*args, "-o", str(out))
    assert code == 1
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("note:")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@rtx
def test_engine_refuses_its_input_as_output(tmp_path: Path) -> None:
    model = tiny_model(ODD, seed=1, dtype=torch.float32)
    path = export_onnx(model, tmp_path / "m.onnx")
    before = sha(path)
    code, _, err = engine_cli(str(path), "-o", str(path))
    assert code == 1 and "also an input" in err and sha(path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


@rtx
def test_engine_parse_failure_names_the_node(tmp_path: Path) -> None:
    """An ONNX file without the function body (the --tensorrt-view) built without the plugin: the
    parser has no importer for the node; the error names it."""
    model = tiny_model(ODD, seed=1, dtype=torch.float32)
    path = export_onnx(model, tmp_path / "m.onnx")
    view = tensorrt_view(onnx.load(str(path)))
    onnx.save(view, str(tmp_path / "view.onnx"))
    code, _, err = engine_cli(str(tmp_path / "view.onnx"), "--compute-capability", TARGET,
                              "-o", str(tmp_path / "v.engine"))
    assert code == 1
    line = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(line) == 1 and "cannot parse node 'node_memory__" in line[0] and "TrellisMemory" in line[0]
    assert not (tmp_path / "v.engine").exists()


def test_engine_refuses_a_foreign_onnx(tmp_path: Path) -> None:
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(g), str(tmp_path / "relu.onnx"))
    code, _, err = engine_cli(str(tmp_path / "relu.onnx"), "-o", str(tmp_path / "r.engine"))
    assert code == 1 and "no Trellis metadata" in err
    assert not (tmp_path / "r.engine").exists()


# ------------------------------------------------------------------------------------------ canaries
CANARY = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    import onnx
    from onnx import TensorProto as TP, helper
    from trellis_export.plugins_trt.runtimes import load_tensorrt
    trt = load_tensorrt("tensorrt-rtx").trt

    def build(model, shapes):
        logger = trt.Logger(trt.Logger.ERROR)
        b = trt.Builder(logger)
        net = b.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        p = trt.OnnxParser(net, logger)
        if not p.parse(model.SerializeToString()):
            return "parse failed: " + "; ".join(p.get_error(i).desc() for i in range(p.num_errors))
        cfg = b.create_builder_config()
        cfg.num_compute_capabilities = 1
        cfg.set_compute_capability(trt.ComputeCapability.SM86, 0)
        prof = b.create_optimization_profile()
        for n, (lo, opt, hi) in shapes.items():
            prof.set_shape(n, lo, opt, hi)
        cfg.add_optimization_profile(prof)
        return "built" if b.build_serialized_network(net, cfg) is not None else "build failed"

    def op_shapes(model, cfg):
        dims = {{"H": cfg.n_heads, "m": cfg.n_slots, "d": cfg.head_dim}}
        out = {{}}
        for i in model.graph.input:
            ds = [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
            conc = lambda b, t: [b if x == "B" else t if x == "T" else dims.get(x, x) for x in ds]
            out[i.name] = (conc(1, 1), conc(2, 4), conc(4, 16))
        return out
""")


def run_canary(body: str) -> subprocess.CompletedProcess[str]:
    code = CANARY.format(tests=str(Path(__file__).parent)) + textwrap.dedent(body)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)


@rtx
def test_canary_loop_with_a_pass_through_condition_does_not_parse() -> None:
    """Bug 1: a Loop with an empty cond input whose body outputs Identity(cond_in) is refused
    ("Node input was not registered"); the function body therefore outputs a literal true."""
    res = run_canary("""
        def loop(passthrough):
            cond = (helper.make_node("Identity", ["cond_in"], ["cond_out"]) if passthrough else
                    helper.make_node("Constant", [], ["cond_out"],
                                     value=helper.make_tensor("t", TP.BOOL, [], [True])))
            body = helper.make_graph(
                [helper.make_node("Add", ["x_in", "one"], ["x_out"]), cond], "body",
                [helper.make_tensor_value_info("i", TP.INT64, []),
                 helper.make_tensor_value_info("cond_in", TP.BOOL, []),
                 helper.make_tensor_value_info("x_in", TP.FLOAT, None)],
                [helper.make_tensor_value_info("cond_out", TP.BOOL, []),
                 helper.make_tensor_value_info("x_out", TP.FLOAT, None)])
            g = helper.make_graph(
                [helper.make_node("Constant", [], ["one"],
                                  value=helper.make_tensor("o", TP.FLOAT, [], [1.0])),
                 helper.make_node("Constant", [], ["n"],
                                  value=helper.make_tensor("n_t", TP.INT64, [], [3])),
                 helper.make_node("Loop", ["n", "", "x"], ["y"], body=body)], "g",
                [helper.make_tensor_value_info("x", TP.FLOAT, ["B", 4])],
                [helper.make_tensor_value_info("y", TP.FLOAT, ["B", 4])])
            return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
        sh = {"x": ([1, 4], [2, 4], [8, 4])}
        print("PASSTHROUGH", build(loop(True), sh))
        print("LITERAL", build(loop(False), sh))
    """)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "LITERAL built" in res.stdout
    assert "PASSTHROUGH parse failed" in res.stdout and "not registered" in res.stdout, \
        "TensorRT-RTX now parses a pass-through Loop condition: the literal-true workaround may go"


@rtx
def test_canary_loop_inside_a_runtime_if_fails_to_build() -> None:
    """Bug 2: the builder asserts (makeScopeNodesContiguous) on a Loop nested in a run-time If that
    reads outer tensors: the 'ort' body flavour (If(T == 1)) fails, the portable one builds."""
    res = run_canary("""
        from conftest import tiny_config
        from trellis_export.export.function_body import memory_node_model
        cfg = tiny_config(chunk_size=3)
        for flavour in ("portable", "ort"):
            m = memory_node_model(cfg, flavour=flavour)
            print(flavour.upper(), build(m, op_shapes(m, cfg)))
    """)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "PORTABLE built" in res.stdout
    assert "ORT build failed" in res.stdout, \
        "TensorRT-RTX now builds a Loop inside a run-time If: a decode branch could live in the portable body"


@rtx
def test_canary_reshape_allowzero_crashes_the_builder() -> None:
    """Bug 3: Reshape with allowzero = 1 in the body makes the builder segfault; the body keeps 0."""
    res = run_canary("""
        from conftest import tiny_config
        from trellis_export.export.function_body import memory_node_model
        cfg = tiny_config(chunk_size=3)
        m = memory_node_model(cfg)
        def walk(nodes):
            for node in nodes:
                if node.op_type == "Reshape":
                    node.attribute.append(helper.make_attribute("allowzero", 1))
                for a in node.attribute:
                    if a.type == onnx.AttributeProto.GRAPH:
                        walk(a.g.node)
        for fn in m.functions:
            walk(fn.node)
        print("ALLOWZERO", build(m, op_shapes(m, cfg)), flush=True)
    """)
    assert res.returncode != 0 and "ALLOWZERO" not in res.stdout, \
        "TensorRT-RTX no longer crashes on Reshape allowzero=1 (the body could set it: fewer warnings)"


@rtx
def test_canary_wheel_lacks_the_unversioned_library() -> None:
    """Bug 4: the libs wheel ships libtensorrt_rtx.so.1 only, and the parser dlopens the unversioned
    name on a plugin node (the process aborts). ``load_tensorrt`` adds the link; this notices a fix."""
    from trellis_export.plugins_trt.runtimes import (
        RTX_LIBRARY,
        ensure_rtx_library_link,
        rtx_library_dir,
        rtx_wheel_ships_unversioned_library,
    )

    libdir = rtx_library_dir()
    if libdir is None:
        pytest.skip("TensorRT-RTX not installed from the tensorrt-rtx-cu12-libs wheel")
    assert not rtx_wheel_ships_unversioned_library(), \
        "the tensorrt-rtx libs wheel now ships libtensorrt_rtx.so: ensure_rtx_library_link may go"
    link = ensure_rtx_library_link(quiet=True)
    assert link == libdir / RTX_LIBRARY and link.resolve() == (libdir / (RTX_LIBRARY + ".1")).resolve()
