"""``trellis-export train``: train a model on MQAR or the character corpus; ``--eval-only`` scores one."""

from __future__ import annotations

import json
import shlex
import sys
import time
from typing import Any

import click

from trellis_export.config import NONLINEARITIES, QK_NORMS, TRAIN_PRESET

#: CLI option -> TrellisConfig field.
_CONFIG_FLAGS = {"vocab_size": "vocab_size", "d_model": "d_model", "layers": "n_layers", "heads": "n_heads",
                 "head_dim": "head_dim", "slots": "n_slots", "chunk_size": "chunk_size", "phi": "phi",
                 "f": "f", "rho": "rho", "qk_norm": "qk_norm", "ffn_dim": "ffn_dim",
                 "beta_init": "beta_init", "gamma_init": "gamma_init"}
#: CLI option -> TrainArgs field.
_TRAIN_FLAGS = {"task": "task", "steps": "steps", "batch_size": "batch_size", "lr": "lr",
                "min_lr_ratio": "min_lr_ratio", "warmup": "warmup_steps", "weight_decay": "weight_decay",
                "grad_clip": "grad_clip", "seed": "seed", "eval_every": "eval_every",
                "eval_examples": "eval_examples", "threads": "threads", "num_pairs": "num_pairs",
                "seq_len": "seq_len", "num_queries": "num_queries", "corpus_chars": "corpus_chars"}

_pos = click.IntRange(min=1)
#: Every model flag's default: the bundled checkpoint's recipe (one preset, in trellis_export.config).
_P = TRAIN_PRESET
_nl = click.Choice(NONLINEARITIES)


@click.command()
@click.option("--task", type=click.Choice(["mqar", "charlm"]), default="mqar", show_default=True,
              help="Multi-query associative recall, or the generated character-level corpus.")
@click.option("--out", type=click.Path(file_okay=False, path_type=str),
              help="Checkpoint directory to write (required unless --eval-only).")
@click.option("--steps", type=_pos, default=1000, show_default=True)
@click.option("--batch-size", type=_pos, default=32, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=3e-3, show_default=True)
@click.option("--min-lr-ratio", type=click.FloatRange(0, 1), default=0.1, show_default=True,
              help="Cosine floor as a fraction of --lr.")
@click.option("--warmup", type=click.IntRange(min=0), default=50, show_default=True, help="Warmup steps.")
@click.option("--weight-decay", type=click.FloatRange(min=0), default=0.1, show_default=True)
@click.option("--grad-clip", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="Global grad-norm clip (0: off).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seeds the initialisation and every training batch.")
@click.option("--eval-every", type=_pos, default=100, show_default=True,
              help="Evaluate and write the checkpoint + resume state every N steps.")
@click.option("--eval-examples", type=_pos, default=256, show_default=True)
@click.option("--threads", type=click.IntRange(min=0), default=0, show_default=True,
              help="torch threads (0: min(2, cpus)).")
@click.option("--resume", is_flag=True, help="Continue the run whose state sits next to --out "
              "(or at --state); flags not given are taken from it.")
@click.option("--state", "state_path", type=click.Path(dir_okay=False, path_type=str),
              help="Resume-state file [default: OUT.train-state.safetensors].")
@click.option("--stop-after", type=_pos, help="Stop after this many steps in total (the schedule still "
              "spans --steps); continue later with --resume.")
@click.option("--no-progress", is_flag=True, help="No progress bar (evaluation lines still print).")
@click.option("--force", is_flag=True, help="Replace --out even when it is a directory trellis-export did "
              "not write (its files are lost).")
@click.option("--eval-only", "eval_only", type=click.Path(path_type=str), metavar="CKPT",
              help="Score checkpoint CKPT ('default': the bundled one) on the task it was trained on "
                   "(training.json: MQAR accuracy, or character-LM bits per char) and exit.")
# MQAR / corpus
@click.option("--num-pairs", type=_pos, default=8, show_default=True, help="MQAR key-value pairs.")
@click.option("--seq-len", type=_pos, default=64, show_default=True, help="Training sequence length.")
@click.option("--num-queries", type=click.IntRange(min=0), default=0, show_default=True,
              help="MQAR queries per sequence (0: min(pairs, slots)).")
@click.option("--corpus-chars", type=_pos, default=200_000, show_default=True,
              help="Size of the generated character corpus.")
# model config
@click.option("--vocab-size", type=_pos, default=_P.vocab_size, show_default=True)
@click.option("--d-model", type=_pos, default=_P.d_model, show_default=True)
@click.option("--layers", type=_pos, default=_P.n_layers, show_default=True)
@click.option("--heads", type=_pos, default=_P.n_heads, show_default=True)
@click.option("--head-dim", type=_pos, default=_P.head_dim, show_default=True)
@click.option("--slots", type=_pos, default=_P.n_slots, show_default=True, help="Memory slots m per head.")
@click.option("--chunk-size", type=_pos, default=_P.chunk_size, show_default=True,
              help="C (1: exact recurrence); 16 learns faster but drifts numerically over long streams.")
@click.option("--phi", type=_nl, default=_P.phi, show_default=True)
@click.option("--f", "f", type=_nl, default=_P.f, show_default=True)
@click.option("--rho", type=_nl, default=_P.rho, show_default=True)
@click.option("--qk-norm", type=click.Choice(QK_NORMS), default=_P.qk_norm, show_default=True)
@click.option("--ffn-dim", type=_pos, default=_P.ffn_dim, show_default=True)
@click.option("--beta-init", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=_P.beta_init,
              show_default=True, help="Initial forget gate beta (0.95 did not learn MQAR in 200 steps).")
@click.option("--gamma-init", type=click.FloatRange(0, 1, min_open=True, max_open=True),
              default=_P.gamma_init,
              show_default=True, help="Initial inner step size gamma (sigmoid of the gamma bias).")
@click.pass_context
def train(ctx: click.Context, out: str | None, resume: bool, state_path: str | None,
          stop_after: int | None, no_progress: bool, force: bool, eval_only: str | None,
          **opts: Any) -> None:
    """Train a model (default: a small MQAR model) and write an atomic checkpoint with training.json."""
    from trellis_export.config import TrellisConfig
    from trellis_export.train import (
        TrainArgs,
        default_state_path,
        eval_checkpoint,
        resume_settings,
    )
    from trellis_export.train import (
        train as run_train,
    )

    given = {k for k in opts
             if ctx.get_parameter_source(k) not in (click.core.ParameterSource.DEFAULT, None)}
    if eval_only is not None:
        from trellis_export.checkpoint import default_checkpoint_path
        from trellis_export.data import MQARSpec
        from trellis_export.train import checkpoint_mqar_spec, checkpoint_task
        path = str(default_checkpoint_path()) if eval_only == "default" else eval_only
        spec = None                     # the task stored with the checkpoint, unless flags change it
        spec_flags = {"vocab_size", "num_pairs", "seq_len", "num_queries"} & given
        task = opts["task"] if "task" in given else None
        if spec_flags and (task or checkpoint_task(path)) == "charlm":
            raise click.UsageError(f"--{sorted(spec_flags)[0].replace('_', '-')} sets the MQAR task, but "
                                   f"{path} is scored as a character LM")
        if spec_flags:
            base = checkpoint_mqar_spec(path)
            spec = MQARSpec(**{k: (opts[k] if k in spec_flags or base is None else getattr(base, k))
                               for k in ("vocab_size", "num_pairs", "seq_len", "num_queries")})
        kw: dict[str, Any] = {"num_examples": opts["eval_examples"] if "eval_examples" in given else 1024}
        if "seed" in given:
            kw["seed"] = opts["seed"]
        report = eval_checkpoint(path, spec=spec, task=task, **kw)
        click.echo(json.dumps(report, indent=2, sort_keys=True))
        return
    if out is None:
        raise click.UsageError("--out DIR is required (or use --eval-only CKPT)")

    train_kw: dict[str, Any] = {field: opts[flag] for flag, field in _TRAIN_FLAGS.items()}
    cfg_kw: dict[str, Any] = {field: opts[flag] for flag, field in _CONFIG_FLAGS.items()}
    if resume:   # flags not given on this command line come from the stored run
        stored_args, stored_cfg = resume_settings(state_path or default_state_path(out))
        train_kw = {field: (opts[flag] if flag in given else getattr(stored_args, field))
                    for flag, field in _TRAIN_FLAGS.items()}
        train_kw["corpus_seed"] = stored_args.corpus_seed
        cfg_kw = {field: (opts[flag] if flag in given else getattr(stored_cfg, field))
                  for flag, field in _CONFIG_FLAGS.items()}
        for name in ("conv_size", "eps", "norm_eps", "tie_embeddings"):
            cfg_kw[name] = getattr(stored_cfg, name)
    config = TrellisConfig(**cfg_kw)
    args = TrainArgs(**train_kw)
    command = "trellis-export " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    t0 = time.time()
    result = run_train(args, config, out, state_path=state_path, resume=resume, stop_after=stop_after,
                       progress=not no_progress, extra_metadata={"command": command}, force=force)
    summary = {"out": out, "step": result.step, "eval": result.final_eval, "fingerprint": result.fingerprint,
               "wall_minutes_this_run": round((time.time() - t0) / 60.0, 2)}
    click.echo(json.dumps(summary, sort_keys=True))
