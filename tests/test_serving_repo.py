"""trellis-export triton-repo: the repository, its config checks (model_config_pb2 + the project's
rules), the [B, 1] position wrapper of the GPU copies, and the CLI's one-line errors. No server here."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TOL_SHORT, assert_rel_close, tiny_config, tiny_model

pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] not installed; pip install "
                    "'trellis-export[serve]'")

from trellis_export.errors import TrellisExportError  # noqa: E402
from trellis_export.serving.checks import ConfigCheckError, GraphIO, check_config, parse_config  # noqa: E402
from trellis_export.serving.repo import (  # noqa: E402
    RepoError,
    RepoOptions,
    check_repository,
    write_repository,
)
from trellis_export.state import state_spec  # noqa: E402


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from trellis_export.export import export_onnx

    path = tmp_path_factory.mktemp("repo") / "tiny.onnx"
    export_onnx(tiny_model(tiny_config(vocab_size=128), dtype=torch.float32), path)
    return path


@pytest.fixture(scope="module")
def repo(onnx_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("repo_out") / "repo"
    write_repository(onnx_model, out, RepoOptions(instances=2, max_sequences=32, idle_seconds=5))
    return out


def _cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trellis_export.cli.main", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


def test_repository_layout_and_flags(repo: Path) -> None:
    manifest = check_repository(repo)
    assert manifest["models"].keys() == {"trellis", "trellis_onnx", "trellis_trt"}
    for p in ("trellis/config.pbtxt", "trellis/1/model.py", "trellis/1/model.onnx",
              "trellis_onnx/1/model.onnx", "trellis_trt/config.pbtxt", "trellis_trt/model_trt_view.onnx",
              "trellis_trt/BUILD.md"):
        assert (repo / p).is_file(), p
    py = parse_config((repo / "trellis/config.pbtxt").read_text(), "py")
    assert py.instance_group[0].count == 2
    assert py.sequence_batching.oldest.max_candidate_sequences == 32
    assert py.parameters["idle_seconds"].string_value == "5.0"
    assert py.sequence_batching.max_sequence_idle_microseconds == 10_000_000
    assert list(py.output[0].dims) == [-1, 128]
    gpu = parse_config((repo / "trellis_onnx/config.pbtxt").read_text(), "onnx")
    cfg = tiny_config(vocab_size=128)
    assert len(gpu.sequence_batching.state) == len(state_spec(cfg))
    by = {s.input_name: s for s in gpu.sequence_batching.state}
    assert list(by["past.position"].dims) == [1]
    assert list(by["past.0.key_memory"].dims) == [cfg.n_heads, cfg.n_slots, cfg.head_dim]
    assert by["past.0.key_memory"].output_name == "present.0.key_memory"
    assert all(s.initial_state[0].zero_data for s in gpu.sequence_batching.state)


def test_position_column_wrapper_computes_the_same(onnx_model: Path, repo: Path) -> None:
    from trellis_export.runtime import open_session

    ref = open_session("ort", model_path=onnx_model, threads=1)
    import onnxruntime as ort

    wrapped = ort.InferenceSession(str(repo / "trellis_onnx/1/model.onnx"),
                                   providers=["CPUExecutionProvider"])
    ids = np.random.default_rng(0).integers(0, 128, size=(2, 9), dtype=np.int64)
    state = ref.init_state(2)
    _, state = ref.step(ids[:, :4], state)            # rows at position 4
    state["position"] = np.array([4, 0], dtype=np.int64)   # and a fresh row at 0
    want_logits, want = ref.step(ids[:, 4:], {k: v.copy() for k, v in state.items()})
    feeds = {"input_ids": ids[:, 4:]}
    feeds.update({f"past.{k}": (v[:, None] if k == "position" else v) for k, v in state.items()})
    names = [o.name for o in wrapped.get_outputs()]
    res = dict(zip(names, wrapped.run(names, feeds)))
    assert res["present.position"].shape == (2, 1)
    np.testing.assert_array_equal(res["present.position"][:, 0], want["position"])
    assert_rel_close(res["logits"], want_logits, TOL_SHORT, "logits")
    assert_rel_close(res["present.1.key_memory"], want["1.key_memory"], TOL_SHORT, "memory")


def _texts(repo: Path) -> dict[str, str]:
    return {k: (repo / k / "config.pbtxt").read_text() for k in ("trellis", "trellis_onnx")}


def _check(repo: Path, onnx_model: Path, text: str, kind: str, graph_path: Path | None = None) -> None:
    import onnx

    from trellis_export.runtime import open_session

    s = open_session("ort", model_path=onnx_model)
    graph = GraphIO.from_proto(onnx.load(str(graph_path or (repo / "trellis_onnx/1/model.onnx"
                                                            if kind != "python" else onnx_model))))
    check_config(parse_config(text, "x"), kind=kind, graph=graph, spec=s.state_spec,
                 vocab=s.config.vocab_size, activation_dtype=s.activation_dtype, fingerprint=s.fingerprint,
                 state_spec_json=s.state_spec_json(), where="x")


MUTATIONS = {
    # (model, find, replace, message the check must give)
    "position dims []": ("trellis_onnx", r'(input_name: "past.position".*?dims: )\[ 1 \]', r"\1[ ]",
                         "garbage"),
    "pairing": ("trellis_onnx", r'output_name: "present.0.value_memory"',
                'output_name: "present.0.key_memory"', "replace past. by present."),
    "memory dtype": ("trellis_onnx", r'(input_name: "past.1.key_memory".*?data_type: )TYPE_FP32',
                     r"\1TYPE_FP16", "data_type TYPE_FP16"),
    "memory dims": ("trellis_onnx", r'(input_name: "past.1.conv".*?dims: )\[ [0-9, ]+\]', r"\1[ 7, 3 ]",
                    "dims [7, 3]"),
    "state missing": ("trellis_onnx", r'    \{ input_name: "past\.0\.conv".*?zero_data: true \} \},\n', "",
                      "past.0.conv missing"),
    "no zero init": ("trellis_onnx", r"zero_data: true", "zero_data: false", "not zero_data"),
    "vocab": ("trellis", r"dims: \[ -1, 128 \]", "dims: [ -1, 127 ]", "logits dims"),
    "ids dtype": ("trellis", r"TYPE_INT64 dims: \[ -1 \]", "TYPE_INT32 dims: [ -1 ]", "TYPE_INT64"),
    "fingerprint": ("trellis", r'(key: "fingerprint" value \{ string_value: ")[0-9a-f]{4}', r"\g<1>ffff",
                    "fingerprint"),
    "python state": ("trellis", r"(  oldest[^\n]*\n)", r'\1  state [ { input_name: "past.position" '
                     r'output_name: "present.position" data_type: TYPE_INT64 dims: [ 1 ] } ]\n',
                     "ignores implicit state"),
    "no oldest": ("trellis", r"  oldest[^\n]*\n", "", "oldest"),
}


@pytest.mark.parametrize("case", list(MUTATIONS))
def test_config_rules_catch_mistakes(case: str, repo: Path, onnx_model: Path) -> None:
    model, find, repl, msg = MUTATIONS[case]
    text = _texts(repo)[model]
    bad, n = re.subn(find, repl, text, count=1, flags=re.S)
    assert n == 1, f"mutation {case} did not apply"
    kind = "python" if model == "trellis" else "onnxruntime"
    _check(repo, onnx_model, text, kind)                 # the generated one passes
    with pytest.raises(ConfigCheckError, match=re.escape(msg)):
        _check(repo, onnx_model, bad, kind)


def test_implicit_state_against_the_unwrapped_graph_is_refused(repo: Path, onnx_model: Path) -> None:
    with pytest.raises(ConfigCheckError, match=r"past.position has shape \['batch'\], expected \[B, 1\]"):
        _check(repo, onnx_model, _texts(repo)["trellis_onnx"], "onnxruntime", graph_path=onnx_model)


def test_syntax_error_is_reported() -> None:
    with pytest.raises(ConfigCheckError, match="not a valid Triton model config"):
        parse_config('name: "x"\nmax_batch_size: eight\n', "x/config.pbtxt")


def test_swapped_model_refused(repo: Path, tmp_path: Path) -> None:
    import shutil

    from trellis_export.export import export_onnx

    other = tmp_path / "other.onnx"
    export_onnx(tiny_model(tiny_config(vocab_size=128), seed=3, dtype=torch.float32), other)
    copy = tmp_path / "repo"
    shutil.copytree(repo, copy)
    shutil.copy(other, copy / "trellis/1/model.onnx")
    with pytest.raises(ConfigCheckError, match="fingerprint"):
        check_repository(copy)


def test_cli_errors_are_one_line(repo: Path, onnx_model: Path, tmp_path: Path) -> None:
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    foreign = tmp_path / "foreign"              # a directory trellis-export did not write
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    checks = [
        (("triton-repo", str(junk), "-o", str(tmp_path / "r1")), "not a Trellis ONNX model"),
        (("triton-repo", str(onnx_model), "-o", str(foreign)), "--force"),
        (("triton-repo", str(tmp_path / "missing.onnx"), "-o", str(tmp_path / "r2")), "no such"),
    ]
    env = dict(os.environ, TRELLIS_SERVING_HOME=str(tmp_path / "nowhere"))
    checks.append((("serve", str(repo)), "serve --setup"))
    checks.append((("stream", "--url", "127.0.0.1:9", "--timeout", "3", "hi"), "unreachable"))
    for args, msg in checks:
        res = _cli(*args, env=env)
        lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
        assert res.returncode == 1, (args, res.stdout, res.stderr)
        assert lines and lines[0].startswith("error: ") and msg in lines[0], (args, res.stderr)
        assert "Traceback" not in res.stderr
    assert not (tmp_path / "r1").exists()


def test_cli_triton_repo_writes(onnx_model: Path, tmp_path: Path) -> None:
    res = _cli("triton-repo", str(onnx_model), "-o", str(tmp_path / "r"), "--no-gpu-configs",
               "--max-sequences", "4", "--instances", "1")
    assert res.returncode == 0, res.stderr
    assert "checked against the graph: ok" in res.stdout
    assert check_repository(tmp_path / "r")["models"] == {"trellis": "python"}
    # a repository trellis-export wrote is replaced without --force; a foreign directory needs it
    assert write_repository(onnx_model, tmp_path / "r")["models"].keys() == {"trellis", "trellis_onnx",
                                                                              "trellis_trt"}
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("x")
    with pytest.raises(TrellisExportError, match="--force"):
        write_repository(onnx_model, tmp_path / "mine")
    assert (tmp_path / "mine" / "keep.txt").read_text() == "x"
    write_repository(onnx_model, tmp_path / "mine", force=True)
    assert not (tmp_path / "mine" / "keep.txt").exists()
    with pytest.raises(RepoError, match="no such ONNX model"):
        write_repository(tmp_path / "absent.onnx", tmp_path / "r2")
