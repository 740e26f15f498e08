"""Trajectories of a finite MDP: exact enumeration with probabilities, seeded sampling, per-step quantities.

A trajectory is ``tau = (s_0, a_0, r_0, ..., s_{H-1}, a_{H-1}, r_{H-1})``
(``r_t = r(s_t, a_t)``; the transition after the last action does not enter).
Its probability under ``pi_theta`` is
``p_theta(tau) = rho0(s_0) prod_{t<H} pi_theta(a_t | s_t) prod_{t<H-1} P(s_{t+1} | s_t, a_t)``
(:func:`log_prob`). A batch ``D = (tau_1, ..., tau_n)`` is an *ordered*
n-tuple of independent trajectories, ``p_theta(D) = prod_i p_theta(tau_i)``;
:func:`batch_indices` enumerates all ``T^n`` of them.

Returns (the one convention of ``reference.rl``, ``kind="discounted"``):
``G_t = sum_{k=t}^{H-1} gamma^k r_k``, the causal reward-to-go discounted
*from time 0*, so that ``sum_t grad log pi(a_t | s_t) G_t`` is an unbiased
estimate of ``grad V`` for ``V = E[sum_t gamma^t r_t]``. The other kinds exist
to describe wrong implementations (the audit's catalogue):
``"undiscounted"`` ``sum_{k>=t} gamma^(k-t) r_k`` (the reward-to-go without the
``gamma^t`` in front: biased for the discounted ``V`` when ``gamma < 1``),
``"total"`` ``sum_k gamma^k r_k`` at every ``t`` (non-causal: unbiased but a
different, noisier estimator), ``"past"`` ``sum_{k<=t} gamma^k r_k`` (a
cumulative sum in the wrong direction).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from reference.errors import InvalidInputError
from reference.rl._checks import check_int
from reference.rl.mdp import FiniteMDP, log_policy, policy

__all__ = [
    "RETURN_KINDS",
    "Trajectories",
    "enumerate_trajectories",
    "count_trajectories",
    "batch_indices",
    "log_prob",
    "returns_to_go",
    "scores",
    "sample_trajectories",
    "step_log_probs",
]

#: The reward-to-go conventions :func:`returns_to_go` knows (``"discounted"`` is the contract's).
RETURN_KINDS = ("discounted", "undiscounted", "total", "past")


@dataclass(frozen=True)
class Trajectories:
    """A set of trajectories as arrays with leading shape ``(...)``.

    Attributes:
        states, actions: integer arrays ``(..., H)``.
        rewards: ``(..., H)``, ``r[s_t, a_t]``.
        env_log_prob: ``log rho0(s_0) + sum_{t<H-1} log P(s_{t+1} | s_t, a_t)``, shape ``(...)``; the
            policy part is added by :func:`log_prob`.
    """

    states: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    env_log_prob: np.ndarray

    @property
    def count(self) -> int:
        return int(np.prod(self.states.shape[:-1]))

    def take(self, index: np.ndarray) -> Trajectories:
        """The trajectories at ``index`` (any integer array; result has leading shape ``index.shape``)."""
        return Trajectories(self.states[index], self.actions[index], self.rewards[index], self.env_log_prob[index])


def count_trajectories(mdp: FiniteMDP) -> int:
    """Number of trajectories with positive probability (what :func:`enumerate_trajectories` returns)."""
    reach = (mdp.rho0 > 0).astype(np.int64)
    support = (mdp.P > 0).astype(np.int64)  # [s, a, s']
    for _ in range(mdp.horizon - 1):  # reach[u]: number of possible prefixes (s_0, a_0, ..., s_t = u)
        reach = np.einsum("s,sau->u", reach, support)
    return int(reach.sum()) * mdp.n_actions


def enumerate_trajectories(mdp: FiniteMDP, *, max_count: int = 2_000_000) -> Trajectories:
    """Every trajectory of positive probability (any ``theta``: softmax puts mass on every action).

    Raises:
        InvalidInputError: more than ``max_count`` trajectories (the count grows like ``(S A)^H``).
    """
    count = count_trajectories(mdp)
    if count > max_count:
        raise InvalidInputError(
            f"{mdp.name} has {count} trajectories of positive probability, more than max_count={max_count}; "
            "use a smaller S, A or H, or the Monte-Carlo mode")
    H, A = mdp.horizon, mdp.n_actions
    with np.errstate(divide="ignore"):  # log 0 = -inf marks impossible starts/transitions, removed below
        log_rho, log_P = np.log(mdp.rho0), np.log(mdp.P)
    # Grow prefixes (s_0, a_0, ..., s_t) one step at a time, keeping only possible ones.
    states = np.flatnonzero(mdp.rho0 > 0)[:, None]
    lp = log_rho[states[:, 0]]
    actions = np.zeros((len(states), 0), dtype=np.int64)
    for t in range(H):
        k = len(states)
        states = np.repeat(states, A, axis=0)
        lp = np.repeat(lp, A)
        actions = np.concatenate([np.repeat(actions, A, axis=0), np.tile(np.arange(A), k)[:, None]], axis=1)
        if t == H - 1:
            break
        s, a = states[:, -1], actions[:, -1]
        nxt = [(i, u) for i in range(len(states)) for u in np.flatnonzero(mdp.P[s[i], a[i]] > 0)]
        rows = np.array([i for i, _ in nxt], dtype=np.int64)
        succ = np.array([u for _, u in nxt], dtype=np.int64)
        lp = lp[rows] + log_P[s[rows], a[rows], succ]
        states = np.concatenate([states[rows], succ[:, None]], axis=1)
        actions = actions[rows]
    rewards = mdp.r[states, actions]
    return Trajectories(states.astype(np.int64), actions.astype(np.int64), rewards, lp)


def batch_indices(n_trajectories: int, batch_size: int) -> np.ndarray:
    """All ordered ``batch_size``-tuples of trajectory indices, shape ``(T^n, n)`` (C order)."""
    n = check_int("batch_size", batch_size)
    T = check_int("n_trajectories", n_trajectories)
    grids = np.meshgrid(*([np.arange(T)] * n), indexing="ij")
    return np.stack([g.ravel() for g in grids], axis=1)


def _gather_policy(theta: np.ndarray, states: np.ndarray, S: int, fn=policy) -> np.ndarray:
    """``fn(theta)[..., s_t, :]``: ``states (L..., H)``, ``theta (M..., S, A)``, ``M`` broadcastable to ``L``."""
    onehot = np.eye(S)[states]  # (..., H, S)
    return onehot @ fn(theta)  # (..., H, A): matmul broadcasts the leading dims


def log_prob(mdp: FiniteMDP, theta: np.ndarray, traj: Trajectories) -> np.ndarray:
    """``log p_theta(tau)`` for each trajectory; ``theta (..., S, A)`` broadcast against ``traj``'s leading shape."""
    return traj.env_log_prob + step_log_probs(mdp, theta, traj).sum(-1)


def step_log_probs(mdp: FiniteMDP, theta: np.ndarray, traj: Trajectories) -> np.ndarray:
    """``log pi_theta(a_t | s_t)`` per step, shape ``(..., H)`` (``theta`` broadcast as in :func:`log_prob`)."""
    lpi = _gather_policy(theta, traj.states, mdp.n_states, log_policy)
    actions = np.broadcast_to(traj.actions, lpi.shape[:-1])
    return np.take_along_axis(lpi, actions[..., None], axis=-1)[..., 0]


def returns_to_go(rewards: np.ndarray, gamma: float, kind: str = "discounted",
                  baseline: np.ndarray | None = None, states: np.ndarray | None = None) -> np.ndarray:
    """The weights ``G_t`` multiplying ``grad log pi(a_t | s_t)`` (module docstring), shape of ``rewards``.

    Args:
        rewards: ``(..., H)``.
        gamma: the discount.
        kind: one of :data:`RETURN_KINDS`.
        baseline: optional ``b[t, s]`` of shape ``(H, S)``; ``gamma^t b[t, s_t]`` is subtracted from
            ``G_t`` (a state- and time-dependent baseline keeps the estimator unbiased). Needs ``states``.
        states: ``(..., H)``, with ``baseline``.
    """
    H = rewards.shape[-1]
    disc = np.asarray(gamma) ** np.arange(H)
    if kind == "discounted":
        G = np.flip(np.cumsum(np.flip(rewards * disc, -1), -1), -1)
    elif kind == "undiscounted":
        # sum_{k>=t} gamma^(k-t) r_k: backward recursion G_t = r_t + gamma G_{t+1}
        G = np.zeros_like(rewards, dtype=np.result_type(rewards, disc))
        run = np.zeros(rewards.shape[:-1], dtype=G.dtype)
        for t in range(H - 1, -1, -1):
            run = rewards[..., t] + gamma * run
            G[..., t] = run
    elif kind == "total":
        G = np.broadcast_to(np.sum(rewards * disc, -1, keepdims=True), rewards.shape).copy()
    elif kind == "past":
        G = np.cumsum(rewards * disc, -1)
    else:
        raise InvalidInputError(f"kind={kind!r} is not a return convention; use one of {RETURN_KINDS}")
    if baseline is not None:
        if states is None:
            raise InvalidInputError("a baseline b[t, s] needs the states of the trajectories (states=...)")
        b = np.asarray(baseline)
        G = G - disc * np.asarray(baseline)[np.arange(H), states]
    return G


def scores(mdp: FiniteMDP, theta: np.ndarray, traj: Trajectories) -> np.ndarray:
    """``grad_theta log pi_theta(a_t | s_t)`` per step, flattened: shape ``(..., H, S*A)``.

    For the softmax, block ``s_t`` holds ``e_{a_t} - pi_theta(. | s_t)`` and all other blocks are 0.
    ``theta (..., S, A)`` is broadcast against ``traj``'s leading shape.
    """
    S, A = mdp.n_states, mdp.n_actions
    pi_s = _gather_policy(theta, traj.states, S)  # (..., H, A)
    local = np.eye(A)[traj.actions] - pi_s
    onehot = np.eye(S)[traj.states]  # (..., H, S)
    full = onehot[..., :, None] * local[..., None, :]  # (..., H, S, A)
    return full.reshape(full.shape[:-2] + (S * A,))


def sample_trajectories(mdp: FiniteMDP, theta: ArrayLike, count: int, rng: np.random.Generator) -> Trajectories:
    """``count`` trajectories from ``pi_theta`` for each ``theta`` of a batch ``(..., S, A)``: ``(..., count, H)``.

    Inverse-CDF sampling from the seeded ``rng`` (real ``theta`` only).
    """
    theta = mdp.check_theta(theta)
    if np.iscomplexobj(theta):
        raise InvalidInputError("sample_trajectories needs a real theta")
    count = check_int("count", count)
    lead = theta.shape[:-2] + (count,)
    S, H = mdp.n_states, mdp.horizon
    pi = np.broadcast_to(policy(theta)[..., None, :, :], lead + theta.shape[-2:])
    cdf_pi = np.cumsum(pi, -1)
    cdf_P = np.cumsum(mdp.P, -1)
    cdf_0 = np.cumsum(mdp.rho0)

    def draw(cdf: np.ndarray) -> np.ndarray:
        u = rng.random(cdf.shape[:-1])  # in [0, 1)
        # outcome k for u in [cdf[k-1], cdf[k]): an outcome of probability 0 has an empty interval (with
        # "u > cdf" instead, u = 0.0 would pick a leading outcome of probability 0); min(.., last)
        # guards u >= cdf[-1] = 1 - round-off
        return np.minimum((u[..., None] >= cdf).sum(-1), cdf.shape[-1] - 1)

    states = np.zeros(lead + (H,), dtype=np.int64)
    actions = np.zeros(lead + (H,), dtype=np.int64)
    s = draw(np.broadcast_to(cdf_0, lead + (S,)))
    lp = np.log(mdp.rho0[s])
    for t in range(H):
        states[..., t] = s
        a = draw(np.take_along_axis(cdf_pi, s[..., None, None], axis=-2)[..., 0, :])
        actions[..., t] = a
        if t < H - 1:
            nxt = draw(cdf_P[s, a])
            lp = lp + np.log(mdp.P[s, a, nxt])
            s = nxt
    return Trajectories(states, actions, mdp.r[states, actions], lp)

