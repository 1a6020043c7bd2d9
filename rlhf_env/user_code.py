"""The user's own code named on the command line: ``MODULE:FUNCTION`` or ``path/to/file.py:FUNCTION``.

Imported only when a flag names it (``--reward my_rewards:correct``, a prompt file's
``verifier=my_rewards:correct``): nothing is imported by discovery. ``MODULE`` is a dotted module
name, found on ``sys.path`` or in the current folder; a ``.py`` path is loaded as a file.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import re
import sys
from pathlib import Path

from rlhf_env.errors import MissingFileError, SettingError

_REF = re.compile(r"^(?P<module>.+\.py|[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*):(?P<attr>[A-Za-z_]\w*)$")


def is_code_ref(value: str) -> bool:
    """True for ``MODULE:FUNCTION`` or ``FILE.py:FUNCTION`` (FUNCTION an identifier, so no ``=``)."""
    return isinstance(value, str) and _REF.match(value.strip()) is not None


def code_ref_spec(value: str) -> str:
    """How a run records the reference: a ``.py`` path made absolute (a resume from elsewhere finds it)."""
    module, attr = _split(value)
    return f"{Path(module).expanduser().resolve()}:{attr}" if module.endswith(".py") else f"{module}:{attr}"


def load_callable(value: str, where: str = "reward"):
    """The callable ``value`` names; a missing file, module or attribute, or a non-callable, is a clear error.

    ``where`` starts every message (``reward 'my_rewards:correct'``).
    """
    module_name, attr = _split(value)
    module = _import_file(module_name, where) if module_name.endswith(".py") else _import_module(module_name, where)
    if not hasattr(module, attr):
        public = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise SettingError(
            f"{where}: module {module_name} has no attribute {attr!r}; its functions: {', '.join(public) or 'none'}"
        )
    fn = getattr(module, attr)
    if not callable(fn):
        raise SettingError(f"{where}: {module_name}.{attr} is not callable (a {type(fn).__name__}); name a function")
    return fn


def _split(value: str) -> tuple[str, str]:
    m = _REF.match(value.strip())
    if m is None:
        raise SettingError(f"expected MODULE:FUNCTION or path/to/file.py:FUNCTION, got {value!r}")
    return m["module"], m["attr"]


def _import_module(name: str, where: str):
    # The ``rlhf`` script does not put the current folder on sys.path, where a user's module usually is.
    added = "" not in sys.path and str(Path.cwd()) not in sys.path
    if added:
        sys.path.insert(0, str(Path.cwd()))
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name and (name == exc.name or name.startswith(exc.name + ".")):
            raise SettingError(
                f"{where}: no module named {exc.name!r} (looked in the current folder and sys.path; "
                "a file is named path/to/file.py:FUNCTION)"
            ) from None
        raise SettingError(f"{where}: importing {name} failed: {exc}") from exc
    except Exception as exc:  # the user's module raised while importing
        raise SettingError(f"{where}: importing {name} raised {type(exc).__name__}: {exc}") from exc
    finally:
        if added:
            sys.path.remove(str(Path.cwd()))


def _import_file(path_text: str, where: str):
    path = Path(path_text).expanduser().resolve()
    if not path.is_file():
        raise MissingFileError(f"{where}: no such file {path}")
    stem = re.sub(r"\W", "_", path.stem)
    name = f"rlhf_user_{stem}_{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"
    if name in sys.modules:  # the same file named twice (a reward and a verifier): one module
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise SettingError(f"{where}: importing {path} raised {type(exc).__name__}: {exc}") from exc
    return module
