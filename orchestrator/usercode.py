"""The user's Python code: where it imports from, what its import errors say, and
reloading it while `orchestrator dev` runs.

A `python` task names `module:function`. The module imports from the pipelines
folder (ORCHESTRATOR_PIPELINES_DIR, `pipelines/` by default), which every runtime
puts on the import path: the embedded one, the CLI's, and the deployed functions',
whose source archive carries that folder. A command given pipeline files from
another folder (`pipelines sync PATH`, `run --file`, `dev --pipelines`) puts that
folder on its own import path too.

A module that cannot be imported can never succeed: its error, whatever it is
(a SyntaxError, an ImportError, an exception raised at import), is a
`PermanentError` naming the file and line.
"""

from __future__ import annotations

import importlib
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any

from orchestrator.errors import PermanentError

_lock = threading.RLock()
# Folders user code imports from, in the order they were added.
_paths: list[Path] = []
# Module name -> the mtime of its file when it was (re)loaded.
_loaded: dict[str, float] = {}


class ImportFailed(PermanentError):
    """A user module that cannot be imported."""


def add_path(folder: str | Path) -> Path | None:
    """Make the modules in `folder` importable (first on the path, as Python does for a
    script's own folder). A folder that does not exist is ignored."""
    path = Path(folder).expanduser().resolve()
    if not path.is_dir():
        return None
    with _lock:
        if path not in _paths:
            _paths.append(path)
            _is_user.clear()
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))
    return path


def search_paths() -> list[Path]:
    with _lock:
        return list(_paths)


_is_user: dict[str, bool] = {}


def is_user_file(file: str | None) -> bool:
    if not file:
        return False
    found = _is_user.get(file)
    if found is None:
        path = Path(file).resolve()
        found = _is_user[file] = any(path.is_relative_to(p) for p in search_paths())
    return found


def import_module(name: str) -> ModuleType:
    """Import `name`; any failure is an `ImportFailed` that says where."""
    module = sys.modules.get(name)
    spec = getattr(module, "__spec__", None)
    # The hot path (every task of a `python` handler), unless another thread is still
    # importing it: then importlib waits for that import to finish.
    if module is not None and not getattr(spec, "_initializing", False):
        return module
    try:
        module = importlib.import_module(name)
    except (Exception, SystemExit) as exc:  # a module that exits at import cannot load either
        raise ImportFailed(describe_import_error(exc, name)) from exc
    _remember()
    return module


def load_callable(path: str) -> Callable[..., Any]:
    """The function named by `module:function` (`function` may be dotted)."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{path!r} is not of the form 'module:function'")
    obj: Any = import_module(module_name)
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            where = getattr(obj, "__file__", None) or getattr(obj, "__name__", repr(obj))
            raise ImportFailed(f"{module_name} has no {attr!r} (in {where})") from None
    if not callable(obj):
        raise ImportFailed(f"{path!r} is {type(obj).__name__}, not a function")
    return obj


def describe_import_error(exc: BaseException, name: str) -> str:
    """One line: what went wrong importing `name`, and at which file and line."""
    top = name.split(".")[0]
    if isinstance(exc, SyntaxError):
        # A SyntaxError's own location is the file being compiled, not a frame.
        where = f"{exc.filename}, line {exc.lineno}" if exc.lineno else f"{exc.filename}"
        return f"{type(exc).__name__}: {exc.msg} ({where})"
    if isinstance(exc, ModuleNotFoundError) and exc.name in (name, top):
        return (f"no module named {exc.name!r}: put {exc.name}.py (or a {exc.name}/ package) in "
                f"the pipelines folder ({_describe_paths()}), or install it")
    at = location(exc.__traceback__)
    suffix = f" (at {at})" if at else ""
    if isinstance(exc, ModuleNotFoundError):
        return f"{name} imports {exc.name!r}, which is not installed{suffix}"
    return f"{type(exc).__name__} while importing {name}: {exc}{suffix}"


def location(tb: TracebackType | None, *, prefer_user: bool = False) -> str | None:
    """`file:line in function` of the innermost frame outside the import machinery
    (with `prefer_user`, of the innermost frame in user code, if any)."""
    frames = []
    while tb is not None:
        code = tb.tb_frame.f_code
        frames.append((code.co_filename, tb.tb_lineno or 0, code.co_name))
        tb = tb.tb_next
    return frame_location(frames, prefer_user=prefer_user)


def frame_location(frames: list[tuple[str, int, str]], *, prefer_user: bool = False,
                   ) -> str | None:
    """The same, for (file, line, function) frames, innermost last."""
    frames = [f for f in frames if not f[0].startswith("<frozen importlib")]
    if prefer_user:
        frames = [f for f in frames if not _is_library(f[0])]
    if not frames:
        return None
    file, line, func = frames[-1]
    return f"{file}:{line} in {func}" if func != "<module>" else f"{file}:{line}"


def _is_library(file: str) -> bool:
    path = os.path.abspath(file)
    own = os.path.dirname(os.path.abspath(__file__))
    return (path.startswith(own + os.sep) or "site-packages" in path or "dist-packages" in path
            or path.startswith(os.path.dirname(os.__file__) + os.sep) or file.startswith("<"))


def _describe_paths() -> str:
    paths = search_paths()
    if not paths:
        from orchestrator.settings import get_settings

        return (f"ORCHESTRATOR_PIPELINES_DIR={get_settings().pipelines_dir}, "
                "which does not exist here")
    return ", ".join(str(p) for p in paths)


# -- reloading, for `orchestrator dev` --------------------------------------------------------


def _user_modules() -> dict[str, ModuleType]:
    out = {}
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        if module is not None and is_user_file(file):
            out[name] = module
    return out


def _mtime(module: ModuleType) -> float | None:
    try:
        return os.stat(module.__file__ or "").st_mtime
    except OSError:
        return None


def _remember() -> None:
    with _lock:
        for name, module in _user_modules().items():
            if name not in _loaded:
                mtime = _mtime(module)
                if mtime is not None:
                    _loaded[name] = mtime


def reload_changed() -> list[tuple[str, str | None]]:
    """Reload every user module whose file changed since it was loaded: (name, None)
    for each one reloaded, (name, error) for one that failed (the old one stays)."""
    done: list[tuple[str, str | None]] = []
    with _lock:
        for name, module in sorted(_user_modules().items()):
            mtime = _mtime(module)
            if mtime is None:
                continue
            seen = _loaded.setdefault(name, mtime)
            if mtime == seen:
                continue
            _loaded[name] = mtime
            try:
                importlib.reload(module)
            except Exception as exc:
                done.append((name, describe_import_error(exc, name)))
            else:
                done.append((name, None))
    return done


def outside_pipelines_dir(specs: list[Any], pipelines_dir: Path) -> list[str]:
    """Warnings for `python` tasks whose module sits beside a pipeline file that is not
    in the pipelines folder: the syncing command imports it, other processes won't."""
    home = pipelines_dir.expanduser().resolve()
    out = []
    for spec in specs:
        folder = spec.base_dir
        if folder is None or Path(folder).resolve() == home:
            continue
        for task in spec.tasks:
            target = task.config.get("callable") if task.handler == "python" else None
            if not isinstance(target, str):
                continue
            top = target.partition(":")[0].split(".")[0]
            if (Path(folder) / f"{top}.py").is_file() or (Path(folder) / top).is_dir():
                out.append(
                    f"task {task.name!r} of {spec.name} imports {top} from {folder}, which is "
                    f"not the pipelines folder ({home}, ORCHESTRATOR_PIPELINES_DIR): this "
                    "command finds it, other processes and the deployed functions will not; "
                    "keep pipelines and their modules in that folder, or point "
                    "ORCHESTRATOR_PIPELINES_DIR here")
    return out
