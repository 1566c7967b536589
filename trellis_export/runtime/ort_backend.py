"""The ONNX Runtime streaming backend. Importing or running it never imports torch.

The model's ``metadata_props`` carry the config, the state spec and the fingerprint (written by the
exporter); the session reads them from there, checks that the graph's inputs and outputs are the ones
the spec names, and reports the execution providers ONNX Runtime actually uses
(``InferenceSession.get_providers()``), not the ones requested.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..config import ConfigError, TrellisConfig
from ..errors import first_line
from ..export.meta import META_ACTIVATION_DTYPE, META_CONFIG, META_FINGERPRINT, META_STATE_SPEC
from ..state import state_spec
from .base import Session, SessionError, StateDict

_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
              "tensor(int64)": "int64"}


def default_providers() -> list[str]:
    """CUDA when this onnxruntime build has it, then CPU."""
    import onnxruntime as ort

    have = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in have]


def check_providers(requested: Sequence[str], allow_fallback: bool = False) -> list[str]:
    """The requested providers this onnxruntime build lacks; raises SessionError for a name onnxruntime
    does not know (a typo) always, and for a known but unavailable one unless ``allow_fallback``."""
    import onnxruntime as ort

    known, available = ort.get_all_providers(), ort.get_available_providers()
    typos = [p for p in requested if p not in known]
    if typos:
        raise SessionError(f"unknown execution provider(s) {', '.join(typos)}; this onnxruntime has "
                           f"{', '.join(available)}")
    missing = [p for p in requested if p not in available]
    if missing and not allow_fallback:
        raise SessionError(f"execution provider(s) {', '.join(missing)} not available in this onnxruntime "
                           f"build (available: {', '.join(available)}); pass allow_fallback=True "
                           "(--allow-fallback) to run on the others")
    return missing


#: Default ``OrtSession(prefill_budget_bytes=...)``: 256 MiB (the bundled model at B = 1 takes calls of
#: up to ~116k tokens whole; H = 8, m = d = 64, C = 16 at B = 8 runs in pieces of 1,632 tokens).
PREFILL_BUDGET_BYTES = 256 << 20


class OrtSession(Session):
    """Streams an exported Trellis ONNX model with onnxruntime.

    ``providers``: execution providers to request (default: CUDA if available, then CPU); the ones in use
    are in ``self.providers`` and any requested one that did not load is in ``self.providers_missing``.
    A requested provider that is unknown is an error; one that is not available (or did not load) is an
    error unless ``allow_fallback=True``.
    ``threads``: intra-op threads (None: onnxruntime's default). ``profile``: a file prefix to enable
    ORT profiling (see :meth:`end_profiling`). ``function_body``: the TrellisMemory body ONNX Runtime
    runs (``"ort"``, default: the portable body of the file swapped in memory for one with a
    loop-free T = 1 decode step; ``"portable"`` / ``"as-is"``: the file's own body, as e.g. Triton's
    onnxruntime backend would run it); see :func:`trellis_export.export.ort.ort_model_source`.
    ``ort_graph``: ``"lean"`` (default): decode calls (T = 1) run a straight-line T = 1 graph and
    calls with T > 1 a lean graph whose Loop does only the sequential state pass, both built in memory
    from the file's weights with ORT contrib ops (:mod:`trellis_export.export.ort_rewrite`,
    :mod:`trellis_export.export.ort_prefill`; two InferenceSessions, so the weights are held twice);
    ``"lean-std"``: the same without contrib ops; ``"exported"``: the file's graph for every T.
    ``describe()`` records what runs (``decode_graph``, ``prefill_graph``) and, when a lean graph
    could not be built, why (``decode_graph_reason``, ``prefill_graph_reason``).
    ``prefill_budget_bytes``: what the lean prefill graph may keep per layer for the read-out (the
    chunk-start memories and inner gradients of every chunk of a call); longer calls run in pieces
    (:meth:`prefill_piece_tokens`), with the same result.
    """

    backend = "ort"

    def __init__(self, model_path: str | os.PathLike[str], *, providers: Sequence[str] | None = None,
                 threads: int | None = None, profile: str | None = None,
                 optimization: str = "all", allow_fallback: bool = False, function_body: str = "ort",
                 ort_graph: str = "lean", prefill_budget_bytes: int = PREFILL_BUDGET_BYTES) -> None:
        import onnxruntime as ort

        path = Path(model_path)
        if not path.is_file():
            raise SessionError(f"{path}: no such ONNX model file")
        so = ort.SessionOptions()
        so.log_severity_level = 3
        levels = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                  "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                  "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                  "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}
        if optimization not in levels:
            raise SessionError(f"optimization must be one of {', '.join(levels)}, got {optimization!r}")
        so.graph_optimization_level = levels[optimization]
        if threads is not None:
            so.intra_op_num_threads = int(threads)
            so.inter_op_num_threads = 1
        if profile:
            so.enable_profiling = True
            so.profile_file_prefix = str(profile)
        requested = list(providers) if providers else default_providers()
        unknown = check_providers(requested, allow_fallback)
        from ..export.ort import ort_model_sources

        try:
            sources = ort_model_sources(path, so, function_body, ort_graph)
        except ValueError as exc:
            raise SessionError(str(exc)) from None
        except Exception as exc:  # onnx raises DecodeError / OSError on a file that is not a model
            msg = first_line(exc)
            raise SessionError(f"{path}: not a readable ONNX model ({msg})") from None
        self.function_body = function_body
        self.ort_graph = ort_graph
        use = [p for p in requested if p not in unknown] or ["CPUExecutionProvider"]
        if sources.prefill_graph != "exported":
            try:
                self.session = ort.InferenceSession(sources.model, sess_options=so, providers=use)
            except Exception as exc:  # a provider without the contrib ops, say: run the export for T > 1
                sources.prefill_graph = "exported"
                sources.prefill_reason = f"onnxruntime refused it ({first_line(exc)})"
                sources.model = ort_model_sources(path, so, function_body, "exported").model
        if sources.prefill_graph == "exported":
            try:
                self.session = ort.InferenceSession(sources.model, sess_options=so, providers=use)
            except Exception as exc:  # onnxruntime raises its own Fail / InvalidProtobuf / InvalidGraph ...
                msg = first_line(exc)
                raise SessionError(f"{path}: onnxruntime cannot load this model ({msg})") from None
        self.decode_graph = sources.decode_graph
        self.decode_graph_reason = sources.reason
        self.prefill_graph = sources.prefill_graph
        self.prefill_graph_reason = sources.prefill_reason
        self.prefill_budget_bytes = int(prefill_budget_bytes)
        self.decode_session: Any = None
        self._decode_reset = sources.reset
        self._decode_outputs: list[str] = []
        self._host_snapshot = False
        self._snapshot_names: list[tuple[str, str, str]] = []
        if sources.decode is not None:
            dso = ort.SessionOptions()
            for attr in ("log_severity_level", "graph_optimization_level", "intra_op_num_threads",
                         "inter_op_num_threads"):
                setattr(dso, attr, getattr(so, attr))
            if profile:
                dso.enable_profiling = True
                dso.profile_file_prefix = f"{profile}_decode"
            try:
                self.decode_session = ort.InferenceSession(sources.decode, sess_options=dso, providers=use)
                self._decode_outputs = [o.name for o in self.decode_session.get_outputs()]
                # a lean graph without present.*_snapshot outputs takes the chunk-start snapshot as input
                self._host_snapshot = len(self._decode_outputs) < len(self.session.get_outputs())
                snaps = [i.name for i in self.decode_session.get_inputs() if i.name.endswith("_snapshot")]
                self._snapshot_names = [(n.replace("_snapshot", "_memory"), n, n[len("past."):])
                                        for n in snaps] if self._host_snapshot else []
            except Exception as exc:  # a provider without the contrib ops, say: decode on the export
                msg = first_line(exc)
                self.decode_graph, self.decode_graph_reason = "exported", f"onnxruntime refused it ({msg})"
        self.model_path = str(path)
        self.providers = list(self.session.get_providers())
        self.providers_requested = requested
        self.providers_missing = sorted(set(unknown) | (set(requested) - set(self.providers)))
        if self.providers_missing and not allow_fallback:
            raise SessionError(f"{path}: onnxruntime did not load the requested execution provider(s) "
                               f"{', '.join(self.providers_missing)} (it runs on "
                               f"{', '.join(self.providers)}); "
                               "pass allow_fallback=True (--allow-fallback) to accept that")
        self.allow_fallback = allow_fallback
        self.metadata: dict[str, str] = dict(self.session.get_modelmeta().custom_metadata_map)
        self._read_metadata(path)
        self._check_graph(path)

    # ------------------------------------------------------------------ metadata and graph
    def _read_metadata(self, path: Path) -> None:
        cfg_text = self.metadata.get(META_CONFIG)
        if cfg_text is None:
            raise SessionError(f"{path}: no Trellis config in the model's metadata_props (key "
                               f"'{META_CONFIG}'); export the model with trellis-export")
        try:
            self.config = TrellisConfig.from_json(cfg_text, source=f"{path} metadata '{META_CONFIG}'")
        except ConfigError as exc:
            raise SessionError(str(exc)) from None
        fp = self.metadata.get(META_FINGERPRINT)
        if not fp:
            raise SessionError(f"{path}: no fingerprint in the model's metadata_props (key "
                               f"'{META_FINGERPRINT}')")
        self.fingerprint = fp
        spec_text = self.metadata.get(META_STATE_SPEC)
        act = self.metadata.get(META_ACTIVATION_DTYPE)
        if spec_text is not None:
            try:
                spec = json.loads(spec_text)
            except json.JSONDecodeError:
                raise SessionError(f"{path}: metadata '{META_STATE_SPEC}' is not valid JSON") from None
            mine = [t.to_dict() for t in state_spec(self.config)]
            if not isinstance(spec, dict) or spec.get("tensors") != mine:
                raise SessionError(f"{path}: the state spec in metadata '{META_STATE_SPEC}' does not "
                                   "match the state spec of the model's config")
            act = act or spec.get("activation_dtype")
        self._metadata_activation = act

    def _check_graph(self, path: Path) -> None:
        ins = {i.name: i for i in self.session.get_inputs()}
        outs = {o.name: o for o in self.session.get_outputs()}
        problems = []
        for name in ["input_ids"] + [t.past_name for t in self.state_spec]:
            if name not in ins:
                problems.append(f"missing input '{name}'")
        for name in ["logits"] + [t.present_name for t in self.state_spec]:
            if name not in outs:
                problems.append(f"missing output '{name}'")
        if problems:
            raise SessionError(f"{path}: graph does not follow the state spec: " + "; ".join(problems))
        conv = next(t for t in self.state_spec if t.dtype == "activation")
        act = _ORT_TYPES.get(ins[conv.past_name].type)
        if act not in ("float32", "float16"):
            raise SessionError(f"{path}: input '{conv.past_name}' has type {ins[conv.past_name].type}, "
                               "expected tensor(float) or tensor(float16)")
        if self._metadata_activation not in (None, act):
            raise SessionError(f"{path}: metadata says activation dtype {self._metadata_activation} but "
                               f"input '{conv.past_name}' is {act}")
        self.activation_dtype = act
        self.memory_dtype = "float32"
        self._input_names = ["input_ids"] + [t.past_name for t in self.state_spec]
        self._output_names = ["logits"] + [t.present_name for t in self.state_spec]
        self._state_names = [t.name for t in self.state_spec]

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out.update(model=self.model_path, function_body=self.function_body, ort_graph=self.ort_graph,
                   decode_graph=self.decode_graph, decode_graph_reason=self.decode_graph_reason,
                   prefill_graph=self.prefill_graph, prefill_graph_reason=self.prefill_graph_reason,
                   prefill_budget_bytes=self.prefill_budget_bytes,
                   decode_host_reset=self.decode_session is not None and self._decode_reset is not None,
                   providers_requested=self.providers_requested,
                   providers_missing=self.providers_missing)
        return out

    # ------------------------------------------------------------------ run
    def check_input_ids(self, input_ids: Any) -> np.ndarray:
        """:meth:`Session.check_input_ids` with a fast path for the decode loop's common case (a small
        C-contiguous int64 ``[B, T]`` array inside the vocabulary: checked in Python, ~3 us cheaper
        than two numpy reductions); anything else goes through the shared check and its errors."""
        if (type(input_ids) is np.ndarray and input_ids.dtype == np.int64 and input_ids.ndim == 2
                and 0 < input_ids.size <= 64 and input_ids.flags.c_contiguous):
            flat = input_ids.ravel().tolist()
            if min(flat) >= 0 and max(flat) < self.config.vocab_size:
                return input_ids
        return super().check_input_ids(input_ids)

    def _run(self, input_ids: np.ndarray, state: StateDict) -> tuple[np.ndarray, StateDict]:
        feeds = {"input_ids": input_ids}
        for name in self._state_names:
            feeds["past." + name] = state[name]
        if input_ids.shape[1] == 1 and self.decode_session is not None:
            return self._run_decode(feeds, state["position"])
        piece = self.prefill_piece_tokens(input_ids.shape[0])
        if input_ids.shape[1] <= piece:
            res = self._call(self.session, self._output_names, feeds)
            return res[0], dict(zip(self._state_names, res[1:]))
        # a long call in pieces (spec section 6: any split of a stream gives the same result), so the
        # lean prefill graph's per-chunk scan outputs stay within the budget
        logits, out = [], dict(state)
        for start in range(0, input_ids.shape[1], piece):
            feeds = {"input_ids": np.ascontiguousarray(input_ids[:, start:start + piece]),
                     **{"past." + name: out[name] for name in self._state_names}}
            res = self._call(self.session, self._output_names, feeds)
            logits.append(res[0])
            out = dict(zip(self._state_names, res[1:]))
        return np.concatenate(logits, axis=1), out

    def prefill_piece_tokens(self, batch: int) -> int:
        """The most tokens one call of the lean prefill graph takes at ``batch`` rows: its Scan keeps
        per chunk the chunk-start memories and inner gradients of every row (``B * 2H * (m d + C m)``
        float32 per layer, alive until the read-out), so a longer call runs in pieces of this many
        tokens (a multiple of C) to keep that within ``prefill_budget_bytes``. Unbounded for the
        exported graph (its Loop keeps only the running state)."""
        if self.prefill_graph == "exported":
            return 1 << 62
        c = self.config
        per_chunk = 4 * batch * 2 * c.n_heads * (c.n_slots * c.head_dim + c.chunk_size * c.n_slots)
        return max(1, self.prefill_budget_bytes // per_chunk) * c.chunk_size

    @staticmethod
    def _call(sess: Any, outputs: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        # InferenceSession.run is a Python wrapper (input-name checks, provider fallback) around
        # _sess.run; calling the latter directly saves ~5 us a call (docs/ort_performance.md). Any
        # failure goes through the public run, which raises onnxruntime's own error.
        fast = getattr(sess, "_sess", None)
        if fast is not None:
            try:
                return fast.run(outputs, feeds, None)
            except Exception:
                pass
        return sess.run(outputs, feeds)

    def _run_decode(self, feeds: dict[str, np.ndarray], position: np.ndarray) -> tuple[np.ndarray, StateDict]:
        """T = 1 on the lean graph, doing on the host what it leaves out (ort_rewrite host_reset /
        host_snapshot): rows at position 0 get M0 and a zero conv cache (copies, only on calls that have
        such rows), and the snapshot inputs get this token's chunk-start snapshot S (the memory array
        itself when every row starts a chunk, the stored one when none does, np.where otherwise), which
        is also the present snapshot returned."""
        small = position.shape[0] <= 32          # Python on a short list beats numpy's per-call cost
        pos = position.tolist() if small else position
        if self._decode_reset is not None and (0 in pos if small else not pos.all()):
            fresh = position == 0                  # rare: a stream's first token
            for name, value in self._decode_reset.items():
                x = feeds["past." + name].copy()
                x[fresh] = value
                feeds["past." + name] = x
        snaps: dict[str, np.ndarray] = {}
        if self._host_snapshot:
            C = self.config.chunk_size
            if small:
                starts = [p % C == 0 for p in pos]
                every, some = all(starts), any(starts)
                start = np.array(starts) if some and not every else None
            else:
                start = position % C == 0
                every, some = bool(start.all()), bool(start.any())
            for mem_name, snap_name, key in self._snapshot_names:
                mem, snap = feeds[mem_name], feeds[snap_name]
                if every:
                    s = mem
                elif some:
                    assert start is not None
                    s = np.where(start[:, None, None, None], mem, snap)
                else:
                    s = snap
                feeds[snap_name] = snaps[key] = s
        res = self._call(self.decode_session, self._decode_outputs, feeds)
        out = dict(zip((o[len("present."):] for o in self._decode_outputs[1:]), res[1:]))
        out.update(snaps)
        return res[0], {name: out[name] for name in self._state_names}

    def end_profiling(self) -> str:
        """Stop ORT profiling; returns the JSON trace file's path (of the exported graph's session; the
        lean decode session's trace: :meth:`end_profiling_all`)."""
        return self.end_profiling_all()["model"]

    def end_profiling_all(self) -> dict[str, str]:
        """Stop ORT profiling of every session: ``{"model": trace, "decode": trace}`` (the latter
        only with a lean decode graph)."""
        out = {"model": self.session.end_profiling()}
        if self.decode_session is not None:
            out["decode"] = self.decode_session.end_profiling()
        return out
