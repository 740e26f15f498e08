"""Shared test configuration: hypothesis profiles and optional-backend skips.

Profiles (select with ``HYPOTHESIS_PROFILE=name`` or ``--hypothesis-profile``):

* ``ci``: derandomised, bounded example counts, no deadline. CI uses it.
* ``dev``: the default; a few more examples, still quick.
* ``thorough``: long runs (false-alarm hunts, >= 1000 cases per property).
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

_common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", max_examples=20, derandomize=True, print_blob=True, **_common)
settings.register_profile("dev", max_examples=30, **_common)
settings.register_profile("thorough", max_examples=1000, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))
