"""The serving environment: where ``trellis-export serve --setup`` puts the Triton server.

Location: ``$TRELLIS_SERVING_HOME`` if set, else ``$XDG_CACHE_HOME/trellis-export/serving`` (default
``~/.cache/trellis-export/serving``). It holds:

* ``venv/``: a virtual environment of *this* interpreter's Python version with ``nvidia-pytriton``
  (installed ``--no-deps``: only its ``tritonserver`` tree is used, never its Python API; its own
  requirement numpy < 2 is not installed), and the project's numpy, onnxruntime, onnx and safetensors.
  With numpy 2 the stub's numpy hand-over gives empty outputs, so the model moves tensors by DLPack
  (see ``triton_model.py``). The stub ``python_backend_stubs/<py>/triton_python_backend_stub`` is copied into
  ``backends/python/``.
* ``venv/trellis_src/trellis_export``: a symlink to this package, on the venv's path through a
  ``.pth`` file, so the python-backend model imports the same :class:`StreamPool` (never a copy).
* ``serving.json``: what was installed (versions, paths); written last, so its presence means done.

:func:`setup` is idempotent: a complete environment for the same Python and pins is left alone.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from ..errors import TrellisExportError
from ..fileio import atomic_write_bytes

#: What the serving venv installs (the project's pins; nvidia-pytriton goes in --no-deps).
PYTRITON_PIN = "nvidia-pytriton==0.7.0"
VENV_PINS: tuple[str, ...] = ("numpy==2.4.6", "onnxruntime==1.32.0", "onnx==1.23.2", "safetensors>=0.4")
MANIFEST = "serving.json"
ENV_VAR = "TRELLIS_SERVING_HOME"


class ServingEnvError(TrellisExportError):
    """The serving environment is missing or broken; the message says what to run."""


def serving_home() -> Path:
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "trellis-export" / "serving"


def _py_tag() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


@dataclass(frozen=True)
class ServingEnv:
    """Paths of a set-up serving environment."""

    home: Path
    venv: Path
    server_root: Path          # the tritonserver tree: bin/, backends/, caches/
    libs: Path                 # nvidia_pytriton.libs
    python: str

    @property
    def tritonserver(self) -> Path:
        return self.server_root / "bin" / "tritonserver"

    @property
    def backend_dir(self) -> Path:
        return self.server_root / "backends"

    def process_env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """Environment for the tritonserver process (LD_LIBRARY_PATH, PATH, no stray PYTHONPATH)."""
        env = dict(os.environ if base is None else base)
        libdir = sysconfig.get_config_var("LIBDIR") or ""
        parts = [p for p in (libdir, str(self.libs), env.get("LD_LIBRARY_PATH", "")) if p]
        env["LD_LIBRARY_PATH"] = ":".join(parts)
        env["PATH"] = str(self.venv / "bin") + os.pathsep + env.get("PATH", "")
        env["VIRTUAL_ENV"] = str(self.venv)
        env.pop("PYTHONPATH", None)       # the project's numpy 2 must not leak into the stub
        env.pop("PYTHONHOME", None)
        return env


def _site_packages(venv: Path) -> Path:
    return venv / "lib" / f"python{_py_tag()}" / "site-packages"


def load_env(home: Path | None = None) -> ServingEnv:
    """The set-up environment, or :class:`ServingEnvError` saying to run ``serve --setup``."""
    home = home or serving_home()
    man = home / MANIFEST
    hint = "run `trellis-export serve --setup` first"
    if not man.is_file():
        raise ServingEnvError(f"no serving environment at {home} ({MANIFEST} missing); {hint}")
    try:
        data = json.loads(man.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ServingEnvError(f"{man}: unreadable ({exc}); {hint} again") from None
    env = ServingEnv(home=home, venv=Path(data["venv"]), server_root=Path(data["server_root"]),
                     libs=Path(data["libs"]), python=data["python"])
    if data.get("python") != _py_tag():
        raise ServingEnvError(f"the serving environment at {home} was made for Python {data.get('python')}, "
                              f"this is Python {_py_tag()}; {hint} again")
    for p in (env.tritonserver, env.backend_dir / "python" / "triton_python_backend_stub",
              env.venv / "bin" / "python"):
        if not p.exists():
            raise ServingEnvError(f"the serving environment at {home} lacks {p}; {hint} again")
    return env


def _run(cmd: list[str], what: str, log: list[str]) -> None:
    log.append("$ " + " ".join(cmd))
    res = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if res.returncode != 0:
        tail = "\n".join(res.stdout.strip().splitlines()[-15:])
        raise ServingEnvError(f"{what} failed (exit {res.returncode}):\n{tail}")


def setup(home: Path | None = None, *, force: bool = False, echo=print) -> ServingEnv:
    """Make the serving environment (idempotent); returns it."""
    home = home or serving_home()
    if not force:
        try:
            env = load_env(home)
            man = json.loads((home / MANIFEST).read_text(encoding="utf-8"))
            if man.get("pins") == [PYTRITON_PIN, *VENV_PINS] and _link_ok(env):
                echo(f"serving environment ready at {home} (nothing to do)")
                return env
        except ServingEnvError:
            pass
    if sys.platform != "linux":
        raise ServingEnvError("the Triton server of nvidia-pytriton runs on Linux x86_64 only")
    _check_libpython()
    home.mkdir(parents=True, exist_ok=True)
    (home / MANIFEST).unlink(missing_ok=True)
    venv = home / "venv"
    log: list[str] = []
    if force and venv.exists():
        shutil.rmtree(venv)
    if not (venv / "bin" / "python").exists():
        echo(f"creating venv {venv}")
        _run([sys.executable, "-m", "venv", str(venv)], "python -m venv", log)
    vpy = str(venv / "bin" / "python")
    echo(f"installing {PYTRITON_PIN} (server binary only, ~55 MB) and {', '.join(VENV_PINS)}")
    _run([vpy, "-m", "pip", "install", "-q", "--disable-pip-version-check", *VENV_PINS],
         "pip install (serving venv)", log)
    _run([vpy, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps", PYTRITON_PIN],
         f"pip install {PYTRITON_PIN}", log)
    site = _site_packages(venv)
    server_root = site / "pytriton" / "tritonserver"
    libs = site / "nvidia_pytriton.libs"
    stub = server_root / "python_backend_stubs" / _py_tag() / "triton_python_backend_stub"
    if not stub.is_file():
        raise ServingEnvError(f"{PYTRITON_PIN} has no python backend stub for Python {_py_tag()} ({stub})")
    target = server_root / "backends" / "python" / "triton_python_backend_stub"
    shutil.copy2(stub, target)
    target.chmod(0o755)
    (server_root / "bin" / "tritonserver").chmod(0o755)
    # this package, linked (not copied) into the venv: the python-backend model imports it
    src = venv / "trellis_src"
    src.mkdir(exist_ok=True)
    link = src / "trellis_export"
    pkg = Path(__file__).resolve().parent.parent
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(pkg, target_is_directory=True)
    (site / "trellis_export_src.pth").write_text(str(src) + "\n", encoding="utf-8")
    env = ServingEnv(home=home, venv=venv, server_root=server_root, libs=libs, python=_py_tag())
    # the venv must import the runtime with its own numpy
    check = subprocess.run([vpy, "-c", "import numpy, onnxruntime, trellis_export.runtime.pool as p; "
                            "print(numpy.__version__, onnxruntime.__version__)"],
                           capture_output=True, text=True, env=env.process_env())
    if check.returncode != 0:
        raise ServingEnvError("the serving venv cannot import trellis_export.runtime.pool:\n"
                              + check.stderr.strip()[-2000:])
    np_v, ort_v = check.stdout.split()
    manifest = {"python": _py_tag(), "venv": str(venv), "server_root": str(server_root), "libs": str(libs),
                "pins": [PYTRITON_PIN, *VENV_PINS], "numpy": np_v, "onnxruntime": ort_v,
                "package": str(pkg), "tritonserver": "2.51.0 (r24.10, from nvidia-pytriton 0.7.0)"}
    atomic_write_bytes(home / MANIFEST, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    echo(f"serving environment ready at {home} (numpy {np_v}, onnxruntime {ort_v})")
    return env


def _link_ok(env: ServingEnv) -> bool:
    link = env.venv / "trellis_src" / "trellis_export"
    try:
        return link.resolve() == Path(__file__).resolve().parent.parent
    except OSError:
        return False


def _check_libpython() -> None:
    """The python-backend stub links libpython<ver>.so: this interpreter must have one."""
    import ctypes.util
    import glob

    libdir = sysconfig.get_config_var("LIBDIR") or ""
    if glob.glob(os.path.join(libdir, f"libpython{_py_tag()}*.so*")) or ctypes.util.find_library(
            f"python{_py_tag()}"):
        return
    raise ServingEnvError(f"this Python ({sys.executable}) has no shared libpython{_py_tag()}.so, which "
                          "Triton's python-backend stub links; use a Python built with --enable-shared "
                          "(pyenv: PYTHON_CONFIGURE_OPTS=--enable-shared pyenv install ...; Debian/Ubuntu: "
                          f"apt install libpython{_py_tag()})")
