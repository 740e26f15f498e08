"""metaverify's pytest plugin: assert that a meta-gradient implementation is right, in your own tests.

Installed with the package, pytest loads this module through the ``pytest11``
entry point ``metaverify = "verify.testing"`` (without installing: ``pytest -p
verify.testing``). It is imported in every pytest session, so it never imports
torch or JAX (the ``verify`` package itself needs only NumPy); the audit is
imported when first used.

Usage::

    from verify.testing import assert_meta_gradient

    def test_my_maml():
        assert_meta_gradient(my_maml, algorithm="maml", inner_steps=2, seeds=(0, 1, 2))

or with the fixture (same function, no import needed)::

    def test_my_maml(assert_meta_gradient):
        assert_meta_gradient(my_maml, algorithm="maml")

On a mismatch the test fails with the full verdict: per-tensor worst errors
with locations, the tolerance and its reason, which side is wrong, and the
diagnosis (e.g. "first-order only: the inner-loop gradients were not
differentiated"). A function that raises, returns a non-scalar or non-finite
loss, or the wrong number of gradients fails the test with that error (and
the function's traceback).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import pytest

__all__ = ["MetaGradientAssertionError", "assert_meta_gradient", "audit_results"]


class MetaGradientAssertionError(AssertionError):
    """A meta-gradient implementation failed its audit; the message is the full verdict."""

    def __init__(self, message: str, results: list[Any]):
        super().__init__(message)
        self.results = results


def audit_results(fn: Callable[..., Any], algorithm: str, *, seeds: Iterable[int] = (0,),
                  **problem: Any) -> list[Any]:
    """Run :func:`verify.audit` on ``fn`` for each seed; returns the :class:`verify.AuditResult` list."""
    from verify.auditing import audit

    seeds = list(seeds)
    if not seeds:
        raise ValueError("seeds=() is empty; pass at least one seed, e.g. seeds=(0,)")
    return [audit(fn, algorithm, seed=seed, **problem) for seed in seeds]


def assert_meta_gradient(fn: Callable[..., Any], algorithm: str, *, seeds: Iterable[int] = (0,),
                         **problem: Any) -> list[Any]:
    """Fail (``AssertionError``) unless ``fn`` computes ``algorithm``'s meta-loss and meta-gradient.

    Args:
        fn: the implementation, in the calling contract of ``verify.audit``
            (``fn(model, tasks, inner_lr, inner_steps)`` for a PyTorch MAML,
            ``fn(params, apply_fn, tasks, inner_lr, inner_steps)`` for JAX, ...).
        algorithm: ``maml``, ``fomaml``, ``anil``, ``metasgd``, ``reptile``,
            ``newton``, ``imaml``, ``r2d2``, ``lrd2``, ``protonet``, ``matchingnet``.
        seeds: one audit per seed (a random problem each).
        **problem: passed to :func:`verify.audit` (``backend``, ``model``,
            ``inner_lr``, ``inner_steps``, ``n_tasks``, ``lam``, ...).

    Returns:
        The audit results (all verified).

    Raises:
        MetaGradientAssertionError: an audit found a mismatch; the message is
            the full verdict of every failing seed, with the diagnosis.
        verify.AuditInputError: ``fn`` could not be audited (it raised, returned a
            non-scalar / non-finite loss or the wrong number of gradients).
    """
    results = audit_results(fn, algorithm, seeds=seeds, **problem)
    failed = [r for r in results if not r.passed]
    if failed:
        head = f"{len(failed)} of {len(results)} audit(s) of {getattr(fn, '__qualname__', fn)!s} as {algorithm} failed"
        raise MetaGradientAssertionError("\n\n".join([head, *(r.report() for r in failed)]), results)
    return results


@pytest.fixture(name="assert_meta_gradient")
def _assert_meta_gradient_fixture() -> Callable[..., list[Any]]:
    """The :func:`assert_meta_gradient` function, as a fixture."""
    return assert_meta_gradient
