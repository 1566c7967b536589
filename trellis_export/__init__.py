"""trellis-export: take a Trellis model from a PyTorch checkpoint to stateful streaming inference.

The reference model lives in :mod:`trellis_export.model`; the config in :mod:`trellis_export.config`;
the streaming state spec in :mod:`trellis_export.state`; checkpoints in
:mod:`trellis_export.checkpoint`. Importing this package does not import torch.
"""

__version__ = "0.1.0"
