"""Every file and directory a trellis-export command writes goes through this module (torch-free).

Three pieces, used by every command and writer:

* :func:`claim_outputs` resolves and checks all output paths of a command *before* any work starts:
  the parent directory exists and is writable (a probe file is created and removed there), a file
  output is not a directory, a directory output is only replaced when it is what trellis-export wrote
  before (a :data:`MARKER` file, or a recognisable checkpoint) unless ``force``, no output equals or
  lies inside an input (and no input lies inside an output directory), and no two outputs collide.
* :func:`temporary_sibling` makes the hidden temporary file or directory a write goes through,
  registered so that it is removed on any error, on SIGINT and on SIGTERM (see :func:`signals_raise`);
  :func:`replace_dir` swaps a finished directory in place, the previous one restored on failure.
* :func:`write_error` turns an ``OSError`` at write time into an :class:`OutputError` that names the
  path and the reason (``strerror``) in one line; :func:`atomic_write_bytes` is the file writer built
  on all of the above.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import TrellisExportError, first_line

__all__ = ["MARKER", "OutputError", "Terminated", "OutputSpec", "claim_outputs", "write_error",
           "temporary_sibling", "remove_temporaries", "live_temporaries", "signals_raise", "replace_dir",
           "atomic_write_bytes", "write_file", "current_umask", "is_checkpoint_dir", "write_marker"]

#: Written into directories trellis-export makes (work directories), so a later run may reuse or
#: replace them without ``--force``.
MARKER = ".trellis-export"
#: Files a checkpoint directory written by trellis-export holds.
CHECKPOINT_FILES = frozenset({"config.json", "model.safetensors", "training.json", MARKER})

PathLike = str | os.PathLike[str]


class OutputError(TrellisExportError):
    """An output path cannot be used or written; the message names the path and the reason."""


class Terminated(SystemExit):
    """Raised in the main thread by SIGTERM / SIGHUP while :func:`signals_raise` is active, so that
    ``finally`` blocks (temporary-file removal) run; exit status 128 + signal number."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum
        self.signame = signal.Signals(signum).name


def current_umask() -> int:
    """The process umask (read without changing it for longer than one call)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_error(path: PathLike, exc: OSError, what: str = "cannot write") -> OutputError:
    """One line naming ``path`` and the reason of ``exc`` (its strerror, e.g. 'No space left on device')."""
    reason = exc.strerror or (first_line(exc))
    return OutputError(f"{path}: {what} ({reason})")


# --------------------------------------------------------------------------- claiming outputs
@dataclass(frozen=True)
class OutputSpec:
    """One output of a command.

    ``kind``: ``"file"`` (written atomically, replaced), ``"dir"`` (a directory written whole and
    swapped in: an existing one is replaced only when :func:`is_replaceable_dir` says so) or
    ``"workdir"`` (a directory the command adds files to and reuses; created with a marker).
    ``flag`` names the option in messages. ``companions``: files written beside the output
    (``model.onnx.data``, a training state) that get the same checks. ``parents``: missing parent
    directories are created at write time (reports, checkpoints); the nearest existing ancestor must then
    be a writable directory. Without it (ONNX exports) the parent directory must exist. ``owns``: for a
    directory, recognises the names of files this command writes there (a directory holding only such
    files counts as written by trellis-export).
    """

    path: PathLike
    flag: str = "output"
    kind: str = "file"
    companions: tuple[PathLike, ...] = ()
    parents: bool = False
    owns: Callable[[str], bool] | None = None


def _real(path: PathLike) -> Path:
    return Path(os.path.realpath(os.path.expanduser(os.fspath(path))))


def _inside(child: Path, parent: Path) -> bool:
    return child != parent and parent in child.parents


def is_checkpoint_dir(path: Path) -> bool:
    """A directory holding exactly the files trellis-export writes into a checkpoint."""
    try:
        names = {p.name for p in path.iterdir()}
    except OSError:
        return False
    return {"config.json", "model.safetensors"} <= names and names <= CHECKPOINT_FILES


def is_replaceable_dir(path: Path, owns: Callable[[str], bool] | None = None) -> bool:
    """Whether an existing directory may be replaced without --force: empty, marked, a checkpoint, or
    holding only files that ``owns`` recognises."""
    try:
        names = sorted(p.name for p in path.iterdir())
    except OSError:
        return False
    return (not names or MARKER in names or is_checkpoint_dir(path)
            or (owns is not None and all(owns(n) for n in names)))


def write_marker(directory: PathLike) -> None:
    """Mark ``directory`` as made by trellis-export (see :data:`MARKER`)."""
    marker = Path(directory) / MARKER
    if not marker.exists():
        try:
            marker.write_text("This directory was written by trellis-export; it may be replaced by the "
                              "next run that writes here.\n")
        except OSError as exc:
            raise write_error(marker, exc) from None


def _probe(directory: Path, dest: Path) -> None:
    """Create and remove a file in ``directory``: the only reliable writability test (ACLs, read-only
    mounts, quotas on inodes)."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=".trellis-probe-", dir=directory)
    except OSError as exc:
        raise OutputError(f"{dest}: cannot write into {directory} ({exc.strerror or exc})") from None
    os.close(fd)
    os.unlink(tmp)


def _listing(path: Path, limit: int = 3) -> str:
    try:
        names = sorted(p.name for p in path.iterdir())
    except OSError:
        return ""
    shown = ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")
    return f" ({shown})" if shown else ""


def claim_outputs(outputs: Sequence[OutputSpec], inputs: Iterable[PathLike | None] = (), *,
                  force: bool = False) -> list[Path]:
    """Check every output of a command before it starts; returns the absolute output paths in order.

    Raises :class:`OutputError` naming the path, the flag and the reason. ``inputs`` (None entries are
    skipped) are the files and directories the command reads: no output may equal one, lie inside one,
    or (for directory outputs) contain one. ``force`` allows replacing a directory that trellis-export
    did not write; it never allows replacing an input or the current directory.
    """
    ins = [(_real(p), os.fspath(p)) for p in inputs if p is not None]
    cwd = _real(os.getcwd())
    seen: dict[Path, str] = {}
    replaced_dirs = [(_real(s.path), s.flag) for s in outputs if s.kind == "dir"]
    result: list[Path] = []
    for spec in outputs:
        raw = os.fspath(spec.path)
        if not raw.strip():
            raise OutputError(f"{spec.flag}: empty output path")
        dest = Path(os.path.abspath(os.path.expanduser(raw)))
        targets = [(dest, spec.kind)] + [(Path(os.path.abspath(os.fspath(c))), "file")
                                         for c in spec.companions]
        for path, kind in targets:
            real = _real(path)
            label = raw if path == dest else str(path)
            if real in seen:
                raise OutputError(f"{label}: written twice by this command ({seen[real]} and {spec.flag}); "
                                  "give each output its own path")
            seen[real] = spec.flag
            for d, d_flag in replaced_dirs:
                if _inside(real, d):
                    raise OutputError(f"{label}: lies inside the directory {d_flag} replaces whole; give "
                                      f"{spec.flag} a path outside it")
            for inp, inp_raw in ins:
                if real == inp:
                    raise OutputError(f"{label}: is also an input of this command; {spec.flag} must name "
                                      "another path (the input would be overwritten)")
                if _inside(real, inp):
                    raise OutputError(f"{label}: lies inside the input {inp_raw}; {spec.flag} must name a "
                                      "path outside it")
                if kind == "dir" and _inside(inp, real):       # it would be replaced whole
                    raise OutputError(f"{label}: contains the input {inp_raw}; {spec.flag} must name "
                                      "another directory")
            if kind == "file":
                if raw.endswith(("/", os.sep)) and path == dest or path.is_dir():
                    raise OutputError(f"{label}: is a directory; {spec.flag} expects a file path")
                if path.exists() and not path.is_file():
                    raise OutputError(f"{label}: exists and is not a regular file; {spec.flag} will not "
                                      "replace it")
            else:
                if path.exists() and not path.is_dir():
                    raise OutputError(f"{label}: exists and is not a directory; {spec.flag} expects a "
                                      "directory")
                if kind == "dir" and (real == cwd or _inside(cwd, real)):
                    raise OutputError(f"{label}: is the current directory or contains it; {spec.flag} "
                                      "must name a directory of its own")
                if kind == "dir" and path.is_dir() and not force and not is_replaceable_dir(path, spec.owns):
                    raise OutputError(f"{label}: directory holds files trellis-export did not write"
                                      f"{_listing(path)}; it would be replaced whole. Choose another "
                                      f"{spec.flag}, or pass --force to replace it")
                if kind == "workdir" and path.is_dir():
                    if not force and not is_replaceable_dir(path, spec.owns):
                        raise OutputError(f"{label}: directory holds files trellis-export did not write"
                                          f"{_listing(path)}; choose another {spec.flag} or pass --force")
                    _probe(path, path)
            parent = path.parent
            if spec.parents:
                while not parent.exists() and parent != parent.parent:
                    parent = parent.parent
            if parent.exists() and not parent.is_dir():
                raise OutputError(f"{parent}: is not a directory, so {spec.flag} {label} cannot be written")
            if not parent.is_dir():
                raise OutputError(f"{parent}: output directory does not exist (for {spec.flag} {label})")
            _probe(parent, path)
        result.append(dest)
    return result


# --------------------------------------------------------------------------- temporaries
_LIVE: set[Path] = set()
_LIVE_LOCK = threading.Lock()


def live_temporaries() -> list[Path]:
    """Temporary paths currently registered (for tests and diagnostics)."""
    with _LIVE_LOCK:
        return sorted(_LIVE)


def _remove(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists() or path.is_symlink():
            path.unlink()
    except OSError:
        pass


def remove_temporaries() -> None:
    """Remove every registered temporary (called on SIGINT / SIGTERM and at CLI exit)."""
    with _LIVE_LOCK:
        paths = list(_LIVE)
        _LIVE.clear()
    for p in paths:
        _remove(p)


@contextlib.contextmanager
def temporary_sibling(dest: PathLike, *, directory: bool = False, tag: str = "") -> Iterator[Path]:
    """A hidden temporary file or directory beside ``dest`` (same filesystem, so a rename is atomic),
    with the usual mode of a new file / directory (not mkstemp's 0600 / 0700). It is removed when the
    block exits unless it was renamed away; an OSError creating it becomes an :class:`OutputError`."""
    dest = Path(dest)
    prefix = f".{dest.name}.{tag}" if tag else f".{dest.name}."
    try:
        if directory:
            tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=dest.parent))
            os.chmod(tmp, 0o777 & ~current_umask())
        else:
            fd, name = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=dest.parent)
            os.close(fd)
            tmp = Path(name)
            os.chmod(tmp, 0o666 & ~current_umask())
    except OSError as exc:
        raise write_error(dest, exc) from None
    with _LIVE_LOCK:
        _LIVE.add(tmp)
    try:
        yield tmp
    finally:
        with _LIVE_LOCK:
            _LIVE.discard(tmp)
        _remove(tmp)


def write_file(path: PathLike, data: bytes) -> None:
    """The one low-level write of a (temporary) file: open, write, flush, fsync. Every writer of this
    package calls it through this module, so fault tests can make it fail (ENOSPC) for all of them."""
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write a file through a temporary sibling and a rename: readers never see half a file, and on
    any failure (ENOSPC, EACCES ...) the previous file is intact and an :class:`OutputError` names the
    path and the reason. The file gets the usual mode of a new file (0666 less the umask)."""
    dest = Path(path)
    if dest.is_dir():
        raise OutputError(f"{dest}: is a directory; expected a file path")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise write_error(dest, exc) from None
    with temporary_sibling(dest) as tmp:
        try:
            write_file(tmp, data)
            os.replace(tmp, dest)
        except OSError as exc:
            raise write_error(dest, exc) from None


def replace_dir(tmp: Path, dest: Path) -> None:
    """Move the finished directory ``tmp`` to ``dest``; an existing ``dest`` is moved aside first and
    restored if the swap fails (callers check with :func:`claim_outputs` that it may be replaced)."""
    old = None
    try:
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            if old.exists():
                _remove(old)
            with _LIVE_LOCK:
                _LIVE.add(old)
            os.replace(dest, old)
        os.replace(tmp, dest)
    except BaseException as exc:
        if old is not None and old.exists() and not dest.exists():
            os.replace(old, dest)        # the previous directory goes back where it was
        if isinstance(exc, OSError):
            raise write_error(dest, exc) from None
        raise
    finally:
        if old is not None:
            with _LIVE_LOCK:
                _LIVE.discard(old)
            if dest.exists():
                _remove(old)


# --------------------------------------------------------------------------- signals
@contextlib.contextmanager
def signals_raise(signals: Sequence[int] = (signal.SIGTERM, getattr(signal, "SIGHUP", signal.SIGTERM)),
                  on_signal: Callable[[int], None] | None = None) -> Iterator[None]:
    """While active (main thread only), SIGTERM / SIGHUP raise :class:`Terminated` and SIGINT raises
    KeyboardInterrupt, so ``finally`` blocks remove temporaries; a second signal during that cleanup is
    ignored. Previous handlers are restored afterwards; registered temporaries are removed on the way out
    of an interrupted block."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous: dict[int, object] = {}
    fired = False

    def handler(signum: int, frame: object) -> None:
        nonlocal fired
        if fired:
            return
        fired = True
        if on_signal is not None:
            on_signal(signum)
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise Terminated(signum)

    for s in dict.fromkeys([*signals, signal.SIGINT]):
        try:
            previous[s] = signal.getsignal(s)
            if s == signal.SIGINT and previous[s] is signal.SIG_IGN:
                continue
            signal.signal(s, handler)
        except (ValueError, OSError):   # not settable here
            previous.pop(s, None)
    try:
        yield
    except BaseException:
        remove_temporaries()
        raise
    finally:
        for s, h in previous.items():
            with contextlib.suppress(ValueError, OSError, TypeError):
                signal.signal(s, h)  # type: ignore[arg-type]
