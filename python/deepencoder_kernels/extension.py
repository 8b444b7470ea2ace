"""The C++ extension ``deepencoder_kernels._C``, loaded once.

``DEEPENCODER_KERNELS_EXTENSION=/path/to/_C....so`` loads another build of it instead (the CI's
AddressSanitizer + UBSan build runs the same tests that way).
"""
from __future__ import annotations

import importlib.util
import os
from types import ModuleType

ENV_VAR = "DEEPENCODER_KERNELS_EXTENSION"


def _load() -> tuple[ModuleType | None, str | None]:
    path = os.environ.get(ENV_VAR)
    try:
        if path:
            spec = importlib.util.spec_from_file_location("deepencoder_kernels._C", path)
            if spec is None or spec.loader is None:
                return None, f"{ENV_VAR}={path} is not a loadable extension module"
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module, None
        from . import _C

        return _C, None
    except ImportError as e:
        return None, f"the C++ extension is not built ({e})"


EXTENSION, MISSING = _load()


def missing() -> str | None:
    """Why the extension cannot be used (None when it can): a dispatcher requirement."""
    return MISSING
