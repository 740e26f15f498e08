"""metaverify's checking engine.

The public API is re-exported here; the code lives in private modules.
Backends (``verify.backends.torch``, ``verify.backends.jax``) are imported
lazily: ``import verify`` never imports torch or jax.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
