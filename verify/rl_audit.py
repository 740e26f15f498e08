"""Audit of a meta-policy-gradient estimator (MAML-RL): exact expectation, bias, and which estimator it is.

Backend-neutral core; the framework harnesses (:mod:`verify.backends.torch.rl_harness`,
:mod:`verify.backends.jax.rl_harness`) turn a user's surrogate-loss function
into a *gradient callable* ``grad_fn(theta, inner, outer, alpha, gamma) ->
(K, S*A)`` over chunks of ``K`` batch pairs, returning the user's estimate of
``grad J`` (minus the gradient of their loss: a loss is minimised, ``J`` is a
return).

The user's calling contract (both frameworks)::

    loss = fn(params, inner, outer, alpha, gamma)       # or (loss, grads)

* ``params``: the tabular softmax logits ``theta``, shape ``(S, A)``, float64,
  ``pi_theta(a | s) = softmax(theta[s])[a]``;
* ``inner`` / ``outer``: mappings with ``states``, ``actions`` (int64,
  ``(n, H)`` / ``(m, H)``), ``rewards`` (float64) and ``log_probs`` (float64,
  ``log pi(a_t | s_t)`` of the policy that *sampled* them, as recorded by a
  sampler: ``theta`` for the inner batch, ``theta'`` for the outer; constants,
  not differentiable);
* ``alpha``: inner step size; ``gamma``: discount.

The contract of the objective (CONVENTIONS.md, :mod:`reference.rl.maml_rl`):
``theta' = theta + alpha g_hat(D)``, ``g_hat`` REINFORCE with the causal
reward-to-go discounted from time 0 (``sum_{k>=t} gamma^k r_k``), no baseline,
mean over the ``n`` inner trajectories; ``J = E_D[V(theta')]``. The outer
batch is drawn at that ``theta'``.

The audit enumerates every ordered pair ``(D, D')`` on a small random MDP
with its probability, computes ``E[user gradient]`` exactly, compares it with
``grad J`` (:func:`reference.rl.meta_objective_and_gradient`) and, on a
mismatch, with the exact expectations of a catalogue of estimators and planted
mistakes (:mod:`reference.rl.estimators`): missing inner score term, E-MAML's
mean, LVC, DiCE in the inner loss only, first order, a wrong inner learning
rate (fitted), undiscounted / non-causal / reversed cumulative sums in the
inner or outer returns, a batch-mean baseline, a flipped sign. When the pairs
are too many to enumerate it falls back to a seeded Monte-Carlo z-test and
says so.

An audit checks the **bias** of the estimator (its expectation), not its
variance: estimators that differ only in variance (e.g. non-causal returns in
the outer loss) are, correctly, reported as unbiased.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import optimize

from reference.errors import AuditInputError, InvalidInputError
from reference.rl import (
    ESTIMATORS,
    EstimatorSpec,
    FiniteMDP,
    Trajectories,
    exact_expectation,
    iterate_pairs,
    meta_objective_and_gradient,
    random_mdp,
    reinforce,
    sample_pairs,
    step_log_probs,
    z_test,
)
from reference.rl.trajectories import count_trajectories

__all__ = ["RLProblem", "default_problem", "Candidate", "catalogue", "RLAuditResult", "audit_maml_rl", "audit_function",
           "exact_user_expectation", "batch_dict", "MATCH_RTOL"]

#: Relative distance ``||E_user - E_ref|| / ||E_ref||`` under which two exact expectations are called
#: equal. sqrt(eps64) = 1.5e-8: far above the round-off of a float64 sum over a few thousand pairs
#: (~1e-14), far below the separation of the catalogue entries on the audit problem (checked: >= 1e-3).
MATCH_RTOL = math.sqrt(np.finfo(np.float64).eps)

GradFn = Callable[[np.ndarray, Mapping[str, np.ndarray], Mapping[str, np.ndarray], float, float], np.ndarray]


@dataclass(frozen=True)
class RLProblem:
    """The audit problem: an MDP, the policy logits, the step size and the batch sizes."""

    mdp: FiniteMDP
    theta: np.ndarray
    alpha: float
    batch_size: int
    outer_size: int
    seed: int = 0

    def describe(self) -> str:
        return (f"{self.mdp.name} (gamma={self.mdp.gamma:g}), n={self.batch_size} inner and m={self.outer_size} "
                f"outer trajectories, alpha={self.alpha:g}")

    @property
    def pairs(self) -> int:
        return count_trajectories(self.mdp) ** (self.batch_size + self.outer_size)


def default_problem(seed: int = 0, *, n_states: int = 2, n_actions: int = 2, horizon: int = 2,
                    batch_size: int = 2, outer_size: int = 1, alpha: float = 1.5, gamma: float = 0.9,
                    start_state: int | None = 0) -> RLProblem:
    """A random MDP small enough to enumerate (``S = A = H = 2``, start in state 0, ``n = 2``, ``m = 1``: 512 pairs).

    ``n = 2`` separates E-MAML's mean from DiCE's sum and gives the batch-mean baseline something to do;
    ``gamma < 1`` and ``H = 2`` separate the return conventions; ``alpha = 1.5`` separates the estimators
    that agree to first order in ``alpha``. At ``seed=0`` the 84 catalogue entries are pairwise at least
    5.7e-3 apart (relative); at seeds 1-3, 6.7e-4 to 7.9e-3: all far above :data:`MATCH_RTOL`.
    ``start_state=None`` keeps the random start distribution (8x more trajectory pairs).
    """
    mdp = random_mdp(n_states, n_actions, horizon, gamma=gamma, seed=seed)
    if start_state is not None:
        rho0 = np.zeros(n_states)
        rho0[start_state] = 1.0
        mdp = FiniteMDP(mdp.P, mdp.r, rho0, mdp.horizon, mdp.gamma,
                        name=f"random(S={n_states}, A={n_actions}, H={horizon}, seed={seed}, start={start_state})")
    theta = 0.5 * np.random.default_rng(seed + 1).standard_normal((n_states, n_actions))
    return RLProblem(mdp, theta, alpha, batch_size, outer_size, seed)


def batch_dict(mdp: FiniteMDP, theta: np.ndarray, traj: Trajectories) -> dict[str, np.ndarray]:
    """The mapping a user's function receives: states, actions, rewards, log_probs (of the sampling policy)."""
    return {"states": traj.states, "actions": traj.actions, "rewards": traj.rewards,
            "log_probs": step_log_probs(mdp, theta, traj)}


def _chunk_dicts(problem: RLProblem, inner: Trajectories, outer: Trajectories
                 ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    th = problem.theta
    g = reinforce(problem.mdp, th, inner)  # (K, d): the contract's inner step, at which D' was drawn
    theta_p = th + problem.alpha * g.reshape((-1,) + th.shape)
    return batch_dict(problem.mdp, th, inner), batch_dict(problem.mdp, theta_p[:, None], outer)


def exact_user_expectation(grad_fn: GradFn, problem: RLProblem, *, max_pairs: int = 100_000,
                           chunk: int = 4096) -> np.ndarray:
    """``sum_{D, D'} p(D, D') grad_fn(D, D')`` over every ordered pair (``T^(n+m)`` of them)."""
    total = None
    for inner, outer, prob in iterate_pairs(problem.mdp, problem.theta, problem.alpha, problem.batch_size,
                                            problem.outer_size, max_pairs=max_pairs, chunk=chunk):
        di, do = _chunk_dicts(problem, inner, outer)
        g = np.asarray(grad_fn(problem.theta, di, do, problem.alpha, problem.mdp.gamma), dtype=float)
        part = prob @ g
        total = part if total is None else total + part
    return total


# ---------------------------------------------------------------------------
# The catalogue
# ---------------------------------------------------------------------------

_ESTIMATOR_TEXT = {
    "dice": "",
    "maml-original": "missing inner score term (the original MAML-RL estimator): the outer loss does not depend on "
                     "the inner batch's log-probabilities, so the gradient of the inner sampling distribution, "
                     "E_D[V(theta') grad log p_theta(D)], is dropped",
    "e-maml": "inner score term averaged over the inner trajectories (E-MAML style mean of log-likelihoods): "
              "grad log p_theta(D) is the SUM over the n trajectories",
    "lvc": "LVC (ProMP) inner surrogate: biased by design (no inner score term, per-step importance weights drop "
           "the cross-time terms of the Hessian)",
    "dice-inner": "DiCE in the inner loss only: the second-order DiCE Hessian estimate is used for d theta'/d theta "
                  "and the outer loss carries no magic box over the inner batch (exact to first order in alpha only)",
    "fo-maml": "first-order MAML-RL: no second-order term through the inner step and no inner score term",
}
_KIND_TEXT = {
    "undiscounted": "reward-to-go without the gamma^t factor (sum_{k>=t} gamma^(k-t) r_k instead of "
                    "sum_{k>=t} gamma^k r_k)",
    "total": "the whole-trajectory return at every step (non-causal)",
    "past": "cumulative sum in the wrong direction (sum_{k<=t} gamma^k r_k: past rewards instead of future ones)",
}
_FIX = {
    "maml-original": "multiply every outer cost by the magic box of the inner trajectories' log-probability "
                     "(DiCE over the whole graph), or add sum_i log pi(tau_i) * R(D') to the outer surrogate",
    "e-maml": "sum the inner trajectories' log-probabilities in the score term instead of averaging them",
    "dice-inner": "differentiate the inner step through a plain REINFORCE surrogate and put the inner batch's "
                  "magic box into the outer loss",
}


@dataclass(frozen=True)
class Candidate:
    """A catalogue entry: an estimator spec, its exact expectation on the problem and its diagnosis text."""

    key: str
    spec: EstimatorSpec
    expectation: np.ndarray
    text: str
    fix: str = ""


def _describe(spec: EstimatorSpec, base: str) -> tuple[str, str, str]:
    parts, fixes = [], []
    if base != "dice":
        parts.append(_ESTIMATOR_TEXT[base])
        if base in _FIX:
            fixes.append(_FIX[base])
    if spec.alpha_scale != 1.0:
        parts.append(f"wrong inner learning rate: the inner step uses {spec.alpha_scale:.6g} x alpha")
        fixes.append("use theta' = theta + alpha * grad(inner surrogate)")
    if spec.inner_kind != "discounted":
        parts.append(f"inner step: {_KIND_TEXT[spec.inner_kind]}")
        fixes.append("inner returns: reverse cumulative sum of gamma^k r_k (discounted from time 0)")
    if spec.outer_kind != "discounted":
        parts.append(f"outer estimate: {_KIND_TEXT[spec.outer_kind]}")
        fixes.append("outer returns: reverse cumulative sum of gamma^k r_k (or a magic box over a_{<=t} per cost)")
    if spec.inner_baseline != "none":
        parts.append("wrong baseline: the inner advantages subtract the batch mean of the returns, which includes "
                     "the trajectory's own return (the contract has no baseline)")
        fixes.append("drop the baseline, or use one that does not depend on the trajectory it is subtracted from")
    if spec.sign < 0:
        parts.append("sign flipped: the function returns the objective to maximise where a loss is expected")
        fixes.append("return minus the surrogate objective")
    flags = ((f"lr*{spec.alpha_scale:.6g}", spec.alpha_scale != 1.0),
             (f"inner:{spec.inner_kind}", spec.inner_kind != "discounted"),
             (f"outer:{spec.outer_kind}", spec.outer_kind != "discounted"),
             ("batch-mean-baseline", spec.inner_baseline != "none"),
             ("sign", spec.sign < 0))
    key = base + "".join(f"+{k}" for k, on in flags if on)
    return key, "; ".join(parts) or "unbiased (DiCE)", "; ".join(fixes)


def _expect(problem: RLProblem, spec: EstimatorSpec) -> np.ndarray:
    return exact_expectation(problem.mdp, problem.theta, problem.alpha, problem.batch_size, spec)


def catalogue(problem: RLProblem) -> list[Candidate]:
    """Every named estimator, alone or with one planted mistake, with either sign (exact expectations)."""
    modifiers: list[dict[str, Any]] = [{}]
    modifiers += [{"inner_kind": k} for k in ("undiscounted", "total", "past")]
    modifiers += [{"outer_kind": k} for k in ("undiscounted", "past")]  # outer "total" is unbiased: same expectation
    modifiers += [{"inner_baseline": "batch-mean"}]
    out = []
    for base, spec0 in ESTIMATORS.items():
        for mod in modifiers:
            for sign in (1.0, -1.0):
                spec = spec0.variant(spec0.name, **mod, sign=sign)
                key, text, fix = _describe(spec, base)
                out.append(Candidate(key, spec, _expect(problem, spec), text, fix))
    return out


def _fit_alpha(problem: RLProblem, target: np.ndarray, base: str, sign: float) -> Candidate | None:
    """The inner learning-rate factor ``c`` for which ``base`` (with ``c alpha``) best explains ``target``."""
    spec0 = ESTIMATORS[base].variant(base, sign=sign)

    def dist(c: float) -> float:
        e = _expect(problem, spec0.variant(base, alpha_scale=float(c)))
        return float(np.linalg.norm(e - target) / max(np.linalg.norm(target), 1e-300))

    grid = np.concatenate([np.linspace(-3.0, 3.0, 25), [0.1, 0.25, 0.5, 2.0, 4.0]])
    vals = [dist(c) for c in grid]
    c0 = float(grid[int(np.argmin(vals))])
    res = optimize.minimize_scalar(dist, bounds=(c0 - 0.25, c0 + 0.25), method="bounded",
                                   options={"xatol": 1e-10})
    c = float(res.x)
    if not np.isfinite(c) or abs(c - 1.0) < 1e-6:
        return None
    c_round = round(c, 6)
    spec = spec0.variant(base, alpha_scale=c_round if abs(c - c_round) < 1e-7 else c)
    key, text, fix = _describe(spec, base)
    return Candidate(key, spec, _expect(problem, spec), text, fix)


# ---------------------------------------------------------------------------
# The audit
# ---------------------------------------------------------------------------


@dataclass
class RLAuditResult:
    """The verdict of :func:`audit_maml_rl`.

    Attributes:
        passed: the estimator is unbiased (exact mode: ``E[user] == grad J`` to :data:`MATCH_RTOL`;
            Monte-Carlo mode: the z-test does not reject ``grad J``).
        mode: ``"exact"`` or ``"monte-carlo"``.
        matches: catalogue keys whose expectation equals the user's (exact) or that the z-test does
            not reject (Monte-Carlo), best first.
        diagnosis: one paragraph: what the estimator is, or "unexplained".
        user_expectation, grad_J: the two vectors compared; ``relative_error`` their distance.
        distances: catalogue key -> relative distance (exact mode) or max |z| (Monte-Carlo mode).
    """

    passed: bool
    mode: str
    problem: RLProblem
    backend: str
    grad_J: np.ndarray
    user_expectation: np.ndarray
    relative_error: float
    matches: list[str]
    diagnosis: str
    fix: str
    distances: dict[str, float]
    seconds: float
    calls: int
    note: str = ""
    z: dict[str, Any] = field(default_factory=dict)
    title: str = ""

    @property
    def status(self) -> str:
        return "pass" if self.passed else "fail"

    def report(self) -> str:
        head = f"metaverify audit (maml-rl{', ' + self.backend if self.backend else ''})"
        if self.title:
            head += f": {self.title}"
        lines = [head, f"  problem: {self.problem.describe()}"]
        if self.mode == "exact":
            lines.append(f"  exact expectation of your gradient over all {self.calls} (D, D') pairs, "
                         f"weighted by their probabilities ({self.seconds:.1f} s)")
            lines.append(f"  ||E[your gradient] - grad J|| / ||grad J|| = {self.relative_error:.3e} "
                         f"(tolerance {MATCH_RTOL:.1e})")
        else:
            lines.append(f"  Monte-Carlo mode ({self.note}): {self.calls} seeded samples, "
                         f"max |z| = {self.z.get('max_abs_z', float('nan')):.2f} against grad J "
                         f"(threshold {self.z.get('threshold', float('nan')):.2f}, family-wise level "
                         f"{self.z.get('level', float('nan')):g}) ({self.seconds:.1f} s)")
        verdict = "PASS" if self.passed else "FAIL"
        lines.append(f"  {verdict}: {self.diagnosis}")
        if self.matches:
            lines.append(f"  matches: {', '.join(self.matches[:6])}")
        if not self.passed and self.fix:
            lines.append(f"  fix: {self.fix}")
        if not self.passed:
            near = sorted(self.distances.items(), key=lambda kv: kv[1])[:4]
            label = "relative distance" if self.mode == "exact" else "max |z|"
            lines.append("  closest catalogue entries (" + label + "): "
                         + ", ".join(f"{k} {v:.2e}" for k, v in near))
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"algorithm": "maml-rl", "status": self.status, "mode": self.mode, "backend": self.backend,
                "problem": self.problem.describe(), "relative_error": self.relative_error,
                "matches": list(self.matches), "diagnosis": self.diagnosis, "fix": self.fix,
                "grad_J": self.grad_J.tolist(), "user_expectation": self.user_expectation.tolist(),
                "seconds": self.seconds, "calls": self.calls, "note": self.note, "z": dict(self.z)}


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def audit_maml_rl(grad_fn: GradFn, *, problem: RLProblem | None = None, backend: str = "", seed: int = 0,
                  max_pairs: int = 100_000, samples: int = 4000, level: float = 1e-3, title: str = ""
                  ) -> RLAuditResult:
    """Audit a gradient callable (from a harness) against ``grad J`` and the catalogue.

    Args:
        grad_fn: ``grad_fn(theta, inner, outer, alpha, gamma) -> (K, S*A)`` on chunks of ``K`` pairs
            (the harnesses build it from the user's surrogate-loss function).
        problem: default :func:`default_problem` (``seed``).
        max_pairs: enumerate when ``T^(n+m) <= max_pairs``, otherwise Monte-Carlo with ``samples``
            seeded pairs and a Bonferroni z-test at family-wise ``level``.
    """
    problem = problem or default_problem(seed)
    t0 = time.perf_counter()
    _, gJ = meta_objective_and_gradient(problem.mdp, problem.theta, problem.alpha, problem.batch_size)
    n_pairs = problem.pairs
    if n_pairs <= max_pairs:
        E_u = exact_user_expectation(grad_fn, problem, max_pairs=max_pairs)
        if not np.all(np.isfinite(E_u)):
            raise AuditInputError("the function's gradients contain NaN or inf on some batch pair")
        err = _rel(E_u, gJ)
        if err <= MATCH_RTOL:
            return RLAuditResult(True, "exact", problem, backend, gJ, E_u, err, ["dice"],
                                 "unbiased: the exact expectation of your gradient equals grad J (DiCE-equivalent)",
                                 "", {}, time.perf_counter() - t0, n_pairs, title=title)
        cands = catalogue(problem)
        dist = {c.key: _rel(E_u, c.expectation) for c in cands}
        hits = [c for c in cands if dist[c.key] <= MATCH_RTOL]
        if not hits:
            for base in ESTIMATORS:
                for sign in (1.0, -1.0):
                    c = _fit_alpha(problem, E_u, base, sign)
                    if c is not None:
                        dist[c.key] = _rel(E_u, c.expectation)
                        if dist[c.key] <= MATCH_RTOL:
                            hits.append(c)
                if hits:
                    break
        hits.sort(key=lambda c: (c.key.count("+"), dist[c.key]))
        if hits:
            best = hits[0]
            diag = f"the estimator is biased and matches the catalogue entry {best.key!r}: {best.text}"
            fix = best.fix
        else:
            diag = ("unexplained: the exact expectation of your gradient differs from grad J and from every "
                    "catalogue entry (estimators and planted mistakes); inspect the closest entries below")
            fix = ""
        return RLAuditResult(False, "exact", problem, backend, gJ, E_u, err, [c.key for c in hits], diag, fix, dist,
                             time.perf_counter() - t0, n_pairs, title=title)
    # Monte-Carlo fallback
    note = (f"enumeration too large: T^(n+m) = {n_pairs} pairs > max_pairs={max_pairs}; "
            "the bias is tested statistically, not exactly")
    inner, outer = sample_pairs(problem.mdp, problem.theta, problem.alpha, problem.batch_size, problem.outer_size,
                                samples, seed=seed)
    g = []
    step = 1024
    for lo in range(0, samples, step):
        sl = slice(lo, lo + step)
        di, do = _chunk_dicts(problem, _take(inner, sl), _take(outer, sl))
        g.append(np.asarray(grad_fn(problem.theta, di, do, problem.alpha, problem.mdp.gamma), dtype=float))
    X = np.concatenate(g)
    zt = z_test(X, gJ, level=level)
    zinfo = {"max_abs_z": zt.max_abs_z, "threshold": zt.threshold, "level": level}
    if zt.passed:
        return RLAuditResult(True, "monte-carlo", problem, backend, gJ, zt.mean, _rel(zt.mean, gJ), ["dice"],
                             "consistent with an unbiased estimator (the z-test does not reject grad J)", "", {},
                             time.perf_counter() - t0, samples, note, zinfo, title)
    dist, hits = {}, []
    try:
        cands = catalogue(problem)
    except InvalidInputError:  # even the catalogue's structured sums are too large
        cands = []
    for c in cands:
        zc = z_test(X, c.expectation, level=level)
        dist[c.key] = zc.max_abs_z
        if zc.passed:
            hits.append(c)
    hits.sort(key=lambda c: (c.key.count("+"), dist[c.key]))
    if hits:
        diag = (f"biased (the z-test rejects grad J); consistent with the catalogue entry {hits[0].key!r}: "
                f"{hits[0].text}")
        fix = hits[0].fix
    else:
        diag = "biased (the z-test rejects grad J) and unexplained by the catalogue"
        fix = ""
    return RLAuditResult(False, "monte-carlo", problem, backend, gJ, zt.mean, _rel(zt.mean, gJ),
                         [c.key for c in hits], diag, fix, dist, time.perf_counter() - t0, samples, note, zinfo, title)


def _take(traj: Trajectories, sl: slice) -> Trajectories:
    return Trajectories(traj.states[sl], traj.actions[sl], traj.rewards[sl], traj.env_log_prob[sl])


def audit_function(fn: Callable[..., Any], backend: str = "torch", **kwargs: Any) -> RLAuditResult:
    """Audit a user's surrogate-loss function (torch or JAX, contract in the module docstring).

    ``kwargs`` go to :func:`audit_maml_rl` (``problem``, ``seed``, ``max_pairs``, ``samples``, ``level``, ``title``).
    """
    if backend == "torch":
        from verify.backends.torch.rl_harness import gradient_callable
    elif backend == "jax":
        from verify.backends.jax.rl_harness import gradient_callable
    else:
        raise InvalidInputError(f"backend={backend!r} must be 'torch' or 'jax'")
    return audit_maml_rl(gradient_callable(fn), backend=backend, **kwargs)
