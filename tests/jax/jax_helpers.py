"""Comparison helpers of the JAX-backend tests: the shared ones of ``tests/backend_helpers.py``."""

from backend_helpers import PERTURBATION, assert_close, flat, measured_condition, rel_err

__all__ = ["PERTURBATION", "assert_close", "flat", "measured_condition", "rel_err"]
