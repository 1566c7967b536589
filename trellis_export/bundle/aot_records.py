"""``python -m trellis_export.bundle.aot_records``: the plugin's AOT launch records for a bundle, in a
process of its own (the kernels cannot be compiled where they were imported under TRITON_INTERPRET).

The records are the ones :func:`trellis_export.plugins_trt.plugin_v3.compile_records` makes at engine
build time, from the same arguments (``plugin_v3.record_arguments``: decode ``fused_recurrent``, the
one-launch ``chunk`` fallback and the split prefill ``chunk_state`` + ``chunk_readout``, every
specialisation the plugin can pick), per target, in the plugin's order. Only the PTX ISA
(``Target.ptx_versions``, else ``kernels.aot.DEFAULT_PTX_VERSION``) and the cubin
(``Target.cubin_ccs``, besides ``kernels.aot.CUBIN_TARGETS``) follow the bundle's target.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from trellis_export.config import TrellisConfig
from trellis_export.errors import TrellisExportError


def compile_records(config: TrellisConfig, ccs: list[int], dtype: str, ptx_versions: dict[int, int],
                    cubin_ccs: list[int]) -> list[dict[str, Any]]:
    """Launch records, in the plugin's order (target, kernel, variant)."""
    from trellis_export.kernels.aot import CUBIN_TARGETS, compile_kernel
    from trellis_export.opdef import op_attributes
    from trellis_export.plugins_trt.plugin_v3 import record_arguments

    calls = record_arguments(op_attributes(config), heads=config.n_heads, slots=config.n_slots,
                             head_dim=config.head_dim, dtype=dtype)
    return [compile_kernel(kernel, cc, include_cubin=cc in CUBIN_TARGETS or cc in cubin_ccs,
                           ptx_version=ptx_versions.get(cc), **kw).to_dict()
            for cc in ccs for kernel, kw in calls]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trellis_export.bundle.aot_records")
    p.add_argument("--config", required=True)
    p.add_argument("--ccs", required=True, help="comma-separated compute capabilities, e.g. 87")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--ptx-versions", default="{}", help='JSON {"110": 90}')
    p.add_argument("--cubin", default="", help="comma-separated targets that also get the cubin")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    try:
        config = TrellisConfig.load(args.config)
        recs = compile_records(config, [int(c) for c in args.ccs.split(",")], args.dtype,
                               {int(k): int(v) for k, v in json.loads(args.ptx_versions).items()},
                               [int(c) for c in args.cubin.split(",") if c])
    except TrellisExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # triton's compiler raises many types; one line for the caller
        print(f"error: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}",
              file=sys.stderr)
        return 1
    with open(args.out, "w") as fh:
        json.dump(recs, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
