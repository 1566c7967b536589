"""Errors that the CLI reports as one clear line and a non-zero exit (no traceback)."""


class TrellisExportError(Exception):
    """Base of every user-facing error: bad input files, flags, tensors or states."""


def first_line(exc: BaseException) -> str:
    """An exception's message in one line: its first non-empty line, else the exception's type name
    (what every one-line ``error:`` built from a library's exception shows)."""
    for line in str(exc).strip().splitlines():
        if line.strip():
            return line.strip()
    return type(exc).__name__
