"""Shared test configuration: hypothesis profiles and the ``backend`` fixture of the backend tables.

Profiles (select with ``HYPOTHESIS_PROFILE=name`` or ``--hypothesis-profile``):

* ``ci``: derandomised, bounded example counts, no deadline. CI uses it.
* ``dev``: the default; a few more examples, still quick.
* ``thorough``: long runs (false-alarm hunts, >= 1000 cases per property).

``backend``: a :class:`backend_helpers.Backend`, parametrized over ``"torch"`` and
``"jax"`` (or indirectly by a table, see ``backend_helpers.backend_param``); a
backend that is not installed skips its parameters with the import error as reason.
"""

from __future__ import annotations

import os

import pytest
from backend_helpers import BACKENDS, Backend
from hypothesis import HealthCheck, settings

_common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", max_examples=20, derandomize=True, print_blob=True, **_common)
settings.register_profile("dev", max_examples=30, **_common)
settings.register_profile("thorough", max_examples=1000, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


@pytest.fixture(scope="session", params=[pytest.param(name, marks=getattr(pytest.mark, name)) for name in BACKENDS])
def backend(request: pytest.FixtureRequest) -> Backend:
    """The backend of this parameter; skips (with the import error) when its framework is not installed."""
    pytest.importorskip(request.param)
    return Backend(request.param)
