"""MAML-RL: the REINFORCE inner step, the exact meta-objective ``J`` and its exact gradient (no autodiff).

Finn et al. 2017, "Model-Agnostic Meta-Learning for Fast Adaptation of Deep
Networks", section 3.2 (MAML for RL), with the objective of CONVENTIONS.md:

* Inner batch ``D = (tau_1, ..., tau_n)``, ``n`` independent trajectories of
  ``pi_theta`` (an ordered tuple, ``p_theta(D) = prod_i p_theta(tau_i)``).
* REINFORCE inner estimate (Williams 1992), **no baseline by default**::

      g_hat(D; theta) = (1/n) sum_i sum_{t<H} grad log pi_theta(a^i_t | s^i_t) (G^i_t - gamma^t b[t, s^i_t])

  with the causal reward-to-go discounted from time 0,
  ``G_t = sum_{k=t}^{H-1} gamma^k r_k`` (:func:`reference.rl.trajectories.returns_to_go`),
  and an optional baseline ``b`` of shape ``(H, S)`` (default 0). Then
  ``E_D[g_hat(D; theta)] = grad V(theta)``.
* Adapted parameters ``theta' = theta + alpha g_hat(D; theta)`` (gradient
  *ascent*: ``V`` is a return). The meta-objective (maximised) is
  ``J(theta) = E_D[V(theta')] = sum_D p_theta(D) V(theta + alpha g_hat(D; theta))``.
* Its exact gradient (product rule on ``p_theta(D) V(theta'(D, theta))``)::

      grad J = sum_D p_theta(D) [ (I + alpha dg_hat/dtheta)^T grad V(theta') + V(theta') grad log p_theta(D) ]

  where ``dg_hat/dtheta = (1/n) sum_i sum_t (G^i_t - gamma^t b) hess log pi(a^i_t | s^i_t)`` is the
  Jacobian of ``g_hat`` at *fixed* ``D`` (symmetric; for the softmax ``hess log pi(a | s) =
  -(diag pi_s - pi_s pi_s^T)`` in block ``s``) and ``grad log p_theta(D) = sum_i sum_t grad log
  pi(a^i_t | s^i_t)``. ``V`` and ``grad V`` at each ``theta'`` come from the exact recursion of
  :mod:`reference.rl.mdp`.

Every ordered batch is enumerated (``T^n`` of them for ``T`` trajectories), so
``J`` and ``grad J`` are exact finite sums; complex ``theta`` is supported
(``J`` is analytic), for complex-step checks of ``grad J``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from reference.errors import InvalidInputError
from reference.rl._checks import check_int, check_scalar
from reference.rl.mdp import FiniteMDP, policy, value, value_and_gradient
from reference.rl.trajectories import (
    RETURN_KINDS,
    Trajectories,
    batch_indices,
    enumerate_trajectories,
    log_prob,
    returns_to_go,
    scores,
)

__all__ = [
    "TrajectoryTerms",
    "trajectory_terms",
    "reinforce",
    "reinforce_jacobian",
    "batch_count",
    "meta_objective",
    "meta_objective_and_gradient",
    "DEFAULT_MAX_BATCHES",
]

#: Largest number of inner batches ``T^n`` the exact sums enumerate by default.
DEFAULT_MAX_BATCHES = 2_000_000
_CHUNK = 8192  # batches per vectorised chunk: bounds memory at ~CHUNK * T * S*A floats in the estimators


@dataclass(frozen=True)
class TrajectoryTerms:
    """Per-trajectory quantities at one ``theta`` (leading shape = the trajectories').

    Attributes:
        log_prob: ``log p_theta(tau)``.
        score: ``grad log p_theta(tau) = sum_t grad log pi(a_t | s_t)``, ``(..., d)``.
        step_scores: ``grad log pi(a_t | s_t)``, ``(..., H, d)``.
        weights: ``G_t - gamma^t b[t, s_t]``, ``(..., H)`` (the convention's returns).
        g: the single-trajectory REINFORCE estimate ``sum_t step_scores_t weights_t``, ``(..., d)``.
        state_weights: ``w[s] = sum_t weights_t [s_t = s]``, ``(..., S)``: ``dg/dtheta`` is
            ``-blockdiag_s(w[s] (diag pi_s - pi_s pi_s^T))``.
        discounted_return: ``sum_t gamma^t r_t``, ``(...)``.
    """

    log_prob: np.ndarray
    score: np.ndarray
    step_scores: np.ndarray
    weights: np.ndarray
    g: np.ndarray
    state_weights: np.ndarray
    discounted_return: np.ndarray


def trajectory_terms(mdp: FiniteMDP, theta: np.ndarray, traj: Trajectories, *, kind: str = "discounted",
                     baseline: np.ndarray | None = None) -> TrajectoryTerms:
    """The :class:`TrajectoryTerms` of ``traj`` at ``theta`` (``(S, A)`` or broadcastable batch ``(..., S, A)``)."""
    st = scores(mdp, theta, traj)
    w = returns_to_go(traj.rewards, mdp.gamma, kind, baseline, traj.states)
    g = np.einsum("...hd,...h->...d", st, w)
    sw = np.einsum("...hs,...h->...s", np.eye(mdp.n_states)[traj.states], w)
    ret = np.sum(traj.rewards * mdp.gamma ** np.arange(mdp.horizon), -1)
    return TrajectoryTerms(log_prob(mdp, theta, traj), st.sum(-2), st, w, g, sw, ret)


def _block_hessian(pi: np.ndarray, state_weights: np.ndarray) -> np.ndarray:
    """``-blockdiag_s(w[s] (diag pi_s - pi_s pi_s^T))`` as a dense ``(..., S*A, S*A)`` matrix."""
    S, A = pi.shape[-2:]
    fisher = np.einsum("sa,ab->sab", pi, np.eye(A)) - pi[:, :, None] * pi[:, None, :]  # (S, A, A)
    blocks = -state_weights[..., :, None, None] * fisher  # (..., S, A, A)
    out = np.einsum("st,...sab->...satb", np.eye(S), blocks)
    return out.reshape(state_weights.shape[:-1] + (S * A, S * A))


def _check_common(mdp: FiniteMDP, theta: ArrayLike, alpha: float, batch_size: int, kind: str,
                  baseline: ArrayLike | None) -> tuple[np.ndarray, complex | float, int, np.ndarray | None]:
    if not isinstance(mdp, FiniteMDP):
        raise InvalidInputError(f"mdp={mdp!r} must be a reference.rl.FiniteMDP (see random_mdp, chain_mdp, ...)")
    th = mdp.check_theta(theta)
    if th.ndim != 2:
        raise InvalidInputError(f"theta has shape {th.shape}; pass one policy of shape ({mdp.n_states}, "
                                f"{mdp.n_actions}), not a batch")
    alpha = check_scalar("alpha", alpha)
    n = check_int("batch_size", batch_size, hint=" (the number of inner trajectories n)")
    if kind not in RETURN_KINDS:
        raise InvalidInputError(f"kind={kind!r} is not a return convention; use one of {RETURN_KINDS}")
    b = None
    if baseline is not None:
        b = np.asarray(baseline, dtype=float)
        if b.shape != (mdp.horizon, mdp.n_states):
            raise InvalidInputError(f"baseline has shape {b.shape}, expected (H, S) = ({mdp.horizon}, {mdp.n_states})")
    return th, alpha, n, b


def reinforce(mdp: FiniteMDP, theta: ArrayLike, batch: Trajectories, *, kind: str = "discounted",
              baseline: ArrayLike | None = None) -> np.ndarray:
    """``g_hat(D; theta)`` for a batch ``D`` of leading shape ``(..., n)``: shape ``(..., S*A)`` (module docstring)."""
    th, _, _, b = _check_common(mdp, theta, 0.0, 1, kind, baseline)
    return trajectory_terms(mdp, th, batch, kind=kind, baseline=b).g.mean(-2)


def reinforce_jacobian(mdp: FiniteMDP, theta: ArrayLike, batch: Trajectories, *, kind: str = "discounted",
                       baseline: ArrayLike | None = None) -> np.ndarray:
    """``d g_hat(D; theta) / d theta`` at fixed ``D`` (leading shape ``(..., n)``): shape ``(..., d, d)``, symmetric."""
    th, _, _, b = _check_common(mdp, theta, 0.0, 1, kind, baseline)
    terms = trajectory_terms(mdp, th, batch, kind=kind, baseline=b)
    return _block_hessian(policy(th), terms.state_weights.mean(-2))


def batch_count(mdp: FiniteMDP, batch_size: int) -> int:
    """``T^n``: the number of ordered inner batches the exact sums enumerate."""
    from reference.rl.trajectories import count_trajectories

    return count_trajectories(mdp) ** check_int("batch_size", batch_size)


@dataclass(frozen=True)
class InnerBatches:
    """Every ordered inner batch at ``theta`` with the quantities the exact sums need (chunk of them)."""

    index: np.ndarray  # (N, n) trajectory indices
    prob: np.ndarray  # (N,) p_theta(D)
    g: np.ndarray  # (N, d) g_hat(D)
    state_weights: np.ndarray  # (N, S) mean over the batch of the per-trajectory state weights
    score: np.ndarray  # (N, d) grad log p_theta(D)
    terms: TrajectoryTerms  # per trajectory (T, ...)


def _inner_batches(mdp: FiniteMDP, th: np.ndarray, n: int, kind: str, b: np.ndarray | None,
                   max_batches: int, traj: Trajectories | None = None):
    traj = enumerate_trajectories(mdp) if traj is None else traj
    T = traj.count
    if T**n > max_batches:
        raise InvalidInputError(
            f"{mdp.name} with batch_size={n} has T^n = {T}^{n} = {T**n} inner batches, more than "
            f"max_batches={max_batches}; use a smaller MDP/batch, raise max_batches, or the Monte-Carlo mode")
    terms = trajectory_terms(mdp, th, traj, kind=kind, baseline=b)
    idx_all = batch_indices(T, n)
    for start in range(0, len(idx_all), _CHUNK):
        idx = idx_all[start:start + _CHUNK]
        yield traj, InnerBatches(idx, np.exp(terms.log_prob[idx].sum(-1)), terms.g[idx].mean(-2),
                                 terms.state_weights[idx].mean(-2), terms.score[idx].sum(-2), terms)


def meta_objective(mdp: FiniteMDP, theta: ArrayLike, alpha: float, batch_size: int, *, kind: str = "discounted",
                   baseline: ArrayLike | None = None, max_batches: int = DEFAULT_MAX_BATCHES) -> complex | float:
    """``J(theta) = sum_D p_theta(D) V(theta + alpha g_hat(D; theta))``, exact (complex-step safe)."""
    th, alpha, n, b = _check_common(mdp, theta, alpha, batch_size, kind, baseline)
    total = 0.0
    for _, batches in _inner_batches(mdp, th, n, kind, b, max_batches):
        adapted = th + alpha * batches.g.reshape((-1,) + th.shape)
        total = total + batches.prob @ value(mdp, adapted)
    return total


def meta_objective_and_gradient(mdp: FiniteMDP, theta: ArrayLike, alpha: float, batch_size: int, *,
                                kind: str = "discounted", baseline: ArrayLike | None = None,
                                max_batches: int = DEFAULT_MAX_BATCHES) -> tuple[complex | float, np.ndarray]:
    """``J(theta)`` and ``grad J(theta)`` (flat, length ``S*A``), exact (module docstring for the formula).

    Cost: ``T^n`` evaluations of the value recursion with its gradient
    (``O(H S^2 A d)`` each, ``d = S A``), vectorised in chunks.
    """
    th, alpha, n, b = _check_common(mdp, theta, alpha, batch_size, kind, baseline)
    pi = policy(th)
    J = 0.0
    grad = np.zeros(th.size, dtype=np.result_type(th, alpha, np.float64))
    for _, batches in _inner_batches(mdp, th, n, kind, b, max_batches):
        adapted = th + alpha * batches.g.reshape((-1,) + th.shape)
        V, gV = value_and_gradient(mdp, adapted)
        jac = _block_hessian(pi, batches.state_weights)  # dg_hat/dtheta, symmetric
        chain = gV + alpha * np.einsum("nde,nd->ne", jac, gV)  # (I + alpha jac)^T grad V(theta')
        J = J + batches.prob @ V
        grad = grad + batches.prob @ chain + (batches.prob * V) @ batches.score
    return J, grad
