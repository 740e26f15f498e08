"""Finite MDPs, tabular softmax policies and the exact finite-horizon value with its gradient and Hessian.

Conventions (CONVENTIONS.md, "Meta-reinforcement learning"; fixed for all of
``reference.rl``):

* An MDP has ``S`` states, ``A`` actions, transitions ``P[s, a, s'] =
  P(s' | s, a)``, a deterministic reward ``r[s, a]``, a start distribution
  ``rho0[s]``, a horizon ``H >= 1`` and a discount ``gamma`` in ``[0, 1]``. A
  bandit is the case ``S = 1, H = 1``.
* The policy is tabular softmax: ``theta`` has shape ``(S, A)`` (flattened in
  C order, index ``s * A + a``, whenever a vector is meant) and
  ``pi_theta(a | s) = exp(theta[s, a]) / sum_b exp(theta[s, b])``.
* ``V(theta)`` is the **finite-horizon** discounted return
  ``E[sum_{t=0}^{H-1} gamma^t r(s_t, a_t)]``, ``s_0 ~ rho0``,
  ``a_t ~ pi_theta(. | s_t)``, ``s_{t+1} ~ P(. | s_t, a_t)`` (the infinite-horizon
  closed form ``rho0^T (I - gamma P_pi)^{-1} r_pi`` is its limit ``H -> inf``
  for ``gamma < 1``, :func:`value_infinite_horizon`).

``V``, its gradient and Hessian come from the backward recursion
``Q_t(s, a) = r(s, a) + gamma sum_s' P(s' | s, a) V_{t+1}(s')``,
``V_t(s) = sum_a pi(a | s) Q_t(s, a)``, ``V_H = 0``, ``V = rho0 . V_0``,
differentiated analytically (product rule on ``pi Q``; the softmax
derivatives ``d pi_a / d theta_b = pi_a (delta_ab - pi_b)`` and
``d^2 pi_a / d theta_b d theta_c = pi_a [(delta_ab - pi_b)(delta_ac - pi_c) -
pi_b (delta_bc - pi_c)]``). No autodiff. Every function accepts complex
``theta`` (complex-step checks) and leading batch dimensions ``(..., S, A)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from reference.errors import InvalidInputError
from reference.rl._checks import check_array, check_int, check_scalar

__all__ = [
    "FiniteMDP",
    "random_mdp",
    "two_armed_bandit",
    "chain_mdp",
    "grid_mdp",
    "policy",
    "log_policy",
    "value",
    "value_and_gradient",
    "value_gradient_hessian",
    "value_infinite_horizon",
]

_STOCHASTIC_ATOL = 1e-12  # rows of P and rho0 are sums of a few float64 numbers: round-off far below this


@dataclass(frozen=True)
class FiniteMDP:
    """A finite-horizon MDP (see the module docstring for the conventions).

    Attributes:
        P: transitions ``(S, A, S)``, rows summing to 1.
        r: rewards ``(S, A)``.
        rho0: start distribution ``(S,)``.
        horizon: ``H >= 1``.
        gamma: discount in ``[0, 1]``.
        name: a label for messages and reports.
    """

    P: np.ndarray
    r: np.ndarray
    rho0: np.ndarray
    horizon: int
    gamma: float
    name: str = "mdp"

    def __post_init__(self) -> None:
        P = check_array("P", self.P, allow_complex=False)
        if P.ndim != 3 or P.shape[0] != P.shape[2]:
            raise InvalidInputError(f"P has shape {P.shape}, expected (S, A, S)")
        S, A = P.shape[:2]
        r = check_array("r", self.r, (S, A), allow_complex=False, hint=" (one reward per state-action pair)")
        rho0 = check_array("rho0", self.rho0, (S,), allow_complex=False)
        if np.any(P < 0) or not np.allclose(P.sum(-1), 1.0, rtol=0, atol=_STOCHASTIC_ATOL):
            raise InvalidInputError("P must be non-negative with P[s, a, :] summing to 1; normalise its rows")
        if np.any(rho0 < 0) or abs(rho0.sum() - 1.0) > _STOCHASTIC_ATOL:
            raise InvalidInputError(f"rho0={rho0!r} must be a probability vector (non-negative, sum 1)")
        object.__setattr__(self, "P", P)
        object.__setattr__(self, "r", r)
        object.__setattr__(self, "rho0", rho0)
        object.__setattr__(self, "horizon", check_int("horizon", self.horizon))
        object.__setattr__(self, "gamma", check_scalar("gamma", self.gamma, low=0.0, high=1.0))

    @property
    def n_states(self) -> int:
        return int(self.P.shape[0])

    @property
    def n_actions(self) -> int:
        return int(self.P.shape[1])

    @property
    def n_params(self) -> int:
        """``S * A``, the length of the flattened ``theta``."""
        return self.n_states * self.n_actions

    def check_theta(self, theta: ArrayLike, name: str = "theta") -> np.ndarray:
        """``theta`` as an array of shape ``(..., S, A)`` (a flat ``(S*A,)`` vector is reshaped)."""
        arr = check_array(name, theta)
        S, A = self.n_states, self.n_actions
        if arr.ndim == 1 and arr.shape[0] == S * A:
            arr = arr.reshape(S, A)
        if arr.ndim < 2 or arr.shape[-2:] != (S, A):
            raise InvalidInputError(
                f"{name} has shape {arr.shape}, expected ({S}, {A}) or ({S * A},) for the tabular softmax policy "
                f"of {self.name} (S={S}, A={A})")
        return arr


def random_mdp(n_states: int, n_actions: int, horizon: int, *, gamma: float = 0.9, seed: int = 0,
               sparse: bool = False) -> FiniteMDP:
    """A random MDP: Dirichlet(1) transition rows and start distribution, rewards ``N(0, 1)``.

    With ``sparse=True`` each transition row keeps only two successor states (fewer trajectories to enumerate).
    """
    S = check_int("n_states", n_states)
    A = check_int("n_actions", n_actions)
    H = check_int("horizon", horizon)
    rng = np.random.default_rng(seed)
    P = rng.dirichlet(np.ones(S), size=(S, A))
    if sparse and S > 2:
        keep = np.argsort(rng.random((S, A, S)), axis=-1)[..., :2]
        mask = np.zeros_like(P, dtype=bool)
        np.put_along_axis(mask, keep, True, axis=-1)
        P = np.where(mask, P, 0.0)
        P /= P.sum(-1, keepdims=True)
    rho0 = rng.dirichlet(np.ones(S))
    r = rng.standard_normal((S, A))
    return FiniteMDP(P, r, rho0, H, gamma, name=f"random(S={S}, A={A}, H={H}, seed={seed})")


def two_armed_bandit(rewards: ArrayLike = (1.0, 0.0)) -> FiniteMDP:
    """The 2-armed bandit with deterministic rewards ``r = (r_0, r_1)``: ``S = 1``, ``A = 2``, ``H = 1``,
    ``gamma = 1`` (undiscounted)."""
    r = check_array("rewards", rewards, (2,), allow_complex=False)
    return FiniteMDP(np.ones((1, 2, 1)), r.reshape(1, 2), np.ones(1), 1, 1.0, name="two-armed-bandit")


def chain_mdp(n_states: int = 3, horizon: int = 3, *, slip: float = 0.1, gamma: float = 0.9) -> FiniteMDP:
    """A chain: actions left (0) / right (1), moved the other way with probability ``slip``.

    Start in state 0; reward 1 for taking "right" in the last state, 0.1 for
    "left" in state 0 (the classic exploration trap of the chain MDP).
    """
    S = check_int("n_states", n_states, minimum=2)
    slip = check_scalar("slip", slip, low=0.0, high=1.0)
    P = np.zeros((S, 2, S))
    for s in range(S):
        left, right = max(s - 1, 0), min(s + 1, S - 1)
        P[s, 0, left] += 1 - slip
        P[s, 0, right] += slip
        P[s, 1, right] += 1 - slip
        P[s, 1, left] += slip
    r = np.zeros((S, 2))
    r[S - 1, 1] = 1.0
    r[0, 0] = 0.1
    rho0 = np.zeros(S)
    rho0[0] = 1.0
    return FiniteMDP(P, r, rho0, horizon, gamma, name=f"chain(S={S}, H={horizon})")


def grid_mdp(horizon: int = 3, *, slip: float = 0.1, gamma: float = 0.9) -> FiniteMDP:
    """A 2x2 grid (states 0 1 / 2 3), actions right (0) / down (1), goal state 3.

    The chosen move happens with probability ``1 - slip``, the other one with
    ``slip``; moves off the grid stay put; reward 1 for every action taken in
    the goal (which is absorbing). Start in state 0.
    """
    slip = check_scalar("slip", slip, low=0.0, high=1.0)
    moves = {0: {0: 1, 1: 2}, 1: {0: 1, 1: 3}, 2: {0: 3, 1: 2}, 3: {0: 3, 1: 3}}
    P = np.zeros((4, 2, 4))
    for s in range(4):
        for a in range(2):
            P[s, a, moves[s][a]] += 1 - slip
            P[s, a, moves[s][1 - a]] += slip
    r = np.zeros((4, 2))
    r[3, :] = 1.0
    rho0 = np.array([1.0, 0.0, 0.0, 0.0])
    return FiniteMDP(P, r, rho0, horizon, gamma, name=f"grid2x2(H={horizon})")


def log_policy(theta: np.ndarray) -> np.ndarray:
    """``log pi_theta(a | s)`` for ``theta`` of shape ``(..., S, A)`` (complex-step safe).

    The shift by the real row maximum keeps ``exp`` in range and is exact
    algebra for real and complex ``theta`` alike (``abs``/``max`` of the
    complex part would break analyticity).
    """
    shifted = theta - np.max(np.real(theta), axis=-1, keepdims=True)
    return shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))


def policy(theta: np.ndarray) -> np.ndarray:
    """``pi_theta(a | s)`` (softmax over the last axis), complex-step safe."""
    return np.exp(log_policy(theta))


def _softmax_derivatives(pi: np.ndarray, order: int) -> tuple[np.ndarray, np.ndarray | None]:
    """``D1[..., s, a, b] = d pi(a|s) / d theta[s, b]`` and ``D2[..., s, a, b, c]`` (second derivative)."""
    A = pi.shape[-1]
    eye = np.eye(A)
    delta = eye - pi[..., :, None, :]  # [..., s, a, b] = delta_ab - pi_b
    D1 = pi[..., :, :, None] * delta
    if order < 2:
        return D1, None
    # pi_a [(delta_ab - pi_b)(delta_ac - pi_c) - pi_b (delta_bc - pi_c)]
    outer = delta[..., :, :, :, None] * delta[..., :, :, None, :]
    curv = pi[..., :, None, :, None] * (eye - pi[..., :, None, None, :])
    D2 = pi[..., :, :, None, None] * (outer - curv)
    return D1, D2


def _recursion(mdp: FiniteMDP, theta: np.ndarray, order: int) -> tuple[np.ndarray, ...]:
    """Backward recursion for ``V`` (order 0), its gradient (1) and Hessian (2).

    Shapes ``(...)``, ``(..., d)``, ``(..., d, d)`` for ``theta (..., S, A)``, ``d = S A``.
    """
    S, A = mdp.n_states, mdp.n_actions
    d = S * A
    batch = theta.shape[:-2]
    pi = policy(theta)
    D1, D2 = _softmax_derivatives(pi, order)
    eyeS = np.eye(S)
    dtype = np.result_type(theta.dtype, np.float64)
    V = np.zeros(batch + (S,), dtype)
    G = np.zeros(batch + (S, d), dtype) if order >= 1 else None
    Hs = np.zeros(batch + (S, d, d), dtype) if order >= 2 else None
    P, g = mdp.P, mdp.gamma
    for _ in range(mdp.horizon):
        Q = mdp.r + g * np.einsum("sau,...u->...sa", P, V)
        if order >= 1:
            GQ = g * np.einsum("sau,...ud->...sad", P, G)
        if order >= 2:
            HQ = g * np.einsum("sau,...ude->...sade", P, Hs)
            # d/dtheta of pi(a|s) lives in block s only: embed the local (A,) derivatives at s * A.
            loc2 = np.einsum("...sabc,...sa->...sbc", D2, Q)  # sum_a D2 Q
            cross = np.einsum("...sab,...sad->...sbd", D1, GQ)  # (..., S, A, d): the rows of block s
            Hcross = np.einsum("st,...sbd->...stbd", eyeS, cross).reshape(batch + (S, d, d))
            Hn = np.einsum("...sa,...sade->...sde", pi, HQ) + Hcross + np.swapaxes(Hcross, -1, -2)
            Hblk = Hn.reshape(batch + (S, S, A, S, A))
            Hblk = Hblk + np.einsum("st,su,...sbc->...stbuc", eyeS, eyeS, loc2)
            Hs = Hblk.reshape(batch + (S, d, d))
        if order >= 1:
            loc1 = np.einsum("...sab,...sa->...sb", D1, Q)
            G = (np.einsum("st,...sb->...stb", eyeS, loc1).reshape(batch + (S, d))
                 + np.einsum("...sa,...sad->...sd", pi, GQ))
        V = np.sum(pi * Q, axis=-1)
    out: tuple[np.ndarray, ...] = (V @ mdp.rho0,)
    if order >= 1:
        out += (np.einsum("s,...sd->...d", mdp.rho0, G),)
    if order >= 2:
        out += (np.einsum("s,...sde->...de", mdp.rho0, Hs),)
    return out


def value(mdp: FiniteMDP, theta: ArrayLike) -> np.ndarray:
    """``V(theta) = E[sum_{t<H} gamma^t r(s_t, a_t)]`` exactly (backward recursion); shape ``theta.shape[:-2]``."""
    return _recursion(mdp, mdp.check_theta(theta), 0)[0]


def value_and_gradient(mdp: FiniteMDP, theta: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """``V(theta)`` and ``grad V(theta)`` (flattened, length ``S*A``), analytic, batched over leading dims.

    The gradient is the differentiated recursion
    ``grad V_t(s) = sum_a [grad pi(a|s) Q_t(s, a) + pi(a|s) gamma sum_s' P(s'|s,a) grad V_{t+1}(s')]``,
    i.e. the finite-horizon policy-gradient theorem (Sutton et al. 2000).
    """
    V, G = _recursion(mdp, mdp.check_theta(theta), 1)
    return V, G


def value_gradient_hessian(mdp: FiniteMDP, theta: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``V``, ``grad V`` and the Hessian ``(S*A, S*A)``, analytic (second-order product rule on the recursion).

    Cost ``O(H S^2 A (S A)^2)`` per ``theta``: small MDPs only.
    """
    return _recursion(mdp, mdp.check_theta(theta), 2)  # type: ignore[return-value]


def value_infinite_horizon(mdp: FiniteMDP, theta: ArrayLike) -> complex | float:
    """``rho0^T (I - gamma P_pi)^{-1} r_pi`` (the ``H -> inf`` limit; needs ``gamma < 1``)."""
    if not np.real(mdp.gamma) < 1:
        raise InvalidInputError(f"gamma={mdp.gamma!r} must be < 1 for the infinite-horizon value")
    pi = policy(mdp.check_theta(theta))
    if pi.ndim != 2:
        raise InvalidInputError("value_infinite_horizon takes one theta of shape (S, A), not a batch")
    P_pi = np.einsum("sa,sau->su", pi, mdp.P)
    r_pi = np.sum(pi * mdp.r, axis=-1)
    return mdp.rho0 @ np.linalg.solve(np.eye(mdp.n_states) - mdp.gamma * P_pi, r_pi)
