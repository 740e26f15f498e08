"""Diagnosis variants of the backbone family: R2-D2, LR-D2, ProtoNet, MatchingNet.

Support and query swapped, the support branch detached (the reference run with
a :class:`reference.features.TaskFeatures` whose VJP drops the support
cotangent, through the reference's ``features=`` hook), and the heads' options
mismatched (R2-D2's ``normalize`` and ``bias_column``, LR-D2's ``bias_column``
and ``newton_steps``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from reference.features import TaskFeatures
from reference.models import flatten
from verify.algorithms import Case, evaluate
from verify.auditing.diagnosis.catalogue import Candidate, rerun, swapped

__all__ = ["DetachedSupport", "fitted", "variants"]

Variant = tuple[str, str, Callable[[], tuple[Any, np.ndarray]]]


class DetachedSupport:
    """A :class:`reference.features.TaskFeatures` whose VJP drops the support cotangent (support branch detached)."""

    def __init__(self, backbone: Any, params: Any, task: Any, where: str):
        feats = TaskFeatures(backbone, params, task, where)
        self._feats, self.support, self.query, self.n_support = feats, feats.support, feats.query, feats.n_support

    def vjp(self, g_support: Any, g_query: Any) -> list[np.ndarray]:
        return self._feats.vjp(None, g_query)


def _support_detached(case: Case) -> tuple[Any, np.ndarray]:
    """The algorithm with the support features treated as constants (the reference's ``features=`` hook)."""
    loss, grads = evaluate(case, features=DetachedSupport)
    return loss, flatten([np.asarray(g) for g in grads])


def variants(case: Case) -> list[Variant]:
    """The fixed variants of this problem: ``(catalogue key, label, () -> (loss, flat grads))``."""
    a = case.algorithm
    out: list[Variant] = []

    def add(key: str, label: str, fn: Callable[[], tuple[Any, np.ndarray]]) -> None:
        out.append((key, label, fn))

    h = case.hyper
    add("swapped_support_query", "support and query sets swapped", lambda: rerun(case, tasks=swapped(case.tasks)))
    add("support_detached", "support branch detached (gradient through the query features only)",
        lambda: _support_detached(case))
    if getattr(case.model, "batch_coupled", False) and hasattr(case.model, "joint_batch"):
        # a train-mode batch-norm backbone: support and query normalised as one batch, or as two
        joint = bool(case.model.joint)
        other = Case(a, case.model.joint_batch(not joint), case.params, list(case.tasks), dict(case.hyper), case.seed,
                     dict(case.extra))
        add("bn_joint_batch", "support and query normalised " + ("separately (two batches) where one batch was meant"
                                                                  if joint else "together (one batch) where two "
                                                                  "batches were meant"),
            lambda: (lambda lg: (lg[0], flatten([np.asarray(g) for g in lg[1]])))(evaluate(other)))
    if a == "r2d2":
        nb, bc = h["normalize"], h["bias_column"]
        add("normalize_mismatch", f"normalize={not nb} instead of {nb}", lambda: rerun(case, normalize=not nb))
        add("bias_column_mismatch", f"bias_column={not bc} instead of {bc}",
            lambda: rerun(case, bias_column=not bc))
        add("bias_column_mismatch", f"normalize={not nb} and bias_column={not bc} (both options mismatched)",
            lambda: rerun(case, normalize=not nb, bias_column=not bc))
    if a == "lrd2":
        bc, K = h["bias_column"], int(h["newton_steps"])
        add("bias_column_mismatch", f"bias_column={not bc} instead of {bc}",
            lambda: rerun(case, bias_column=not bc))
        for k2 in range(1, K + 4):
            if k2 != K:
                add("wrong_inner_steps", f"newton_steps={k2} instead of {K}",
                    lambda k2=k2: rerun(case, newton_steps=k2))
    return out


def fitted(case: Case, g: np.ndarray, reference_loss: Any,
           same_as_correct: Callable[[Candidate], bool]) -> tuple[list[Candidate], list[Candidate]]:
    """No fitted variants: the layers (scale, disconnected) cover the rest."""
    return [], []
