"""Meta-policy-gradient estimators of ``grad J`` and their exact expectations and biases.

Setting (:mod:`reference.rl.maml_rl`): inner batch ``D`` of ``n`` trajectories
from ``pi_theta``, ``theta' = theta + alpha g_hat(D; theta)``, outer batch
``D'`` of ``m`` trajectories from ``pi_theta'``. Write ``g_hat'(D')`` for the
REINFORCE estimate at ``theta'`` on ``D'`` (same return convention),
``R_hat'(D') = (1/m) sum_j sum_t gamma^t r'_{j,t}`` for the outer return,
``S(D) = grad log p_theta(D) = sum_i sum_t grad log pi(a^i_t | s^i_t)`` for the
inner score, ``Jg(D) = d g_hat / d theta`` at fixed ``D``. Every estimator
here has the form::

    est(D, D') = (I + alpha_u H(D))^T g_hat'_u(D') + c(D) R_hat'(D')

and they differ in ``H`` (the inner Hessian estimate), the inner score term
``c(D)`` and, for the planted mistakes of the audit's catalogue, the inner
learning rate ``alpha_u`` (``g_hat'_u`` is then evaluated at
``theta + alpha_u g_hat(D)`` while ``D'`` is still drawn at the true
``theta'``) and the return conventions:

``dice`` (unbiased)
    Foerster et al. 2018, "DiCE: The Infinitely Differentiable Monte Carlo
    Estimator", applied to the whole stochastic computation graph of ``J``:
    every outer cost ``gamma^t r'_t`` carries the magic box of its causal past
    *and of the inner batch* (``theta'`` depends on ``D``), and the inner step
    is ``theta + alpha grad(L_in)`` with the REINFORCE surrogate ``L_in``.
    ``H = Jg(D)``, ``c = S(D)``: ``E[est] = grad J`` exactly.
``maml-original`` (biased)
    Finn et al. 2017's implementation: the same without the score term of the
    inner sampling, ``c = 0``. Bias ``-E_D[V(theta') S(D)]``.
``e-maml``
    The pre-update score term of E-MAML (Stadie et al. 2018, "Some
    Considerations on Learning to Explore via Meta-Reinforcement Learning"),
    here in the variant that *averages* the inner trajectories'
    log-likelihoods, ``c = S(D) / n``: equal to ``dice`` for ``n = 1``, biased
    by ``-(1 - 1/n) E_D[V(theta') S(D)]`` otherwise (the exact term is the sum).
``lvc`` (ProMP)
    Rothfuss et al. 2019, "ProMP": the low-variance curvature surrogate
    ``sum_t pi(a_t|s_t)/bot(pi(a_t|s_t)) G_t`` in the inner loop and no score
    term: ``H = Jg + (1/n) sum_i sum_t G_t s_t s_t^T`` (``s_t`` the step
    score), ``c = 0``. Biased for this ``J`` (ProMP trades the bias for
    variance).
``dice-inner``
    DiCE used only for the inner loss (second-order DiCE Hessian estimate
    ``H = Jg + (1/n) sum_i sum_t gamma^t r_t S_{<=t} S_{<=t}^T`` with the
    cumulative scores ``S_{<=t}``), no magic box on the inner batch in the
    outer loss, ``c = 0``: ``E[est]`` equals ``grad J`` to first order in
    ``alpha`` only (the bias is ``O(alpha^2)``, tested).
``fo-maml``
    First order: ``H = 0``, ``c = 0``.

:class:`EstimatorSpec` also describes planted mistakes (the audit's
catalogue): a wrong inner learning rate (``alpha_scale``), other return
conventions in the inner step or the outer estimate (``inner_kind``,
``outer_kind``: undiscounted, non-causal, cumulative sums in the wrong
direction), a batch-mean inner baseline (``inner_baseline``), and a flipped
sign (``sign``).

Exact expectations enumerate every inner batch ``D`` (``T^n``) and, given
``D``, every outer trajectory: each estimator is an average over the outer
batch, so ``E_{D'|D}[est] = est`` with ``g_hat'`` and ``R_hat'`` replaced by
their expectations over one trajectory of ``pi_theta'`` (exact for every
``m``). :func:`expectation_by_pairs` enumerates the ordered pairs
``(D, D')`` instead, for any callable estimator (the audit); the two agree to
round-off (tested). :func:`monte_carlo` samples pairs with a seeded generator
and :func:`z_test` compares the sample mean with an exact expectation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats

from reference.errors import InvalidInputError
from reference.rl._checks import check_int, check_scalar
from reference.rl.maml_rl import (
    DEFAULT_MAX_BATCHES,
    _block_hessian,
    _check_common,
    meta_objective_and_gradient,
    trajectory_terms,
)
from reference.rl.mdp import FiniteMDP, policy
from reference.rl.trajectories import (
    RETURN_KINDS,
    Trajectories,
    batch_indices,
    enumerate_trajectories,
    log_prob,
    sample_trajectories,
)

__all__ = [
    "EstimatorSpec",
    "ESTIMATORS",
    "get_estimator",
    "estimate",
    "exact_expectation",
    "exact_bias",
    "expectation_by_pairs",
    "iterate_pairs",
    "sample_pairs",
    "monte_carlo",
    "ZTest",
    "z_test",
]

_HESSIANS = ("exact", "dice", "lvc", "none")
_SCORES = ("sum", "mean", "none")
_BASELINES = ("none", "batch-mean")
_MEMORY_FLOATS = 4_000_000  # per vectorised chunk (~32 MB of float64)


@dataclass(frozen=True)
class EstimatorSpec:
    """One estimator of the family ``sign * [(I + alpha_u H(D))^T g_hat'_u(D') + c(D) R_hat'(D')]`` (module docstring).

    Attributes:
        name: catalogue name.
        hessian: ``"exact"`` (``Jg``), ``"dice"``, ``"lvc"`` or ``"none"`` (first order).
        inner_score: ``"sum"`` (``S(D)``), ``"mean"`` (``S(D)/n``) or ``"none"``.
        alpha_scale: ``alpha_u = alpha_scale * alpha`` (1 = the contract).
        inner_kind, outer_kind: return conventions of the user's inner step and outer estimate
            (:data:`reference.rl.trajectories.RETURN_KINDS`); the sampling always follows the contract.
        inner_baseline: ``"none"`` or ``"batch-mean"`` (the user's inner weights minus their mean over
            the inner batch at each time step, ``advantages = returns - returns.mean(0)``: a baseline
            that depends on the trajectory it is subtracted from).
        sign: ``+1``, or ``-1`` for a function that returns the objective where a loss is expected.
        summary: one line for reports.
    """

    name: str
    hessian: str = "exact"
    inner_score: str = "sum"
    alpha_scale: float = 1.0
    inner_kind: str = "discounted"
    outer_kind: str = "discounted"
    inner_baseline: str = "none"
    sign: float = 1.0
    summary: str = ""

    def __post_init__(self) -> None:
        if self.hessian not in _HESSIANS:
            raise InvalidInputError(f"hessian={self.hessian!r} must be one of {_HESSIANS}")
        if self.inner_score not in _SCORES:
            raise InvalidInputError(f"inner_score={self.inner_score!r} must be one of {_SCORES}")
        if self.inner_baseline not in _BASELINES:
            raise InvalidInputError(f"inner_baseline={self.inner_baseline!r} must be one of {_BASELINES}")
        for nm in ("inner_kind", "outer_kind"):
            if getattr(self, nm) not in RETURN_KINDS:
                raise InvalidInputError(f"{nm}={getattr(self, nm)!r} must be one of {RETURN_KINDS}")
        check_scalar("alpha_scale", self.alpha_scale)
        check_scalar("sign", self.sign)

    def variant(self, name: str, summary: str = "", **changes) -> EstimatorSpec:
        return replace(self, name=name, summary=summary or self.summary, **changes)


#: The named estimators (module docstring).
ESTIMATORS: dict[str, EstimatorSpec] = {
    s.name: s for s in (
        EstimatorSpec("dice", "exact", "sum", summary="DiCE on the full graph (unbiased)"),
        EstimatorSpec("maml-original", "exact", "none", summary="MAML-RL as in Finn et al. 2017: no inner score term"),
        EstimatorSpec("e-maml", "exact", "mean", summary="E-MAML: inner score term averaged over the inner batch"),
        EstimatorSpec("lvc", "lvc", "none", summary="ProMP's LVC inner surrogate, no inner score term"),
        EstimatorSpec("dice-inner", "dice", "none", summary="DiCE in the inner loss only (no magic box on D outside)"),
        EstimatorSpec("fo-maml", "none", "none", summary="first-order MAML-RL (no Hessian, no score term)"),
    )
}


def get_estimator(spec: str | EstimatorSpec) -> EstimatorSpec:
    if isinstance(spec, EstimatorSpec):
        return spec
    if spec not in ESTIMATORS:
        raise InvalidInputError(f"estimator={spec!r} is unknown; use one of {sorted(ESTIMATORS)} or an EstimatorSpec")
    return ESTIMATORS[spec]


@dataclass(frozen=True)
class _InnerParts:
    g_true: np.ndarray  # (..., d) the contract's g_hat(D) (sampling of D')
    g_user: np.ndarray  # (..., d) the estimator's inner step direction
    hessian: np.ndarray  # (..., d, d) H(D)
    score_term: np.ndarray  # (..., d) c(D)
    log_prob: np.ndarray  # (...,) log p_theta(D)


def _inner_parts(mdp: FiniteMDP, spec: EstimatorSpec, th: np.ndarray, inner: Trajectories,
                 b: np.ndarray | None) -> _InnerParts:
    """Everything an estimator needs from the inner batch ``inner`` (leading shape ``(..., n)``)."""
    n = inner.states.shape[-2]
    pi = policy(th)
    true = trajectory_terms(mdp, th, inner, baseline=b)
    user = true if spec.inner_kind == "discounted" else trajectory_terms(mdp, th, inner, kind=spec.inner_kind,
                                                                         baseline=b)
    w = user.weights
    if spec.inner_baseline == "batch-mean":
        w = w - w.mean(-2, keepdims=True)
    st = user.step_scores
    g_user = np.einsum("...hd,...h->...d", st, w).mean(-2)
    state_w = np.einsum("...hs,...h->...s", np.eye(mdp.n_states)[inner.states], w).mean(-2)
    d = mdp.n_params
    if spec.hessian == "none":
        H = np.zeros(g_user.shape[:-1] + (d, d))
    else:
        H = _block_hessian(pi, state_w)
        if spec.hessian == "lvc":
            H = H + np.einsum("...hd,...he,...h->...de", st, st, w).mean(-3)
        elif spec.hessian == "dice":
            cum = np.cumsum(st, axis=-2)  # S_{<=t}
            cost = inner.rewards * mdp.gamma ** np.arange(mdp.horizon)
            H = H + np.einsum("...hd,...he,...h->...de", cum, cum, cost).mean(-3)
    coef = {"sum": 1.0, "mean": 1.0 / n, "none": 0.0}[spec.inner_score]
    return _InnerParts(true.g.mean(-2), g_user, H, coef * true.score.sum(-2), true.log_prob.sum(-1))


def estimate(mdp: FiniteMDP, theta: ArrayLike, alpha: float, inner: Trajectories, outer: Trajectories,
             spec: str | EstimatorSpec = "dice", *, baseline: ArrayLike | None = None) -> np.ndarray:
    """One estimate per sample: ``inner`` has leading shape ``(..., n)``, ``outer`` ``(..., m)``; returns ``(..., d)``.

    ``outer`` must have been drawn from ``pi_theta'`` with the contract's
    ``theta' = theta + alpha g_hat(inner)`` (:func:`sample_pairs`,
    :func:`iterate_pairs`); this function does not check that.
    """
    spec = get_estimator(spec)
    th, alpha, _, b = _check_common(mdp, theta, alpha, 1, spec.inner_kind, baseline)
    parts = _inner_parts(mdp, spec, th, inner, b)
    alpha_u = spec.alpha_scale * alpha
    theta_u = th + alpha_u * parts.g_user.reshape(parts.g_user.shape[:-1] + th.shape)
    out_terms = trajectory_terms(mdp, theta_u[..., None, :, :], outer, kind=spec.outer_kind)
    g_out = out_terms.g.mean(-2)
    ret_out = out_terms.discounted_return.mean(-1)
    est = g_out + alpha_u * np.einsum("...de,...d->...e", parts.hessian, g_out)
    return spec.sign * (est + ret_out[..., None] * parts.score_term)


def exact_expectation(mdp: FiniteMDP, theta: ArrayLike, alpha: float, batch_size: int,
                      spec: str | EstimatorSpec = "dice", *, baseline: ArrayLike | None = None,
                      max_batches: int = DEFAULT_MAX_BATCHES) -> np.ndarray:
    """``E_{D, D'}[est(D, D')]`` exactly: all ``T^n`` inner batches, all outer trajectories given each.

    Valid for every outer batch size ``m`` (the estimators average over ``D'``).
    """
    spec = get_estimator(spec)
    th, alpha, n, b = _check_common(mdp, theta, alpha, batch_size, spec.inner_kind, baseline)
    traj = enumerate_trajectories(mdp)
    T, d = traj.count, mdp.n_params
    if T**n > max_batches:
        raise InvalidInputError(
            f"{mdp.name} with batch_size={n} has T^n = {T}^{n} = {T**n} inner batches, more than "
            f"max_batches={max_batches}; use a smaller MDP/batch, raise max_batches, or the Monte-Carlo mode")
    total = np.zeros(d, dtype=np.result_type(th, alpha, np.float64))
    alpha_u = spec.alpha_scale * alpha
    idx_all = batch_indices(T, n)
    chunk = max(1, _MEMORY_FLOATS // (T * mdp.horizon * d))
    for lo in range(0, len(idx_all), chunk):
        idx = idx_all[lo:lo + chunk]
        parts = _inner_parts(mdp, spec, th, traj.take(idx), b)
        theta_true = th + alpha * parts.g_true.reshape((-1,) + th.shape)
        theta_u = th + alpha_u * parts.g_user.reshape((-1,) + th.shape)
        p_out = np.exp(log_prob(mdp, theta_true[:, None], traj))  # (K, T): D' is drawn at the contract's theta'
        out = trajectory_terms(mdp, theta_u[:, None], traj, kind=spec.outer_kind)
        Eg = np.einsum("kt,ktd->kd", p_out, out.g)
        Eret = p_out @ out.discounted_return
        est = Eg + alpha_u * np.einsum("kde,kd->ke", parts.hessian, Eg) + Eret[:, None] * parts.score_term
        total = total + np.exp(parts.log_prob) @ est
    return spec.sign * total


def exact_bias(mdp: FiniteMDP, theta: ArrayLike, alpha: float, batch_size: int,
               spec: str | EstimatorSpec = "maml-original", *, baseline: ArrayLike | None = None,
               max_batches: int = DEFAULT_MAX_BATCHES) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(E[est], grad J, E[est] - grad J)``: the exact bias vector of an estimator."""
    mean = exact_expectation(mdp, theta, alpha, batch_size, spec, baseline=baseline, max_batches=max_batches)
    _, grad = meta_objective_and_gradient(mdp, theta, alpha, batch_size, baseline=baseline, max_batches=max_batches)
    return mean, grad, mean - grad


def iterate_pairs(mdp: FiniteMDP, theta: ArrayLike, alpha: float, batch_size: int, outer_size: int, *,
                  baseline: ArrayLike | None = None, max_pairs: int = 2_000_000, chunk: int = 4096
                  ) -> Iterator[tuple[Trajectories, Trajectories, np.ndarray]]:
    """Every ordered pair ``(D, D')`` with its probability ``p_theta(D) p_theta'(D')``, in chunks.

    Yields ``(inner (K, n, H), outer (K, m, H), prob (K,))``; ``T^n * T^m`` pairs in all.
    """
    th, alpha, n, b = _check_common(mdp, theta, alpha, batch_size, "discounted", baseline)
    m = check_int("outer_size", outer_size, hint=" (the number of outer trajectories m)")
    traj = enumerate_trajectories(mdp)
    T = traj.count
    if T ** (n + m) > max_pairs:
        raise InvalidInputError(
            f"{mdp.name} with batch_size={n}, outer_size={m} has T^(n+m) = {T}^{n + m} = {T ** (n + m)} "
            f"(D, D') pairs, more than max_pairs={max_pairs}; use a smaller problem or the Monte-Carlo mode")
    terms = trajectory_terms(mdp, th, traj, baseline=b)
    inner_idx, outer_idx = batch_indices(T, n), batch_indices(T, m)
    for i0 in range(0, len(inner_idx), max(1, chunk // len(outer_idx))):
        idx = inner_idx[i0:i0 + max(1, chunk // len(outer_idx))]
        p_D = np.exp(terms.log_prob[idx].sum(-1))
        theta_p = th + alpha * terms.g[idx].mean(-2).reshape((-1,) + th.shape)
        lp_out = log_prob(mdp, theta_p[:, None], traj)  # (K, T)
        p_out = np.exp(lp_out[:, outer_idx].sum(-1))  # (K, T^m)
        K, M = len(idx), len(outer_idx)
        ii = np.repeat(idx, M, axis=0)
        oo = np.tile(outer_idx, (K, 1))
        yield traj.take(ii), traj.take(oo), (p_D[:, None] * p_out).ravel()


def expectation_by_pairs(fn: Callable[[Trajectories, Trajectories], np.ndarray], mdp: FiniteMDP, theta: ArrayLike,
                         alpha: float, batch_size: int, outer_size: int, *, baseline: ArrayLike | None = None,
                         max_pairs: int = 2_000_000) -> np.ndarray:
    """``sum_{D, D'} p(D, D') fn(D, D')`` for a vectorised ``fn(inner (K, n, H), outer (K, m, H)) -> (K, d)``."""
    total = None
    for inner, outer, prob in iterate_pairs(mdp, theta, alpha, batch_size, outer_size, baseline=baseline,
                                            max_pairs=max_pairs):
        part = prob @ np.asarray(fn(inner, outer))
        total = part if total is None else total + part
    return total


def sample_pairs(mdp: FiniteMDP, theta: ArrayLike, alpha: float, batch_size: int, outer_size: int, samples: int,
                 *, seed: int = 0, baseline: ArrayLike | None = None) -> tuple[Trajectories, Trajectories]:
    """``samples`` independent pairs: ``D ~ p_theta`` (``(N, n, H)``), then ``D' ~ p_theta'`` (``(N, m, H)``)."""
    th, alpha, n, b = _check_common(mdp, theta, alpha, batch_size, "discounted", baseline)
    if np.iscomplexobj(th) or isinstance(alpha, complex):
        raise InvalidInputError("sampling needs a real theta and alpha")
    m = check_int("outer_size", outer_size)
    N = check_int("samples", samples)
    rng = np.random.default_rng(seed)
    inner = sample_trajectories(mdp, np.broadcast_to(th, (N,) + th.shape), n, rng)
    g = trajectory_terms(mdp, th, inner, baseline=b).g.mean(-2)
    theta_p = th + alpha * g.reshape((N,) + th.shape)
    outer = sample_trajectories(mdp, theta_p, m, rng)
    return inner, outer


def monte_carlo(mdp: FiniteMDP, theta: ArrayLike, alpha: float, batch_size: int, outer_size: int,
                spec: str | EstimatorSpec = "dice", *, samples: int = 10_000, seed: int = 0,
                baseline: ArrayLike | None = None) -> np.ndarray:
    """``samples`` seeded estimates ``(N, d)`` of ``spec`` (for :func:`z_test`)."""
    inner, outer = sample_pairs(mdp, theta, alpha, batch_size, outer_size, samples, seed=seed, baseline=baseline)
    return estimate(mdp, theta, alpha, inner, outer, spec, baseline=baseline)


@dataclass(frozen=True)
class ZTest:
    """Per-coordinate z-test of a sample mean against a reference, Bonferroni-corrected.

    Attributes:
        passed: no coordinate's ``|z|`` exceeds ``threshold``.
        z: ``(mean - reference) / (sd / sqrt(N))`` per coordinate (0 where both the sd and the
            difference vanish; inf where the sd vanishes but the difference does not).
        threshold: ``Phi^-1(1 - level / (2 d))``.
        mean, stderr: the sample mean and its standard error.
    """

    passed: bool
    z: np.ndarray
    threshold: float
    mean: np.ndarray
    stderr: np.ndarray
    samples: int
    level: float

    @property
    def max_abs_z(self) -> float:
        return float(np.max(np.abs(self.z)))


def z_test(samples: ArrayLike, reference: ArrayLike, *, level: float = 1e-3) -> ZTest:
    """Does the mean of ``samples`` (``(N, d)``) agree with ``reference`` (``(d,)``)? Two-sided, family-wise ``level``.

    A coordinate with zero sample variance (e.g. the gradient of a state the
    MDP never reaches) must match to round-off (``1e-12`` of the scale).
    """
    x = np.asarray(samples, dtype=float)
    ref = np.asarray(reference, dtype=float)
    if x.ndim != 2 or ref.shape != x.shape[1:]:
        raise InvalidInputError(f"samples has shape {x.shape} and reference {ref.shape}; expected (N, d) and (d,)")
    N = x.shape[0]
    if N < 30:
        raise InvalidInputError(f"samples has N={N} rows; the z-test's normal approximation needs N >= 30")
    level = check_scalar("level", level, low=1e-300, high=0.5)
    mean = x.mean(0)
    se = x.std(0, ddof=1) / math.sqrt(N)
    diff = mean - ref
    scale = max(float(np.max(np.abs(ref))), float(np.max(np.abs(mean))), 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):  # se == 0 handled just below
        z = np.where(se > 0, diff / np.where(se > 0, se, 1.0), np.where(np.abs(diff) <= 1e-12 * scale, 0.0, np.inf))
    thr = float(stats.norm.ppf(1 - level / (2 * x.shape[1])))
    return ZTest(bool(np.all(np.abs(z) <= thr)), z, thr, mean, se, N, level)
