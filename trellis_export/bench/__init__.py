"""``trellis-export bench``: decode / prefill latency of Trellis models per memory size against a
KV-cache Transformer of the same width, on the torch / ort / triton / trt backends.

* :mod:`.parse` (sizes like ``1k``, warm-up amounts), :mod:`.stats` (percentiles, CV, timing loop),
* :mod:`.synthetic` (states at context N), :mod:`.backends` (availability, timed calls),
* :mod:`.run` (:func:`run_bench`, crossover, aims), :mod:`.report` (tables, plot),
  :mod:`.machine` (the machine description).
"""

from ..runtime import BACKENDS as SESSION_BACKENDS
from .parse import Amount, parse_amount, parse_size, parse_size_list, split_choices
from .stats import latency_stats, time_calls

#: What ``bench --backend`` takes: every session backend, plus ``triton`` (the PyTorch model with the
#: Triton memory kernels on a GPU, a model backend rather than a session).
BACKENDS: tuple[str, ...] = (*SESSION_BACKENDS[:2], "triton", *SESSION_BACKENDS[2:])
#: Measured when ``--backend`` is not given.
DEFAULT_BACKENDS: tuple[str, ...] = ("torch", "ort")

__all__ = ["Amount", "BACKENDS", "DEFAULT_BACKENDS", "latency_stats", "parse_amount", "parse_size",
           "parse_size_list", "split_choices", "time_calls"]
