"""metaverify's exception types, under :mod:`verify` (the one module is :mod:`reference.errors`).

``from verify.errors import InvalidInputError`` and ``from reference.errors import
InvalidInputError`` name the same class: the engine, the audit and the reference
raise the types of that one module, re-exported here whole.
"""

import reference.errors as _errors
from reference.errors import *  # noqa: F401,F403  (the same classes, one definition)

__all__ = list(_errors.__all__)
