"""Code-health contracts: versioned fingerprints (old checkpoints keep theirs), scoped torch threads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_config, tiny_model
from safetensors import safe_open

from trellis_export.checkpoint import (
    CheckpointError,
    default_checkpoint_path,
    fingerprint,
    load_checkpoint,
    model_fingerprint,
    read_checkpoint,
    save_checkpoint,
)
from trellis_export.config import FINGERPRINT_VERSION
from trellis_export.runtime import open_session

#: The bundled checkpoint's fingerprint as shipped (README, docs/training.md, exported models).
BUNDLED_FINGERPRINT = "dbaa7208621a5f3dba2fc95fbf585b1f113c4522624dc6342a6c4bd5f316d237"


def test_bundled_checkpoint_keeps_its_fingerprint() -> None:
    cfg, tensors, meta = read_checkpoint()
    assert meta["fingerprint"] == BUNDLED_FINGERPRINT and "fingerprint_version" not in meta
    assert fingerprint(cfg, tensors, 1) == BUNDLED_FINGERPRINT
    assert fingerprint(cfg, tensors, 2) != BUNDLED_FINGERPRINT       # versions never collide
    model = load_checkpoint()
    assert model.fingerprint == model_fingerprint(model) == BUNDLED_FINGERPRINT


def test_new_checkpoints_hash_every_field(tmp_path: Path) -> None:
    """A new save records the current version; a field at its default is hashed too (no omissions),
    so changing any field, default or not, changes the fingerprint."""
    model = tiny_model(tiny_config(), seed=1, dtype=torch.float32)
    fp = save_checkpoint(model, tmp_path / "a")
    with safe_open(str(tmp_path / "a" / "model.safetensors"), framework="pt") as fh:
        assert fh.metadata()["fingerprint_version"] == str(FINGERPRINT_VERSION)
    assert load_checkpoint(tmp_path / "a").fingerprint == fp == model_fingerprint(model)
    assert json.loads((tmp_path / "a" / "config.json").read_text())["gamma_init"] == 0.5
    other = tiny_model(tiny_config(gamma_init=0.3), seed=1, dtype=torch.float32)
    other.load_state_dict(model.state_dict())
    assert model_fingerprint(other) != fp


def test_a_tampered_fingerprint_version_is_refused(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    model = tiny_model(tiny_config(), seed=2, dtype=torch.float32)
    save_checkpoint(model, tmp_path / "c")
    w = tmp_path / "c" / "model.safetensors"
    with safe_open(str(w), framework="pt") as fh:
        meta = dict(fh.metadata())
    tensors = load_file(str(w))
    for version, needle in (("1", "fingerprint mismatch"), ("7", "unknown fingerprint_version")):
        save_file(tensors, str(w), metadata={**meta, "fingerprint_version": version})
        with pytest.raises(CheckpointError, match=needle):
            read_checkpoint(tmp_path / "c")


def test_sessions_do_not_change_the_process_thread_count() -> None:
    before = torch.get_num_threads()
    target = 1 if before != 1 else 2
    s = open_session("torch", checkpoint=default_checkpoint_path(), threads=target)
    seen = []
    real = s.model.forward

    def spy(*a: object, **k: object) -> object:
        seen.append(torch.get_num_threads())
        return real(*a, **k)

    s.model.forward = spy  # type: ignore[method-assign]
    s.step([[1, 2, 3]])
    assert seen == [target], "the session's own count applies inside its calls"
    assert torch.get_num_threads() == before, "and the process's count is restored after"


# --------------------------------------------------------------------------- behaviour that had no test
def test_untied_head_and_conv_size_through_export_and_ort(tmp_path: Path) -> None:
    """An untied LM head and conv_size 3 (cache of 2 columns) export and stream on ORT like the
    float64 reference, over a split stream with rows at different positions."""
    import numpy as np
    from conftest import TOL_SHORT, assert_rel_close, random_ids

    from trellis_export.export.onnx_export import export_onnx

    cfg = tiny_config(tie_embeddings=False, conv_size=3, chunk_size=3)
    model = tiny_model(cfg, seed=8)                              # float64 reference
    path = export_onnx(tiny_model(cfg, seed=8, dtype=torch.float32), tmp_path / "m.onnx")
    ort, ref = open_session("ort", model_path=path), open_session("torch", model=model, dtype="float64")
    assert ort.fingerprint == model_fingerprint(tiny_model(cfg, seed=8, dtype=torch.float32))
    assert ort.state_spec[-1].shape[-1] == 2                    # conv cache: conv_size - 1 columns
    ids = random_ids(2, 19, cfg.vocab_size, seed=3).numpy()
    st_o, st_r = ort.init_state(2), ref.init_state(2)
    _, st_o = ort.step(ids[:1, :5], {k: v[:1] for k, v in st_o.items()})   # row 0 starts 5 ahead
    _, st_r = ref.step(ids[:1, :5], {k: v[:1] for k, v in st_r.items()})
    st_o = ort.concat_states([st_o, ort.init_state(1)])
    st_r = ref.concat_states([st_r, ref.init_state(1)])
    for lo, hi in ((5, 6), (6, 13), (13, 14)):
        lo_, st_o = ort.step(ids[:, lo:hi], st_o)
        lr, st_r = ref.step(ids[:, lo:hi], st_r)
        assert_rel_close(lo_, lr, TOL_SHORT, f"logits [{lo}:{hi}]")
    np.testing.assert_array_equal(st_o["position"], [14, 9])


def test_load_state_refuses_a_file_without_a_state_spec(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    from trellis_export.runtime import StateError

    s = open_session("torch", checkpoint=default_checkpoint_path())
    s.save_state(s.init_state(1), tmp_path / "ok.safetensors")
    assert s.load_state(tmp_path / "ok.safetensors")["position"].tolist() == [0]
    with safe_open(str(tmp_path / "ok.safetensors"), framework="numpy") as fh:
        meta = dict(fh.metadata())
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    del meta["state_spec"]
    save_file(tensors, str(tmp_path / "nospec.safetensors"), metadata=meta)
    with pytest.raises(StateError, match="no readable state spec"):
        s.load_state(tmp_path / "nospec.safetensors")


def test_ort_session_profile_writes_a_trace(tmp_path: Path) -> None:
    from trellis_export.export.onnx_export import export_onnx

    path = export_onnx(tiny_model(tiny_config(), seed=1, dtype=torch.float32), tmp_path / "m.onnx")
    s = open_session("ort", model_path=path, profile=str(tmp_path / "prof"))
    s.step([[1, 2, 3]])
    trace = Path(s.end_profiling())
    events = json.loads(trace.read_text())
    assert trace.parent == tmp_path and trace.name.startswith("prof")
    assert any(e.get("cat") == "Node" for e in events), "kernel events are in the trace"


def test_train_defaults_are_the_bundled_recipe() -> None:
    """`trellis-export train` without model flags builds exactly the bundled checkpoint's config."""
    from trellis_export.config import TRAIN_PRESET, TrellisConfig

    assert TRAIN_PRESET == TrellisConfig.load(default_checkpoint_path() / "config.json")
    from click.testing import CliRunner
    from trellis_export.cli.main import main

    help_text = CliRunner().invoke(main, ["train", "--help"]).output
    for flag, value in (("--d-model", TRAIN_PRESET.d_model), ("--slots", TRAIN_PRESET.n_slots),
                        ("--chunk-size", TRAIN_PRESET.chunk_size), ("--beta-init", TRAIN_PRESET.beta_init)):
        block = help_text[help_text.index(flag):]
        assert f"default: {value}" in block[:400], flag


def test_a_nan_the_model_produces_is_refused_at_the_next_step() -> None:
    """trust_own_state skips re-validating the session's own states, but not one whose step produced
    non-finite logits: poison a weight so the model itself makes NaN, and the next step refuses the state
    it returned, naming a tensor."""
    import numpy as np

    from trellis_export.runtime import StateError

    model = tiny_model(tiny_config(), seed=4, dtype=torch.float32)
    with torch.no_grad():
        model.layers[0].gamma_proj.bias.fill_(float("nan"))
    s = open_session("torch", model=model)
    assert s.trust_own_state and s.check_finite
    logits, state = s.step(np.array([[1, 2, 3]]))
    assert not np.isfinite(logits).all()
    with pytest.raises(StateError, match="non-finite"):
        s.step(np.array([[4]]), state)


@pytest.mark.parametrize("backend", ["torch", "ort"])
def test_timed_call_is_the_step_from_a_fixed_state(backend: str, tmp_path: Path) -> None:
    """Session.timed_call (what bench times) computes what step computes, every call from the same
    state (its output state is dropped), rows at different positions."""
    import numpy as np
    from conftest import TOL_SHORT, assert_rel_close, export_cached, random_ids

    model = tiny_model(tiny_config(chunk_size=3), seed=6, dtype=torch.float32)
    s = (open_session("torch", model=model) if backend == "torch"
         else open_session("ort", model_path=export_cached(model)))
    ids = random_ids(3, 1, s.config.vocab_size, seed=2).numpy()
    _, state = s.step(random_ids(3, 4, s.config.vocab_size, seed=1).numpy())
    want, _ = s.step(ids, state)
    call = s.timed_call(ids, state)
    for _ in range(2):
        got = call()[0]
        assert_rel_close(got, want, TOL_SHORT, f"{backend} timed call")
    assert np.array_equal(state["position"], [4, 4, 4])


def test_bench_ort_runs_and_judges_its_aims(tmp_path: Path) -> None:
    """bench/bench_ort.py (the source of the README's ORT figures) end to end on tiny settings: the JSON
    has the machine, the kernel count from the ORT profile, and every aim judged from its own value."""
    import subprocess
    import sys

    out = tmp_path / "ort.json"
    script = Path(__file__).resolve().parents[1] / "bench" / "bench_ort.py"
    args = ["--seconds", "0.05", "--warmup", "1", "--batches", "1,3", "--prefill", "5",
            "--compile-batches", "", "--no-variants", "--out", str(out)]
    res = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    rep = json.loads(out.read_text())
    assert rep["machine"]["logical_cores"] >= 1
    aims = {a["aim"]: a for a in rep["aims"]}
    kernels = aims["kernels per decode step <= 150"]
    assert 20 < kernels["value"] < 400, "kernels counted from a real ORT profile"
    for a in rep["aims"]:
        if a["value"] is None:
            assert a["met"] is None, a            # not measured is not 'not met'
        elif "<=" in a["aim"]:
            assert a["met"] == (a["value"] <= a["target"]), a
        else:
            assert a["met"] == (a["value"] >= a["target"]), a
    assert "torch.compile" in " ".join(aims) and "not measured" in res.stdout
    pre = rep["ratios"]["prefill"]["5"]                     # prefill: the lean graph against the export
    assert pre["exported_graph_over_ort_session"] > 0 and pre["ort_session_x_matmul_floor"] > 1
    assert rep["profiles"]["prefill_T1024"]["prefill_graph"] == "lean"
    assert rep["profiles"]["prefill_T1024_exported"]["prefill_graph"] == "exported"
    assert rep["profiles"]["prefill_T1024"]["control_flow_calls_per_call"] == {"Scan": 2.0}


def test_bench_work_dir_recognises_its_own_files_only() -> None:
    """bench --work-dir may be reused without --force when it holds only bench's files: its ONNX
    exports and (with --backend trt) its engines and their sidecars; nothing else."""
    from trellis_export.bench.run import is_work_file

    fp = "0123456789abcdef"
    for name in (f"trellis-m16-{fp}.onnx", f"trellis-m16-{fp}.onnx.data", f"kv-cache-{fp}.onnx",
                 f"trellis-m64-{fp}.engine", f"trellis-m64-{fp}.engine.json"):
        assert is_work_file(name), name
    for name in ("model.onnx", f"trellis-m16-{fp}.engine.bak", f"notes-{fp}.engine", "trellis-m16-x.onnx"):
        assert not is_work_file(name), name
