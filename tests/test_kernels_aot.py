"""AOT compilation of the kernels for every target, on the CPU (no GPU, no TensorRT).

The compiler runs in a subprocess without TRITON_INTERPRET (interpreted kernels cannot be compiled,
and other test modules import the kernels in interpreter mode).
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("triton")

from trellis_export.kernels.aot import (  # noqa: E402
    DEFAULT_TARGETS,
    PTX_PARAM,
    AOTKernel,
    parse_ptx_entry,
    variant_name,
    variants_for,
)
from trellis_export.kernels.ptx_stats import find_ptxas, ptxas_stats  # noqa: E402
from trellis_export.kernels.trellis_memory.utils import (  # noqa: E402
    INPUT_ARGS,
    KERNELS,
    OUTPUT_ARGS,
    SCALAR_ARGS,
    launch_config,
)

from trellis_export.config import TrellisConfig  # noqa: E402
from trellis_export.opdef import INPUTS, OUTPUTS, PLUGIN_NAME, op_attributes  # noqa: E402

CONFIG = TrellisConfig(vocab_size=32, d_model=12, n_layers=1, n_heads=3, head_dim=5, n_slots=7,
                       chunk_size=3, ffn_dim=24, phi="l2_silu", f="ln_silu", rho="identity")


def _run_aot(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", "trellis_export.kernels.aot", *args], env=env,
                          capture_output=True, text=True, timeout=600, cwd=tmp)


@pytest.fixture(scope="module")
def records(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("aot")
    (tmp / "config.json").write_text(CONFIG.to_json())
    proc = _run_aot(tmp, "--config", "config.json", "--variants", "all", "--out", "aot.json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((tmp / "aot.json").read_text())


def test_every_kernel_compiled_for_every_target(records: list[dict[str, Any]]) -> None:
    got = sorted((r["kernel"], r["cc"], r["variant"]) for r in records)
    want = [(k, cc, variant_name(**{"decode": False, "in_place": False, **v}))
            for k in KERNELS for cc in DEFAULT_TARGETS for v in variants_for(k)]
    assert got == sorted(want)
    names = {r["variant"] for r in records if r["kernel"] == "fused_recurrent"}
    assert names == {"decode_in_place", "decode", "aligned", "unaligned"}
    assert {r["variant"] for r in records if r["kernel"] == "chunk"} == {"aligned", "unaligned"}


def test_issue14_record_fields(records: list[dict[str, Any]]) -> None:
    """Alignment, decode, in-place and PTX ISA fields; the constexprs say the same as the flags."""
    for r in records:
        cx = r["constexprs"]
        assert cx["DECODE"] is r["decode"] and cx["IN_PLACE"] is r["in_place"]
        assert r["aligned"] is (r["variant"] != "unaligned") and r["alignment"] == 16
        # PTX 8.5 on every target: a CUDA 12.6 driver (JetPack 6 on Orin) accepts it
        assert r["ptx_version"] == "8.5" and ".version 8.5" in r["ptx"] and r["min_cuda_driver"] == "12.6"
        assert bool(r["cubin_b64"]) is (r["cc"] == 87)          # the Orin records carry the cubin
        if r["cubin_b64"]:
            assert base64.b64decode(r["cubin_b64"])[:4] == b"\x7fELF" and r["cubin_ptxas"]
        # decode records never read the T parameter (T is a compile-time 1); the others do
        i_t = [n for n, _ in r["signature"]].index("T")
        reads_t = re.search(rf"ld\.param\.\w+\s+%\w+, \[{r['name']}_param_{i_t}\]", r["ptx"]) is not None
        assert reads_t is not r["decode"], (r["kernel"], r["variant"], r["cc"])
        # (the vector loads the alignment buys are checked at d >= 32 in test_kernels_ptxas.py; at d = 5
        # rows are not 16-byte multiples and both builds load scalars)


def test_default_records_are_one_aligned_per_kernel_and_target(tmp_path: Path) -> None:
    """Without --variants the CLI writes what it wrote before issue 14 (one record per kernel and
    target; the plugin and the session look records up by kernel and cc)."""
    (tmp_path / "config.json").write_text(CONFIG.to_json())
    proc = _run_aot(tmp_path, "--config", "config.json", "--targets", "87", "--out", "aot.json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = json.loads((tmp_path / "aot.json").read_text())
    assert [(r["kernel"], r["cc"], r["variant"]) for r in recs] == [(k, 87, "aligned") for k in KERNELS]


def test_old_records_still_load() -> None:
    """A record written before issue 14 (no new fields) reads with the old meaning, and a record
    with fields this version does not know is read too."""
    rec = dict(kernel="chunk", name="k", target="sm_90", cc=90, ptx="", ptx_target="sm_90a",
               ptx_version="8.7", triton_version="3.7.1", dtype="float32", gate_dtype="float32",
               constexprs={"H": 1}, signature=[["q", "*fp32"]], inputs=["q"], scalars=["T"], outputs=[],
               scalar_exprs={}, hidden_params=[], ptx_params=["u64"], num_warps=4, num_stages=1,
               shared_mem=0, global_scratch_size=0, grid="(B*H, 1, 1)", block=[128, 1, 1], plugin={},
               cubin_b64="")
    old = AOTKernel.from_dict(rec)
    assert (old.aligned, old.decode, old.in_place, old.variant) == (False, False, False, "unaligned")
    assert AOTKernel.from_dict({**rec, "some_future_field": 1}).name == "k"


def test_every_record_assembles_with_ptxas(records: list[dict[str, Any]]) -> None:
    """ptxas accepts the shipped PTX (ISA 8.5) of every variant for sm_80 / 87 / 89 / 90."""
    ptxas = find_ptxas()
    if ptxas is None:
        pytest.skip("no ptxas on this machine (CUDA toolkit absent; set TRELLIS_PTXAS)")
    for r in records:
        st = ptxas_stats(r["ptx"], r["cc"], ptxas)
        assert st.spill_stores == 0, (r["kernel"], r["variant"], r["cc"], st)


def test_ptx_target_and_entry_params(records: list[dict[str, Any]]) -> None:
    for r in records:
        ptx = r["ptx"]
        cc = r["cc"]
        target = r["ptx_target"]
        # sm_90 compiles to the arch-specific sm_90a; the others exactly sm_XX
        assert target in (f"sm_{cc}", f"sm_{cc}a"), (r["kernel"], target)
        assert f".target {target}" in ptx
        name, params = parse_ptx_entry(ptx)
        assert name == r["name"] and name.endswith("_kernel")
        sig = r["signature"]
        # inputs, then scalars, then outputs: the order of TensorRT AOT plugins
        assert [n for n, _ in sig] == list(INPUT_ARGS) + list(SCALAR_ARGS) + list(OUTPUT_ARGS)
        assert r["inputs"] == list(INPUTS) and r["outputs"] == [f"out_{o}" for o in OUTPUTS]
        assert len(params) == len(sig) + len(r["hidden_params"])
        expected = [PTX_PARAM["i32" if t == "i32" else "ptr"] for _, t in sig]
        expected += ["u64"] * len(r["hidden_params"])
        assert params == expected
        assert r["global_scratch_size"] == 0


def test_launch_record_fields(records: list[dict[str, Any]]) -> None:
    for r in records:
        rec = AOTKernel.from_dict(r)
        assert rec.to_dict() == r                      # JSON round trip
        cfg = launch_config(rec.kernel, CONFIG.n_slots, CONFIG.head_dim, CONFIG.chunk_size)
        assert rec.num_warps == cfg.num_warps and rec.block == (32 * cfg.num_warps, 1, 1)
        assert rec.grid == "(B*H, 1, 1)" and rec.grid_fn(5, 3) == (15, 1, 1)
        cx = rec.constexprs
        assert (cx["H"], cx["M"], cx["D"], cx["C"]) == (3, 7, 5, 3)
        assert (cx["BM"], cx["BD"], cx["BC"]) == (cfg.BM, cfg.BD, cfg.BC)
        assert (cx["PHI"], cx["F"], cx["RHO"]) == (2, 1, 0)
        assert rec.shared_mem >= 0 and rec.scalar_exprs == {"T": "q.shape[1]"}
        assert rec.plugin["plugin_id"] == PLUGIN_NAME
        assert rec.plugin["attributes"] == op_attributes(CONFIG)
        assert rec.ptx_version and rec.triton_version


def test_parse_ptx_entry_on_a_small_listing() -> None:
    ptx = (".version 8.7\n.target sm_80\n.visible .entry foo_kernel(\n"
           "\t.param .u64 .ptr .global .align 1 foo_param_0,\n\t.param .u32 foo_param_1\n)\n{\n}\n")
    assert parse_ptx_entry(ptx) == ("foo_kernel", ["u64", "u32"])


def test_aot_cli_reports_bad_flags(tmp_path: Path) -> None:
    proc = _run_aot(tmp_path, "--targets", "hopper", "--out", "x.json")
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: --targets must be") and "Traceback" not in proc.stderr
    assert not (tmp_path / "x.json").exists()


@pytest.fixture(scope="module")
def split_records(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("aot_split")
    (tmp / "config.json").write_text(CONFIG.to_json())
    proc = _run_aot(tmp, "--config", "config.json", "--kernels", "chunk_state,chunk_readout", "--variants",
                    "all", "--out", "aot.json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((tmp / "aot.json").read_text())


def test_split_prefill_records(split_records: list[dict[str, Any]]) -> None:
    """The two launches of the split prefill at the odd shapes, every target: signature with the
    workspace pointers after the outputs, grids and workspace sizes as expressions, stage order."""
    from trellis_export.kernels import cuda_launch
    got = sorted((r["kernel"], r["cc"], r["variant"]) for r in split_records)
    assert got == sorted((k, cc, v) for k in ("chunk_state", "chunk_readout") for cc in DEFAULT_TARGETS
                         for v in ("aligned", "unaligned", "aligned+tf32x3"))
    for r in split_records:
        names = [n for n, _ in r["signature"]]
        assert names == list(INPUT_ARGS + SCALAR_ARGS + OUTPUT_ARGS) + ["ws_memory", "ws_u"]
        name, params = parse_ptx_entry(r["ptx"])
        assert name == r["name"] and len(params) == len(r["signature"]) + len(r["hidden_params"])
        assert r["plan"] == "chunk_split" and r["stage"] == (0 if r["kernel"] == "chunk_state" else 1)
        assert r["global_scratch_size"] == 0
        assert r["constexprs"]["DOT_PRECISION"] == ("tf32x3" if "tf32x3" in r["variant"] else "ieee")
        B, T, H, m, d, C = 2, 10, 3, 7, 5, 3
        NC = (T + 2 * C - 2) // C
        want = (B * H * 2, 1, 1) if r["kernel"] == "chunk_state" else (NC, B * H, 1)
        assert cuda_launch.grid_for(r, B, T) == want
        assert AOTKernel.from_dict(r).grid_fn(B, H, T) == want
        assert cuda_launch.workspace_bytes(r, B, T) == {"ws_memory": B * H * 2 * NC * m * d * 4,
                                                        "ws_u": B * H * 2 * NC * C * m * 4}
    ptxas = find_ptxas()
    if ptxas is None:
        pytest.skip("no ptxas on this machine (CUDA toolkit absent; set TRELLIS_PTXAS)")
    for r in split_records:
        st = ptxas_stats(r["ptx"], r["cc"], ptxas)
        assert st.spill_stores == 0, (r["kernel"], r["variant"], r["cc"], st)


def test_m_axis_split_records(tmp_path: Path) -> None:
    """A phi = identity model's state pass gets the m-axis split record first (m = 19: two 16-slot
    programs per (row, head, pass), the second part-filled), for every target; its grid and the
    workspaces follow; it assembles without spills. Other models get none, and a split is refused
    where phi is not identity."""
    from trellis_export.kernels import cuda_launch
    from trellis_export.kernels.aot import AOTError, compile_kernel

    ident = CONFIG.replace(phi="identity", n_slots=19)
    (tmp_path / "config.json").write_text(ident.to_json())
    proc = _run_aot(tmp_path, "--config", "config.json", "--kernels", "chunk_state", "--variants", "all",
                    "--out", "aot.json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = json.loads((tmp_path / "aot.json").read_text())
    for cc in DEFAULT_TARGETS:
        mine = [r for r in recs if r["cc"] == cc]
        assert [r["variant"] for r in mine] == ["m_split", "aligned", "unaligned", "aligned+tf32x3"]
        split, whole = mine[0], mine[1]
        assert split["m_block"] == 16 and split["constexprs"]["BM"] == 16 and split["aligned"]
        assert split["grid"] == f"({', '.join(split['grid_dims'])})" and "BM" in split["grid"]
        assert whole["m_block"] == 0 and whole["constexprs"]["BM"] == 32
        B, T, H = 2, 10, 3
        assert cuda_launch.grid_for(split, B, T) == (B * H * 2 * 2, 1, 1)
        assert cuda_launch.grid_for(whole, B, T) == (B * H * 2, 1, 1)
        assert cuda_launch.workspace_bytes(split, B, T) == cuda_launch.workspace_bytes(whole, B, T)
    assert variants_for("chunk_state", phi="ln_silu", slots=19)[0] == dict(aligned=True)
    assert variants_for("chunk_state", phi="identity", slots=16)[0] == dict(aligned=True)
    assert variant_name(aligned=True, decode=False, in_place=False, m_block=16) == "m_split"
    assert variant_name(aligned=False, decode=False, in_place=False, m_block=16) == "m_split_unaligned"
    assert variant_name(aligned=True, decode=False, in_place=True, m_block=16) == "m_split_in_place"
    with pytest.raises(AOTError, match="needs phi = identity"):
        compile_kernel("chunk_state", 90, heads=3, slots=19, head_dim=5, chunk_size=3, phi="ln_silu",
                       m_block=16)
    with pytest.raises(AOTError, match="m_block splits the chunk_state kernel only"):
        compile_kernel("chunk_readout", 90, heads=3, slots=19, head_dim=5, chunk_size=3, phi="identity",
                       m_block=16)
    ptxas = find_ptxas()
    if ptxas is None:
        pytest.skip("no ptxas on this machine (CUDA toolkit absent; set TRELLIS_PTXAS)")
    for r in recs:
        if r["variant"] == "m_split":
            assert ptxas_stats(r["ptx"], r["cc"], ptxas).spill_stores == 0, r["cc"]


def test_d_axis_split_records(tmp_path: Path) -> None:
    """``--kernels chunk_state_dsplit`` compiles the d-axis split's state pass for every target at its
    default column block (d = 40: three 16-column programs per (row, head, pass), the last
    part-filled), aligned and unaligned: the signature is ``aot.kernel_args``'s (steps after T, four
    workspaces, int32 counters), the PTX entry takes as many parameters, the grid and workspaces
    follow, and it assembles without spills."""
    from trellis_export.kernels import cuda_launch
    from trellis_export.kernels.aot import AOTError, compile_kernel, kernel_args

    cfg = CONFIG.replace(head_dim=40, n_slots=7, chunk_size=3)
    (tmp_path / "config.json").write_text(cfg.to_json())
    proc = _run_aot(tmp_path, "--config", "config.json", "--kernels", "chunk_state_dsplit", "--variants",
                    "all", "--out", "aot.json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = json.loads((tmp_path / "aot.json").read_text())
    assert sorted((r["cc"], r["variant"]) for r in recs) == sorted(
        (cc, v) for cc in DEFAULT_TARGETS for v in ("d_split", "d_split_unaligned"))
    B, T, H, m, d, C = 2, 10, cfg.n_heads, 7, 40, 3
    NC = (T + 2 * C - 2) // C
    for r in recs:
        assert r["kernel"] == "chunk_state_dsplit" and r["d_block"] == 16 and r["constexprs"]["BD"] == 16
        assert [n for n, _ in r["signature"]] == list(kernel_args("chunk_state_dsplit"))
        assert dict(r["signature"])["ws_sync"] == "*i32" and r["scalars"] == ["T", "S0", "S1"]
        assert r["ptx_params"].count("u32") == 3
        assert len(r["ptx_params"]) == len(r["signature"]) + len(r["hidden_params"])
        assert (r["plan"], r["stage"]) == ("chunk_split", 0)
        assert cuda_launch.grid_for(r, B, T) == (B * H * 2 * 3, 1, 1)
        assert cuda_launch.workspace_bytes(r, B, T) == {
            "ws_memory": B * H * 2 * NC * m * d * 4, "ws_u": B * H * 2 * NC * C * m * 4,
            "ws_z": B * H * 2 * 2 * 3 * 16 * 16 * 4, "ws_sync": (1 + B * H * 2) * 4}
    with pytest.raises(AOTError, match="d_block must be a power of two from 16 to 64"):
        compile_kernel("chunk_state_dsplit", 90, heads=3, slots=7, head_dim=40, chunk_size=3, d_block=24)
    with pytest.raises(AOTError, match="m_block splits the chunk_state kernel only"):
        compile_kernel("chunk_state_dsplit", 90, heads=3, slots=19, head_dim=40, chunk_size=3, phi="identity",
                       d_block=16, m_block=16)
    with pytest.raises(AOTError, match="prefill kernel"):
        compile_kernel("chunk_state_dsplit", 90, heads=3, slots=7, head_dim=40, chunk_size=3, decode=True)
    with pytest.raises(AOTError, match="d_block is the chunk_state_dsplit kernel's"):
        compile_kernel("chunk_state", 90, heads=3, slots=7, head_dim=40, chunk_size=3, d_block=16)
    assert variant_name(aligned=True, decode=False, in_place=False, d_block=16) == "d_split"
    ptxas = find_ptxas()
    if ptxas is None:
        pytest.skip("no ptxas on this machine (CUDA toolkit absent; set TRELLIS_PTXAS)")
    for r in recs:
        assert ptxas_stats(r["ptx"], r["cc"], ptxas).spill_stores == 0, (r["cc"], r["variant"])


def test_num_warps_override_for_the_gpu_suites_warp_sweep(tmp_path: Path) -> None:
    """``compile_kernel(num_warps=...)`` builds the decode record at another warp count (the GPU suite
    times 4 / 8 / 16): its block and variant name follow (``+w16``); the default count keeps the
    plain name; a count that is not a power of two up to 32 is refused."""
    script = (
        "import json, sys\n"
        "from trellis_export.kernels.aot import compile_kernel\n"
        "kw = dict(heads=8, slots=64, head_dim=64, chunk_size=16, decode=True, in_place=True)\n"
        "out = [compile_kernel('fused_recurrent', 90, num_warps=n, **kw).to_dict() for n in (16, 8)]\n"
        "keep = ('variant', 'num_warps', 'block')\n"
        "json.dump([{k: r[k] for k in keep} for r in out], open(sys.argv[1], 'w'))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "w.json")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    wide, default = json.loads((tmp_path / "w.json").read_text())
    assert wide == {"variant": "decode_in_place+w16", "num_warps": 16, "block": [512, 1, 1]}
    assert default == {"variant": "decode_in_place", "num_warps": 8, "block": [256, 1, 1]}
    from trellis_export.kernels.aot import AOTError, compile_kernel
    with pytest.raises(AOTError, match="num_warps must be a power of two"):
        compile_kernel("fused_recurrent", 90, heads=3, slots=7, head_dim=5, chunk_size=3, num_warps=12)
