"""Optional packages (the [diffusers] extra, metric and prompt-format packages), imported on first use with an
error that says what needs them and the pip line that installs them."""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import MissingPackage, TDMError


def require(module: str, needed_by: str, install: str | None = None,
            error: type[TDMError] = MissingPackage) -> ModuleType:
    """`importlib.import_module(module)`, or `error`: "<needed_by> needs the `<package>` package, which is not
    installed: pip install <install>" (`install` defaults to the package's name)."""
    package = module.partition(".")[0]
    try:
        return importlib.import_module(module)
    except ImportError as err:
        missing = isinstance(err, ModuleNotFoundError) and err.name in (package, module)
        state = "which is not installed" if missing else f"which fails to import ({err})"
        raise error(f"{needed_by} needs the `{package}` package, {state}: pip install {install or package}") from None
