"""Implementations under test: the same algorithms written with a framework's autodiff.

``verify.backends.torch`` and ``verify.backends.jax`` mirror the ``reference``
modules name for name (``maml``, ``anil``, ``metasgd``, ``reptile``, ``newton``,
``imaml``, ``r2d2``, ``lrd2``, ``protonet``, ``matchingnet``). They are imported
lazily through :func:`load_backend` so that ``import verify`` works without
torch or jax installed.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from reference.errors import InvalidInputError

#: backend name -> (module, the distribution that provides it, install hint)
BACKENDS: dict[str, tuple[str, str, str]] = {
    "numpy": ("reference", "numpy", "pip install metaverify"),
    "torch": ("verify.backends.torch", "torch", "pip install 'metaverify[torch]'"),
    "jax": ("verify.backends.jax", "jax", "pip install 'metaverify[jax]'"),
}


class BackendUnavailableError(InvalidInputError):
    """A backend was requested but its framework is not installed."""


def is_available(name: str) -> bool:
    """Whether the framework behind backend ``name`` can be imported (without importing it)."""
    if name not in BACKENDS:
        raise InvalidInputError(f"backend={name!r} is unknown; choose one of {sorted(BACKENDS)}")
    return importlib.util.find_spec(BACKENDS[name][1]) is not None


def available_backends() -> list[str]:
    """Names of the backends whose framework is installed, in a fixed order."""
    return [name for name in BACKENDS if is_available(name)]


def load_backend(name: str) -> ModuleType:
    """Import and return the backend package ``name``; a clear error says how to install it."""
    if not is_available(name):
        module, dist, hint = BACKENDS[name]
        raise BackendUnavailableError(f"backend={name!r} needs {dist}, which is not installed; install it with: {hint}")
    try:
        return importlib.import_module(BACKENDS[name][0])
    except Exception as exc:  # installed, but importing it fails (broken build, missing shared library, ...)
        module, dist, hint = BACKENDS[name]
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise BackendUnavailableError(
            f"backend={name!r}: {dist} is installed but importing it failed: {type(exc).__name__}: {first}; "
            f"reinstall it (pip install --force-reinstall {dist}) or choose another backend") from exc


__all__ = ["BACKENDS", "BackendUnavailableError", "available_backends", "is_available", "load_backend"]
