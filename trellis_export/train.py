"""Training of Trellis language models on MQAR or the character corpus, with evaluation and resume.

* Optimiser: AdamW (no weight decay on gains, biases, embeddings' 1-D params and the learned M0),
  linear warmup then cosine decay to ``min_lr_ratio * lr``, gradient clipping by global norm.
* Forward: ``model(ids)`` (chunked memory mode), the same op the exported models stream.
* Data: every batch is a pure function of ``(seed, step)`` (see :mod:`trellis_export.data`), and the
  model is initialised from ``seed``; training is therefore deterministic and a resumed run continues
  exactly like an uninterrupted one.
* Checkpoints: :func:`trellis_export.checkpoint.save_checkpoint` (atomic) with the training metadata,
  also written to ``training.json``. The resume state (weights, AdamW moments, step, history) is ONE
  safetensors file with the JSON in its header, written through a temporary file and a rename; the
  weights in it make it self-consistent even if the process dies between the two writes.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .checkpoint import atomic_write_bytes, load_checkpoint, model_fingerprint, save_checkpoint
from .config import TrellisConfig
from .data import IGNORE, CharCorpus, MQARSpec, char_batch, char_eval_batches, mqar_batch
from .errors import TrellisExportError
from .model import TrellisLM
from .progress import progress_iter
from .threads import torch_threads

TASKS: tuple[str, ...] = ("mqar", "charlm")
STATE_FORMAT = "trellis-export-train-state"
#: Seed of the held-out MQAR evaluation stream (disjoint from every training stream by index offset).
EVAL_SEED = 20_251_231
_EVAL_INDEX_OFFSET = 1 << 40
#: Training arguments a resumed run may change (everything else must match the stored run).
RESUME_OVERRIDABLE: frozenset[str] = frozenset({"steps", "eval_every", "eval_examples", "threads"})


class TrainError(TrellisExportError):
    """Bad training arguments or an unusable resume state; the message says which and why."""


@dataclass(frozen=True)
class TrainArgs:
    """Everything that determines a training run besides the model config."""

    task: str = "mqar"
    steps: int = 1000
    batch_size: int = 32
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    eval_every: int = 100
    eval_examples: int = 256
    threads: int = 0                 # 0: min(2, cpu count)
    # MQAR
    num_pairs: int = 8
    seq_len: int = 64
    num_queries: int = 0
    # character LM
    corpus_chars: int = 200_000
    corpus_seed: int = 0

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise TrainError(f"task must be one of {', '.join(TASKS)}; got {self.task!r}")
        for name in ("steps", "batch_size", "eval_every", "eval_examples", "seq_len", "num_pairs"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise TrainError(f"training argument '{name}' must be an integer >= 1, got {v!r}")
        for name in ("warmup_steps", "threads", "num_queries", "seed", "corpus_seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise TrainError(f"training argument '{name}' must be an integer >= 0, got {v!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise TrainError(f"training argument 'lr' must be a finite number > 0, got {self.lr!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise TrainError(f"training argument 'min_lr_ratio' must be in [0, 1], got {self.min_lr_ratio!r}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise TrainError("training arguments 'weight_decay' and 'grad_clip' must be >= 0")

    def mqar_spec(self, vocab_size: int) -> MQARSpec:
        return MQARSpec(vocab_size=vocab_size, num_pairs=self.num_pairs, seq_len=self.seq_len,
                        num_queries=self.num_queries)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainArgs:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise TrainError(f"unknown training argument(s): {', '.join(unknown)}")
        return cls(**data)


@dataclass
class TrainResult:
    step: int
    final_eval: dict[str, float]
    history: list[dict[str, Any]] = field(default_factory=list)
    wall_seconds: float = 0.0
    fingerprint: str = ""


# --------------------------------------------------------------------------- helpers
def default_threads() -> int:
    return max(1, min(2, os.cpu_count() or 1))


def lr_at(step: int, args: TrainArgs) -> float:
    """Learning rate for optimiser step ``step`` (0-based): linear warmup, then cosine to the floor."""
    if args.warmup_steps and step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    span = max(1, args.steps - args.warmup_steps)
    progress = min(1.0, (step - args.warmup_steps) / span)
    floor = args.lr * args.min_lr_ratio
    return floor + (args.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def masked_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross entropy over positions whose target is not ``IGNORE``."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                           ignore_index=IGNORE)


def build_model(config: TrellisConfig, seed: int) -> TrellisLM:
    """A freshly initialised model; the initialisation is a function of ``seed`` only."""
    devnull = torch.random.fork_rng(devices=[])
    with devnull:
        torch.manual_seed(seed)
        return TrellisLM(config)


def make_optimizer(model: torch.nn.Module, args: TrainArgs) -> torch.optim.AdamW:
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 and "m0_" not in name else no_decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=args.lr, betas=(0.9, 0.95), eps=1e-8)


def check_compatible(args: TrainArgs, config: TrellisConfig) -> None:
    if args.task == "mqar":
        try:
            args.mqar_spec(config.vocab_size)
        except TrellisExportError as exc:
            raise TrainError(f"{exc} (vocab_size comes from the model config)") from None
    elif config.vocab_size < 128:
        raise TrainError(f"task charlm reads ASCII text and needs vocab_size >= 128, got {config.vocab_size}")


def _batch(args: TrainArgs, config: TrellisConfig, corpus: CharCorpus | None, step: int
           ) -> tuple[torch.Tensor, torch.Tensor]:
    if args.task == "mqar":
        return mqar_batch(args.mqar_spec(config.vocab_size), args.batch_size, args.seed, step)
    assert corpus is not None
    return char_batch(corpus.train, args.batch_size, args.seq_len, args.seed, step)


# --------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate_mqar(model: TrellisLM, spec: MQARSpec | None = None, *, num_examples: int = 256,
                  batch_size: int = 64, seed: int = EVAL_SEED, mode: str = "chunked") -> float:
    """Fraction of MQAR query answers whose argmax over the whole vocabulary is the right value.

    ``num_examples`` fresh sequences from the seeded evaluation stream (disjoint from training
    streams); ``spec`` defaults to the one stored in the model's checkpoint, else MQARSpec defaults.
    """
    if spec is None:
        spec = checkpoint_mqar_spec(getattr(model, "checkpoint_path", None)) or \
            MQARSpec(vocab_size=model.config.vocab_size)
    if spec.vocab_size > model.config.vocab_size:
        raise TrainError(f"MQAR vocab_size {spec.vocab_size} exceeds the model's {model.config.vocab_size}")
    was_training = model.training
    model.eval()
    correct = total = 0
    try:
        for i, start in enumerate(range(0, num_examples, batch_size)):
            b = min(batch_size, num_examples - start)
            ids, targets = mqar_batch(spec, b, seed, _EVAL_INDEX_OFFSET + i)
            logits, _ = model(ids.to(model.embed.weight.device), mode=mode)
            mask = targets != IGNORE
            pred = logits.argmax(-1).cpu()
            correct += int((pred[mask] == targets[mask]).sum())
            total += int(mask.sum())
    finally:
        model.train(was_training)
    return correct / max(total, 1)


@torch.no_grad()
def evaluate_charlm(model: TrellisLM, corpus: CharCorpus, *, seq_len: int = 64, batch_size: int = 32,
                    max_batches: int = 8) -> dict[str, float]:
    """Validation cross entropy (nats / char) and bits per character on the held-out split."""
    was_training = model.training
    model.eval()
    tot = n = 0.0
    try:
        for ids, targets in char_eval_batches(corpus.valid, batch_size, seq_len, max_batches):
            logits, _ = model(ids)
            tot += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                         reduction="sum"))
            n += targets.numel()
    finally:
        model.train(was_training)
    loss = tot / max(n, 1)
    return {"val_loss": loss, "val_bpc": loss / math.log(2)}


def evaluate(model: TrellisLM, args: TrainArgs, corpus: CharCorpus | None) -> dict[str, float]:
    if args.task == "mqar":
        acc = evaluate_mqar(model, args.mqar_spec(model.config.vocab_size), num_examples=args.eval_examples)
        return {"mqar_accuracy": acc}
    assert corpus is not None
    return evaluate_charlm(model, corpus, seq_len=args.seq_len,
                           max_batches=max(1, args.eval_examples // 32))


def read_training_metadata(path: str | os.PathLike[str] | None) -> dict[str, Any] | None:
    """The ``training.json`` of a checkpoint directory (None for the bundled default path), if any."""
    from .checkpoint import default_checkpoint_path
    root = Path(path) if path is not None else default_checkpoint_path()
    p = root / "training.json"
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise TrainError(f"{p}: not readable JSON ({exc})") from None


def checkpoint_mqar_spec(path: str | os.PathLike[str] | None) -> MQARSpec | None:
    """The MQAR task a checkpoint was trained on, from its ``training.json`` (None if not MQAR)."""
    meta = read_training_metadata(path) if path is not None else None
    if not meta or meta.get("task") != "mqar" or "data" not in meta:
        return None
    return MQARSpec(**meta["data"])


# --------------------------------------------------------------------------- resume state
def default_state_path(out: str | os.PathLike[str]) -> Path:
    """Where the resume state of a run writing checkpoint ``out`` lives: a sibling file."""
    out = Path(os.path.abspath(os.fspath(out)))
    return out.with_name(out.name + ".train-state.safetensors")


def run_fingerprint(args: TrainArgs, config: TrellisConfig) -> str:
    """sha256 of what identifies a training run: its config and the training arguments a resume may not
    change (everything but :data:`RESUME_OVERRIDABLE`). Stored in the resume state and the checkpoint."""
    import hashlib
    run_args = {k: v for k, v in args.to_dict().items() if k not in RESUME_OVERRIDABLE}
    blob = json.dumps({"args": run_args, "config": config.to_dict()}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def save_train_state(path: str | os.PathLike[str], model: TrellisLM, opt: torch.optim.Optimizer,
                     args: TrainArgs, step: int, history: list[dict[str, Any]], elapsed: float,
                     running_loss: float | None = None) -> None:
    from safetensors.torch import save
    tensors: dict[str, torch.Tensor] = {}
    for k, v in model.state_dict().items():
        tensors[f"model/{k}"] = v.detach().cpu().contiguous()
    sd = opt.state_dict()
    for idx, st in sd["state"].items():
        for k, v in st.items():
            t = v if torch.is_tensor(v) else torch.tensor(v)
            tensors[f"optim/{idx}/{k}"] = t.detach().cpu().contiguous()
    trainer = {"format": STATE_FORMAT, "step": step, "args": args.to_dict(),
               "config": model.config.to_dict(), "param_groups": sd["param_groups"],
               "history": history, "elapsed_seconds": elapsed, "running_loss": running_loss,
               "fingerprint": model_fingerprint(model), "run": run_fingerprint(args, model.config)}
    atomic_write_bytes(path, save(tensors, metadata={"trainer": json.dumps(trainer, sort_keys=True)}))


def read_train_state(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file
    p = Path(path)
    if not p.is_file():
        raise TrainError(f"{p}: no training state to resume from (it is written next to the checkpoint "
                         "at every evaluation)")
    try:
        with safe_open(str(p), framework="pt") as fh:
            meta = dict(fh.metadata() or {})
        tensors = load_file(str(p))
        trainer = json.loads(meta["trainer"])
    except (SafetensorError, OSError, ValueError, KeyError, RuntimeError) as exc:
        raise TrainError(f"{p}: not a readable training state ({type(exc).__name__})") from None
    if trainer.get("format") != STATE_FORMAT:
        raise TrainError(f"{p}: not a trellis-export training state")
    return trainer, tensors


def _restore(path: Path, trainer: dict[str, Any], tensors: dict[str, torch.Tensor], model: TrellisLM,
             opt: torch.optim.Optimizer) -> None:
    model_sd = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
    try:
        model.load_state_dict(model_sd)
    except RuntimeError as exc:
        raise TrainError(f"{path}: weights do not fit the model ({str(exc).splitlines()[0]})") from None
    state: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith("optim/"):
            _, idx, name = k.split("/", 2)
            state.setdefault(int(idx), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": trainer["param_groups"]})
    if model_fingerprint(model) != trainer["fingerprint"]:
        raise TrainError(f"{path}: fingerprint mismatch; the training state is corrupted")


def check_same_run(state_file: Path, trainer: dict[str, Any], out: Path, expected: str) -> None:
    """Refuse a resume state whose run fingerprint was edited, or that belongs to another run than the
    checkpoint at ``out`` (e.g. ``--state`` naming the state of another ``--out``)."""
    stored = trainer.get("run")
    if stored is not None and stored != expected:
        raise TrainError(f"{state_file}: its run fingerprint does not match its settings; the training "
                         "state was edited or is corrupted")
    meta = read_training_metadata(out) if (out / "training.json").is_file() else None
    if meta is not None and stored is not None and meta.get("run") not in (None, stored):
        raise TrainError(f"{state_file}: belongs to another training run than the checkpoint {out} (run "
                         f"{stored[:12]} vs {str(meta.get('run'))[:12]}); give the --state of that run, or "
                         "another --out")
    if meta is not None and isinstance(meta.get("step"), int) and meta["step"] > int(trainer["step"]):
        raise TrainError(f"{state_file}: is at step {trainer['step']} but the checkpoint {out} is at step "
                         f"{meta['step']}; it is not this checkpoint's resume state")


def resume_settings(path: str | os.PathLike[str]) -> tuple[TrainArgs, TrellisConfig]:
    """The training arguments and config stored in a resume state (for the CLI's defaults)."""
    trainer, _ = read_train_state(path)
    return TrainArgs.from_dict(trainer["args"]), TrellisConfig.from_dict(trainer["config"], source=str(path))


# --------------------------------------------------------------------------- the loop
def train(args: TrainArgs, config: TrellisConfig, out: str | os.PathLike[str], *,
          state_path: str | os.PathLike[str] | None = None, resume: bool = False,
          stop_after: int | None = None, progress: bool = True,
          log: Callable[[str], None] | None = None, extra_metadata: dict[str, Any] | None = None,
          force: bool = False) -> TrainResult:
    """Train (see :func:`_train`) with ``args.threads`` torch threads for the duration of the run only."""
    with torch_threads(args.threads or default_threads()):
        return _train(args, config, out, state_path=state_path, resume=resume, stop_after=stop_after,
                      progress=progress, log=log, extra_metadata=extra_metadata, force=force)


def _train(args: TrainArgs, config: TrellisConfig, out: str | os.PathLike[str], *,
           state_path: str | os.PathLike[str] | None = None, resume: bool = False,
           stop_after: int | None = None, progress: bool = True,
           log: Callable[[str], None] | None = None, extra_metadata: dict[str, Any] | None = None,
           force: bool = False) -> TrainResult:
    """Train and write the checkpoint ``out`` (and the resume state) at every evaluation and at the end.

    ``stop_after``: stop (with a checkpoint) once this many steps are done, as if interrupted; the
    schedule still spans ``args.steps``. ``resume``: continue from the state file; the stored
    arguments must equal ``args`` except for :data:`RESUME_OVERRIDABLE`, and the state must belong to the
    run that wrote ``out`` (:func:`check_same_run`).

    Both outputs are checked before training starts (:func:`trellis_export.outputs.claim_outputs`): an
    existing ``out`` is replaced only when it is a trellis-export checkpoint (or ``force``).
    """
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    from .outputs import OutputSpec, claim_outputs

    check_compatible(args, config)
    state_file = Path(state_path) if state_path is not None else default_state_path(out)
    out, state_file = claim_outputs([OutputSpec(out, "--out", kind="dir", parents=True),
                                     OutputSpec(state_file, "--state", parents=True)], force=force)
    torch.set_flush_denormal(True)
    corpus = CharCorpus.build(args.corpus_chars, args.corpus_seed) if args.task == "charlm" else None

    model = build_model(config, args.seed)
    model.train()
    opt = make_optimizer(model, args)
    step, elapsed = 0, 0.0
    history: list[dict[str, Any]] = []
    running: float | None = None       # smoothed training loss (part of the resume state)
    if resume:
        step, history, elapsed, running = _resume(state_file, args, config, out, model, opt)
        log(f"resumed from {state_file} at step {step}")
    end = args.steps if stop_after is None else min(args.steps, stop_after)

    def checkpoint(last_eval: dict[str, float]) -> str:
        save_train_state(state_file, model, opt, args, step, history, elapsed, running)
        meta = _checkpoint_metadata(args, config, step, history, last_eval, elapsed)
        meta.update(extra_metadata or {})
        return save_checkpoint(model, out, meta, force=force)

    last_eval: dict[str, float] = history[-1]["eval"] if history else {}
    fp = ""
    t_start = time.perf_counter() - elapsed

    def show() -> str:
        return "" if running is None else f"loss {running:.3f}"

    for s in progress_iter(range(step, end), f"train {args.task}", show, enabled=progress):
        lv = _train_step(model, opt, args, config, corpus, s)
        running = lv if running is None else 0.9 * running + 0.1 * lv
        step = s + 1
        if step % args.eval_every == 0 or step == end:
            elapsed = time.perf_counter() - t_start
            last_eval = evaluate(model, args, corpus)
            history.append({"step": step, "train_loss": round(running, 5), "lr": lr_at(s, args),
                            "minutes": round(elapsed / 60.0, 3), "eval": last_eval})
            log(f"step {step}/{args.steps}  loss {running:.4f}  "
                + "  ".join(f"{k} {v:.4f}" for k, v in last_eval.items())
                + f"  ({elapsed / 60.0:.1f} min)")
            fp = checkpoint(last_eval)
    if not fp:
        log(f"nothing to train: the run is at step {step} of {end}")
    elapsed = time.perf_counter() - t_start
    return TrainResult(step=step, final_eval=last_eval, history=history, wall_seconds=elapsed, fingerprint=fp)


def _resume(state_file: Path, args: TrainArgs, config: TrellisConfig, out: Path, model: TrellisLM,
            opt: torch.optim.Optimizer) -> tuple[int, list[dict[str, Any]], float, float | None]:
    """Restore model and optimizer from the resume state of the run that wrote ``out``; returns its
    step, history, elapsed seconds and smoothed loss. Refuses other settings or another run's state."""
    trainer, tensors = read_train_state(state_file)
    stored = TrainArgs.from_dict(trainer["args"])
    diff = [f"{k} (stored {v!r}, given {getattr(args, k)!r})" for k, v in stored.to_dict().items()
            if k not in RESUME_OVERRIDABLE and getattr(args, k) != v]
    stored_cfg = TrellisConfig.from_dict(trainer["config"], source=str(state_file))
    if stored_cfg != config:
        diff += [f"config.{k} (stored {v!r}, given {getattr(config, k)!r})"
                 for k, v in stored_cfg.to_dict().items() if getattr(config, k) != v]
    if diff:
        raise TrainError(f"{state_file}: cannot resume with different settings: " + "; ".join(diff))
    check_same_run(state_file, trainer, out, run_fingerprint(stored, stored_cfg))
    _restore(state_file, trainer, tensors, model, opt)
    return (int(trainer["step"]), list(trainer["history"]), float(trainer["elapsed_seconds"]),
            trainer.get("running_loss"))


def _train_step(model: TrellisLM, opt: torch.optim.Optimizer, args: TrainArgs, config: TrellisConfig,
                corpus: CharCorpus | None, s: int) -> float:
    """One optimiser step at step index ``s`` (learning-rate schedule, batch, loss, clipping); the loss."""
    for g in opt.param_groups:
        g["lr"] = lr_at(s, args)
    ids, targets = _batch(args, config, corpus, s)
    logits, _ = model(ids)
    loss = masked_loss(logits, targets)
    if not torch.isfinite(loss):
        raise TrainError(f"loss became {float(loss)} at step {s}; lower --lr or change the config")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if args.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
    opt.step()
    return float(loss.item())


def _checkpoint_metadata(args: TrainArgs, config: TrellisConfig, step: int, history: list[dict[str, Any]],
                         last_eval: dict[str, float], elapsed: float) -> dict[str, Any]:
    """What a checkpoint's training.json records about the run."""
    meta: dict[str, Any] = {
        "task": args.task, "args": args.to_dict(), "step": step, "steps": args.steps,
        "run": run_fingerprint(args, config), "seed": args.seed, "eval": last_eval, "history": history,
        "wall_minutes": round(elapsed / 60.0, 2), "threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, {platform.python_implementation()} "
                   f"{platform.python_version()}, torch {torch.__version__}"}
    if args.task == "mqar":
        meta["data"] = args.mqar_spec(config.vocab_size).to_dict()
        meta["mqar_accuracy"] = last_eval.get("mqar_accuracy")
    else:
        meta["data"] = {"corpus": "generate_corpus", "num_chars": args.corpus_chars,
                        "seed": args.corpus_seed, "seq_len": args.seq_len}
    return meta


def checkpoint_task(path: str | os.PathLike[str] | None) -> str | None:
    """The task a checkpoint was trained on (``training.json``), None when it does not say."""
    meta = read_training_metadata(path)
    task = meta.get("task") if meta else None
    return task if task in TASKS else None


def eval_checkpoint(path: str | os.PathLike[str] | None, *, spec: MQARSpec | None = None,
                    num_examples: int = 1024, seed: int = EVAL_SEED, task: str | None = None
                    ) -> dict[str, Any]:
    """Load a checkpoint and score it on the task it was trained on (``training.json``; ``task`` overrides):
    MQAR accuracy (on its trained MQAR spec unless ``spec`` is given), or for a character LM the
    validation loss and bits per character on its corpus. A checkpoint without training metadata is
    scored on MQAR, and the report says the task was assumed."""
    model = load_checkpoint(path)
    stored = checkpoint_task(model.checkpoint_path)
    chosen = task or stored or "mqar"
    if chosen not in TASKS:
        raise TrainError(f"task must be one of {', '.join(TASKS)}; got {chosen!r}")
    report: dict[str, Any] = {"checkpoint": model.checkpoint_path, "fingerprint": model.fingerprint,
                              "task": chosen, "task_source": ("given" if task else
                                                              "training.json" if stored else
                                                              "assumed (no training.json)")}
    if chosen == "charlm":
        if spec is not None:
            raise TrainError(f"{model.checkpoint_path}: a character-LM checkpoint has no MQAR task; "
                             "--num-pairs / --seq-len / --num-queries do not apply")
        meta = read_training_metadata(model.checkpoint_path) or {}
        data = meta.get("data") or {}
        num_chars = int(data.get("num_chars", TrainArgs.corpus_chars))
        corpus = CharCorpus.build(num_chars, int(data.get("seed", 0)))
        seq_len = int(data.get("seq_len", TrainArgs.seq_len))
        batches = max(1, num_examples // 32)
        report.update({"corpus": {"num_chars": num_chars, "seed": int(data.get("seed", 0)),
                                  "seq_len": seq_len}, "batches": batches,
                       **evaluate_charlm(model, corpus, seq_len=seq_len, max_batches=batches)})
        return report
    spec = spec or checkpoint_mqar_spec(model.checkpoint_path) or MQARSpec(vocab_size=model.config.vocab_size)
    acc = evaluate_mqar(model, spec, num_examples=num_examples, seed=seed)
    report.update({"mqar": spec.to_dict(), "examples": num_examples, "seed": seed, "mqar_accuracy": acc})
    return report
