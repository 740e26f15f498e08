"""Ready audits: idiomatic meta-learning code of popular libraries, in metaverify's calling contract.

``metaverify audit --library higher --algorithm maml`` (or
``verify.audit(verify.adapters.load_adapter("higher", "maml"), "maml")``)
checks what a user of the library gets when following its documented idiom:

* ``higher``: ``higher.innerloop_ctx(model, SGD, copy_initial_weights=False)``
  (:mod:`verify.adapters.higher`);
* ``torchopt``: the differentiable optimiser ``torchopt.MetaSGD`` (plain SGD
  steps kept in the graph; not Li et al.'s Meta-SGD) with
  ``extract_state_dict`` / ``recover_state_dict`` between tasks
  (:mod:`verify.adapters.torchopt`);
* ``learn2learn``: ``l2l.algorithms.MAML`` / ``MetaSGD`` with ``clone()`` and
  ``adapt()`` (:mod:`verify.adapters.learn2learn`).

The adapter modules import torch and their library at import time; this
package does not, and :func:`load_adapter` turns a missing or broken library
into a clear :class:`AdapterUnavailableError` with the reason.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from reference.errors import InvalidInputError

#: library -> (adapter module, algorithms it implements, install hint)
LIBRARIES: dict[str, tuple[str, tuple[str, ...], str]] = {
    "higher": ("verify.adapters.higher", ("maml", "fomaml", "anil"), "pip install higher"),
    "torchopt": ("verify.adapters.torchopt", ("maml", "anil"), "pip install torchopt"),
    "learn2learn": ("verify.adapters.learn2learn", ("maml", "fomaml", "anil", "metasgd"),
                    "pip install learn2learn (0.2.0 has no wheel for Python >= 3.11 and its C extension does not "
                    "build there: longintrepr.h moved in CPython 3.11)"),
}


class AdapterUnavailableError(InvalidInputError):
    """The library behind an adapter is not installed or cannot be imported."""


def availability(library: str) -> tuple[bool, str]:
    """``(True, "")`` when the adapter of ``library`` imports, else ``(False, reason)``."""
    if library not in LIBRARIES:
        raise InvalidInputError(f"library={library!r} is unknown; choose one of {', '.join(LIBRARIES)}")
    module, _, hint = LIBRARIES[library]
    try:
        importlib.import_module(module)
    except ImportError as exc:
        return False, f"{library} cannot be imported ({type(exc).__name__}: {exc}); install it with: {hint}"
    return True, ""


def load_adapter(library: str, algorithm: str) -> Callable[..., Any]:
    """The adapter function of ``library`` for ``algorithm`` (calling contract of ``verify.audit``)."""
    ok, reason = availability(library)
    if not ok:
        raise AdapterUnavailableError(reason)
    module, algorithms, _ = LIBRARIES[library]
    if algorithm not in algorithms:
        raise InvalidInputError(f"--library {library} implements {', '.join(algorithms)}, not {algorithm!r}")
    return getattr(importlib.import_module(module), algorithm)


__all__ = ["LIBRARIES", "AdapterUnavailableError", "availability", "load_adapter"]
