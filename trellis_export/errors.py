"""Errors that the CLI reports as one clear line and a non-zero exit (no traceback)."""


class TrellisExportError(Exception):
    """Base of every user-facing error: bad input files, flags, tensors or states."""
