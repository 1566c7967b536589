"""Keys of the ``metadata_props`` of exported models (torch-free: runtimes import them)."""

from __future__ import annotations

META_CONFIG = "trellis.config"                    # config JSON (TrellisConfig.to_dict, sorted keys)
META_STATE_SPEC = "trellis.state_spec"            # state.state_spec_json(config, activation_dtype)
META_FINGERPRINT = "trellis.fingerprint"          # checkpoint.model_fingerprint of the source model
META_EXPORTER_VERSION = "trellis.exporter_version"  # trellis_export.__version__
META_OPSET = "trellis.opset"                      # default-domain opset of the graph and function
META_ACTIVATION_DTYPE = "trellis.activation_dtype"  # "float32" | "float16"

ALL_KEYS: tuple[str, ...] = (META_CONFIG, META_STATE_SPEC, META_FINGERPRINT, META_EXPORTER_VERSION,
                             META_OPSET, META_ACTIVATION_DTYPE)
