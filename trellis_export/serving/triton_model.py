"""Triton python-backend model: Trellis streams behind Triton's sequence batcher.

``trellis-export triton-repo`` copies this file to ``<repo>/<name>/1/model.py``; it runs only inside
Triton's python-backend stub (``triton_python_backend_utils`` exists there only), in the serving venv
(``trellis-export serve --setup``), which has this package on its path.

The python backend has no implicit state (a ``sequence_batching { state [...] }`` block is accepted and
ignored), so each model instance keeps its sequences' states in a
:class:`~trellis_export.runtime.pool.StreamPool` keyed by ``request.correlation_id()``:

* a request with the START flag opens (or restarts) its sequence; one without START for an unknown
  sequence is refused ("send START first"), for an expired one refused as expired;
* END frees the state after the request ran (also when the request was refused);
* sequences idle for ``idle_seconds`` expire (Triton's own ``max_sequence_idle_microseconds`` is set
  longer, so the model can still say "expired" before Triton forgets the correlation id);
* all requests of one ``execute`` call (several sequences, from the ``oldest`` strategy) run through
  ``StreamPool.step_many``: one ONNX Runtime call per distinct T, rows at different positions;
* a bad request (ids outside the vocabulary, not [1, T]) gets an error response of its own; the other
  requests of the batch run normally; a refused START leaves the sequence without state (the next
  request needs START again), never with the state it had before.

Tensors: with numpy 2 in the stub's environment, ``as_numpy()`` / ``pb_utils.Tensor(name, array)`` hand
out outputs of the right shape and no bytes (measured: the client sees an empty array), so with numpy 2
tensors cross through DLPack (``np.from_dlpack`` / ``pb_utils.Tensor.from_dlpack``: exact bytes,
measured); with numpy 1.x (stock Triton images) the numpy path is used, because DLPack crashed the
24.10 stub there (measured with numpy 1.26). The serving venv has numpy 2 (the project's pin).

At load the model checks the ONNX file against the repository's config: the fingerprint and state spec
written by ``triton-repo`` must equal the ones in the ONNX metadata (a swapped model.onnx is refused).
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils  # only inside Triton's python backend stub

from trellis_export.runtime import InputError, open_session
from trellis_export.runtime.pool import PoolError, StreamExpired, StreamPool, UnknownStream

#: numpy 2: tensors cross the stub by DLPack (its numpy path hands out empty outputs); numpy 1: the
#: numpy path (DLPack crashed the 24.10 stub with numpy 1.26, measured).
_DLPACK = int(np.__version__.split(".")[0]) >= 2
FLAG_START = getattr(pb_utils, "TRITONSERVER_REQUEST_FLAG_SEQUENCE_START", 1)
FLAG_END = getattr(pb_utils, "TRITONSERVER_REQUEST_FLAG_SEQUENCE_END", 2)


def _param(config: dict[str, Any], key: str, default: str = "") -> str:
    """A string parameter of the model's config.pbtxt ('' when absent and no default)."""
    return str(config.get("parameters", {}).get(key, {}).get("string_value", default))


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        self.name = config["name"]
        model_dir = os.path.join(args["model_repository"], args["model_version"])
        path = os.path.join(model_dir, _param(config, "onnx_file", "model.onnx"))
        threads = int(_param(config, "ort_threads", "0") or 0)
        self.session = open_session("ort", model_path=path, providers=["CPUExecutionProvider"]
                                    if _param(config, "providers", "cpu") == "cpu" else None,
                                    threads=threads or None)
        want_fp = _param(config, "fingerprint")
        if want_fp and want_fp != self.session.fingerprint:
            raise pb_utils.TritonModelException(
                f"{path}: fingerprint {self.session.fingerprint[:12]} differs from the repository's "
                f"{want_fp[:12]} (model.onnx was replaced; run trellis-export triton-repo again)")
        want_spec = _param(config, "state_spec")
        if want_spec and json.loads(want_spec) != json.loads(self.session.state_spec_json()):
            raise pb_utils.TritonModelException(f"{path}: its state spec differs from the repository's")
        capacity = int(_param(config, "max_sequences", "64"))
        idle = float(_param(config, "idle_seconds", "60"))
        self.pool = StreamPool(self.session, capacity=capacity, idle_timeout=idle)
        self.vocab = self.session.config.vocab_size

    def execute(self, requests: list[Any]) -> list[Any]:
        n = len(requests)
        errors: list[str | None] = [None] * n
        work: dict[int, np.ndarray] = {}
        ends: list[int] = []
        cids: list[int] = []
        for i, req in enumerate(requests):
            cid = req.correlation_id()
            cids.append(cid)
            flags = req.flags()
            if flags & FLAG_END:
                ends.append(cid)
            try:
                if cid in work:
                    raise PoolError(f"sequence {cid}: two requests in one batch")
                tensor = pb_utils.get_input_tensor_by_name(req, "input_ids")
                if tensor is None:
                    raise InputError("input 'input_ids' missing")
                ids = np.from_dlpack(tensor) if _DLPACK else tensor.as_numpy()
                if ids.ndim != 2 or ids.shape[0] != 1 or ids.shape[1] < 1:
                    raise InputError(f"input_ids must be [1, T] with T >= 1 per request, got shape "
                                     f"{list(ids.shape)}")
                ids = self.pool.check_ids(cid, ids)
                if flags & FLAG_START:
                    self.pool.open(cid, reset=True)
                elif cid not in self.pool:
                    try:
                        self.pool.position(cid)
                    except StreamExpired as exc:
                        raise PoolError(f"sequence {cid} expired: {exc}; send a request with START to "
                                        "begin a new sequence") from None
                    except UnknownStream:
                        raise PoolError(f"sequence {cid} has no state on this model instance: its first "
                                        "request must carry START (or it already ended)") from None
                work[cid] = ids
            except Exception as exc:  # one bad request never fails the batch
                if flags & FLAG_START:   # a refused START still ends what the id held before
                    try:
                        self.pool.close(cid)
                    except PoolError:
                        pass
                errors[i] = f"sequence {cid}: {exc}" if not str(exc).startswith(("sequence", "stream")) \
                    else str(exc)
        results = self.pool.step_many(work, return_errors=True) if work else {}
        responses = []
        for i in range(n):
            cid = cids[i]
            res = results.get(cid)
            if errors[i] is None and isinstance(res, Exception):
                errors[i] = str(res)
            if errors[i] is not None:
                responses.append(pb_utils.InferenceResponse(output_tensors=[],
                                                            error=pb_utils.TritonError(errors[i])))
                continue
            assert res is not None       # every stream without an error has a result
            logits = np.ascontiguousarray(res[None], dtype=np.float32)
            out = (pb_utils.Tensor.from_dlpack("logits", logits) if _DLPACK
                   else pb_utils.Tensor("logits", logits))
            responses.append(pb_utils.InferenceResponse(output_tensors=[out]))
        for cid in ends:
            try:
                self.pool.close(cid)
            except PoolError:
                pass
        return responses

    def finalize(self) -> None:
        self.pool.close_all()
