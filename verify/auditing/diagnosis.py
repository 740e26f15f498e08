"""The diagnosis catalogue: known-wrong meta-gradients, computed analytically from the reference.

A gradient checker says "mismatch". The audit (:mod:`verify.auditing`) also says
*which* bug produced the mismatch when it can: every entry of
:data:`CATALOGUE` is a known way of getting a meta-gradient wrong, and for a
given problem (a :class:`verify.algorithms.Case`) the wrong meta-gradient it
produces is computed here **analytically**, from the NumPy reference's own
pieces (``model._loss_and_grad``, exact Hessian-vector products
``model._hvp``, the reference algorithms run with changed arguments). Nothing
here runs the implementation under audit or any autodiff framework.

A claimed gradient ``g`` is diagnosed as variant ``V`` when

* ``g`` does **not** match the correct meta-gradient (the audit decided that), and
* ``g`` matches ``V``'s gradient within the audit's tolerance
  (normwise: ``max|g - g_V| / max(max|g|, max|g_V|) <= tol``), and, when both
  are known, the claimed meta-loss matches ``V``'s meta-loss too.

Variants come in three kinds:

* **fixed** variants, one gradient each (first-order only; only the last inner
  step differentiated; ``K' != K`` inner steps; support and query swapped;
  ANIL instead of MAML; ...);
* **fitted** variants with free parameters chosen to explain ``g`` (the
  effective inner learning rate ``a`` and a scale ``c`` of
  ``c * g_MAML(a)``, by Gauss-Newton on ``||g - c g_MAML(a)||`` with the exact
  derivative ``d g_MAML / da`` from a complex step in ``a``; iMAML's
  ``(c I + H/lam') x = grad L_q`` by least squares over ``(c, 1/lam')`` on the
  eigendecompositions of the task Hessians; a constant factor by projection);
  a fitted variant explains ``g`` only if the residual after fitting is at
  round-off level (``<= tol``), which two parameters cannot achieve by chance
  for a gradient with more than a handful of entries;
* **layers** on top of the correct gradient or a fixed variant: a constant
  factor (sum instead of mean over tasks, reduction ``"sum"``, sign), and
  disconnected tensors (the tensors whose claimed gradient is ``None`` or
  exactly zero are zeroed in the candidate; the others must match).

Among the variants that match, the simplest (fixed before fitted before
layered) with the smallest error is reported; the others are listed as
"also consistent with".
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from reference.errors import MetaverifyError
from reference.models import MAX_DENSE_HESSIAN, flatten
from reference.tasks import Task
from verify._verdict import jsonable
from verify.algorithms import Case, evaluate

__all__ = ["CATALOGUE", "Candidate", "Diagnosis", "Entry", "candidates", "diagnose", "match_error"]

GRADIENT_BASED = ("maml", "fomaml", "anil", "metasgd")
BACKBONES = ("r2d2", "lrd2", "protonet", "matchingnet")


@dataclass(frozen=True)
class Entry:
    """One known-wrong variant: what it is, where it applies, what code produces it."""

    key: str
    title: str
    algorithms: tuple[str, ...]
    cause: str


CATALOGUE: dict[str, Entry] = {
    e.key: e
    for e in [
        Entry("first_order", "first-order only: the inner-loop gradients were not differentiated",
              ("maml", "anil", "metasgd", "newton", "imaml"),
              "torch: torch.autograd.grad(..., create_graph=False) or .detach() in the inner loop, higher's "
              "track_higher_grads=False, learn2learn first_order=True; JAX: jax.lax.stop_gradient on the inner "
              "gradient. iMAML: the implicit solve skipped (grad L_q(phi*) returned). The result is FOMAML's "
              "direction, not the meta-gradient"),
        Entry("second_order_instead", "exact second-order MAML gradient returned where FOMAML was asked",
              ("fomaml",), "the inner gradients were differentiated (create_graph=True); FOMAML defines the "
              "direction with every step Jacobian replaced by the identity"),
        Entry("last_step_only", "only the last inner step differentiated", ("maml", "anil", "metasgd"),
              "create_graph=True (or no stop_gradient) only on the last inner step; the earlier steps' "
              "Jacobians (I - alpha H_s(p_k)) are replaced by I"),
        Entry("first_step_only", "only the first inner step differentiated", ("maml", "anil", "metasgd"),
              "create_graph=(step == 0) or the graph kept for the first step only"),
        Entry("wrong_inner_lr", "wrong inner learning rate or sign (effective value fitted)",
              ("maml", "fomaml", "anil", "metasgd", "reptile", "newton"),
              "a different inner_lr than the one passed, p + alpha grad instead of p - alpha grad, a support "
              "loss with reduction='sum' (effective rate alpha * n_support), or a stale optimiser lr"),
        Entry("no_adaptation", "the inner loop had no effect (the adapted parameters were not used)",
              ("maml", "fomaml", "anil", "metasgd", "newton"),
              "the query loss evaluated with the initial parameters (model(x_query) instead of "
              "fmodel(x_query) / functional_call with the fast weights); equivalent to inner_lr = 0"),
        Entry("wrong_inner_steps", "wrong number of inner steps", ("maml", "fomaml", "anil", "metasgd", "reptile",
                                                                  "newton", "lrd2"),
              "an off-by-one in the inner loop (range(K + 1), range(K - 1)) or a hard-coded step count"),
        Entry("swapped_support_query", "support and query sets swapped",
              ("maml", "fomaml", "anil", "metasgd", "reptile", "newton", "imaml") + BACKBONES,
              "the inner loop (or the closed-form solver / prototypes) run on the query set and the loss on the "
              "support set"),
        Entry("anil_instead_of_maml", "only the head adapted (ANIL) where MAML was asked", ("maml",),
              "the inner optimiser built over model[-1].parameters() only"),
        Entry("maml_instead_of_anil", "every layer adapted (MAML) where ANIL was asked", ("anil",),
              "the inner optimiser built over model.parameters() instead of the head's"),
        Entry("scale", "constant factor: sum instead of mean over tasks, reduction='sum', sign (fitted)",
              ("maml", "fomaml", "anil", "metasgd", "reptile", "newton", "imaml") + BACKBONES,
              "per-task losses summed (or gradients accumulated by repeated .backward()) instead of averaged; "
              "F.mse_loss/F.cross_entropy with reduction='sum'; a sign error; a stray constant"),
        Entry("disconnected", "no gradient reached some tensors (None or exactly zero)",
              ("maml", "fomaml", "anil", "metasgd", "reptile", "newton", "imaml") + BACKBONES,
              "higher.innerloop_ctx with the default copy_initial_weights=True, updates through .data or in "
              "place, parameters copied with .detach()/.clone().detach(), torch.no_grad(), jax.lax.stop_gradient"),
        Entry("metasgd_lrs_no_grad", "Meta-SGD learning rates receive no gradient", ("metasgd",),
              "the per-parameter learning rates used through .data/.item()/.detach() or not marked "
              "requires_grad, so only theta is meta-learned"),
        Entry("metasgd_transposed", "Meta-SGD step Jacobian transposed", ("metasgd",),
              "a hand-written backward pass applying a * (H v) instead of H (a * v): the step Jacobian is "
              "I - diag(a) H, its transpose I - H diag(a)"),
        Entry("reptile_head_only", "only the head adapted in Reptile's inner loop", ("reptile",),
              "the inner optimiser built over the last layer only"),
        Entry("hyper_detached", "R2-D2 / LR-D2 lam, scale or offset detached", ("r2d2", "lrd2"),
              "the learnable hyper-parameters used as Python floats (.item(), float()) or through .detach(), "
              "so they receive no gradient"),
        Entry("normalize_mismatch", "R2-D2 normalisation by sqrt(n) mismatched", ("r2d2",),
              "Z and Y divided by sqrt(n_support) when they should not be (or not divided when they should)"),
        Entry("bias_column_mismatch", "ones (bias) column mismatched", ("r2d2", "lrd2"),
              "the column of ones appended to the features when it should not be, or forgotten"),
        Entry("support_detached", "support branch detached (prototypes / ridge weights treated as constants)",
              BACKBONES, "the support features computed under torch.no_grad() / .detach() / stop_gradient, so "
              "gradients flow through the query features only"),
        Entry("imaml_system", "iMAML solves (c I + H/lam') x = grad L_q with other c, lam' (fitted)", ("imaml",),
              "the identity term dropped (H x = lam g), lam where 1/lam belongs ((I + lam H) x = g), "
              "(lam I + H) without rescaling, or a different lam in the solve than in the inner problem"),
        Entry("imaml_truncated_cg", "iMAML's linear solve truncated (conjugate gradient stopped early)", ("imaml",),
              "a fixed small number of CG iterations (or a loose CG tolerance) for (I + H/lam) x = grad L_q; the "
              "residual is reported"),
    ]
}


@dataclass
class Candidate:
    """A variant's meta-gradient for the problem at hand.

    ``grads`` is flat, aligned with ``case.variables``; ``losses`` the meta-loss
    values consistent with it (empty: the variant says nothing about the loss).
    ``rank``: 1 fixed, 2 fitted or a layer on the correct gradient, 3 a layer on
    another variant (simpler explanations are preferred).
    """

    key: str
    label: str
    grads: np.ndarray
    losses: tuple[float, ...] = ()
    fitted: dict[str, float] = field(default_factory=dict)
    rank: int = 1


@dataclass(frozen=True)
class Diagnosis:
    """The named bug: which catalogue entry, the fitted values, how well it matches."""

    key: str
    title: str
    detail: str
    cause: str
    fitted: dict[str, float]
    error: float
    tolerance: float
    also: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return jsonable(dataclasses.asdict(self))

    def __str__(self) -> str:
        text = f"{self.detail}\n  likely cause: {self.cause}"
        if self.also:
            text += "\n  also consistent with: " + "; ".join(self.also)
        return text


# ---------------------------------------------------------------------------
# comparisons
# ---------------------------------------------------------------------------


def match_error(g: np.ndarray, h: np.ndarray) -> float:
    """Normwise relative difference ``max|g - h| / max(max|g|, max|h|)`` (0 when both are zero)."""
    scale = max(float(np.max(np.abs(g), initial=0.0)), float(np.max(np.abs(h), initial=0.0)))
    diff = float(np.max(np.abs(g - h), initial=0.0))
    if scale == 0.0:
        return 0.0
    return diff / scale


def _loss_ok(claimed: float | None, losses: Sequence[float], tol: float) -> bool:
    if claimed is None or not losses:
        return True
    return any(abs(claimed - v) <= tol * max(abs(v), abs(claimed), np.finfo(float).tiny) for v in losses)


# ---------------------------------------------------------------------------
# evaluation helpers (all analytic: the reference and its pieces)
# ---------------------------------------------------------------------------


def _swapped(tasks: Sequence[Task]) -> list[Task]:
    return [Task(t.x_query, t.y_query, t.x_support, t.y_support) for t in tasks]


def _real(x: Any) -> Any:
    return x.real if np.iscomplexobj(x) else x


def _eval(case: Case, algorithm: str | None = None, tasks: Sequence[Task] | None = None,
          extra: dict[str, np.ndarray] | None = None, **hyper: Any) -> tuple[Any, np.ndarray]:
    """The reference run on ``case`` with some arguments changed: ``(loss, flat grads)``."""
    changed = Case(algorithm or case.algorithm, case.model, case.params, list(tasks or case.tasks),
                   {**case.hyper, **hyper}, case.seed, dict(case.extra if extra is None else extra))
    loss, grads = evaluate(changed)
    return loss, flatten([np.asarray(g) for g in grads])


def _step_sizes(case: Case, kind: str, rate: Any) -> list[Any]:
    """Per-tensor inner step sizes: MAML ``rate`` everywhere, ANIL on the head, Meta-SGD ``rate * lrs``."""
    n = len(case.params)
    if kind == "maml":
        return [rate] * n
    if kind == "anil":
        head = set(case.model.head_indices)
        return [rate if i in head else None for i in range(n)]
    return [rate * np.asarray(case.extra[f"lrs[{i}]"]) for i in range(n)]


def _unrolled(case: Case, kind: str, rate: Any, *, steps: int | None = None, keep: Callable[[int], bool] = lambda k: True,
              transpose: bool = False, tasks: Sequence[Task] | None = None) -> tuple[Any, np.ndarray]:
    """Meta-loss and meta-gradient of the unrolled inner loop with only the step Jacobians ``keep(k)`` kept.

    Reverse accumulation as ``reference.inner_loop`` (``v <- v - H_s(p_k) (a * v)``,
    exact HVPs), except that a step ``k`` with ``keep(k)`` False contributes the
    identity (its inner gradient treated as a constant), and with ``transpose``
    the Meta-SGD factor is applied as ``a * (H_s v)`` (the transposed Jacobian).
    Learning-rate gradients ``-sum_k grad L_s(p_k) * v_{k+1}`` are appended for
    Meta-SGD (a detached inner gradient still multiplies ``a``).
    """
    from reference import inner_loop

    model, params = case.model, case.params
    tasks = list(tasks or case.tasks)
    steps = int(case.hyper["inner_steps"] if steps is None else steps)
    lrs = _step_sizes(case, kind, rate)
    lr_grad = kind == "metasgd"
    total, grad, glr = 0.0, None, None
    for t in tasks:
        iterates, sgrads = inner_loop.adapt(model, params, t.x_support, t.y_support, lrs, steps, keep_grads=lr_grad)
        loss, v = model._loss_and_grad(iterates[-1], t.x_query, t.y_query)
        gl = [np.zeros_like(np.asarray(p, dtype=np.result_type(p, rate))) for p in params] if lr_grad else None
        for k in reversed(range(steps)):
            if gl is not None:
                gl = [acc - gk * vk for acc, gk, vk in zip(gl, sgrads[k], v)]
            if not keep(k):
                continue
            if transpose:
                hv = model._hvp(iterates[k], t.x_support, t.y_support, v)
                v = [vk if a is None else vk - a * hk for vk, hk, a in zip(v, hv, lrs)]
            else:
                direction = [np.zeros_like(vk) if a is None else a * vk for vk, a in zip(v, lrs)]
                hv = model._hvp(iterates[k], t.x_support, t.y_support, direction)
                v = [vk - hk for vk, hk in zip(v, hv)]
        total = total + loss
        grad = list(v) if grad is None else [a + b for a, b in zip(grad, v)]
        if gl is not None:
            glr = gl if glr is None else [a + b for a, b in zip(glr, gl)]
    m = len(tasks)
    out = [g / m for g in grad] + ([g / m for g in glr] if glr is not None else [])
    return total / m, flatten(out)


def _reptile(case: Case, kind: str, rate: Any, *, steps: int | None = None,
             tasks: Sequence[Task] | None = None) -> tuple[None, np.ndarray]:
    """Reptile direction ``mean_t (theta - p_K^t)`` with the given step sizes (analytic forward pass)."""
    from reference import inner_loop

    model, params = case.model, case.params
    tasks = list(tasks or case.tasks)
    steps = int(case.hyper["inner_steps"] if steps is None else steps)
    lrs = _step_sizes(case, kind, rate)
    total = [np.zeros_like(np.asarray(p, dtype=np.result_type(p, rate))) for p in params]
    for t in tasks:
        p_k = inner_loop.adapt(model, params, t.x_support, t.y_support, lrs, steps, keep_iterates=False)[0][0]
        total = [acc + (p - q) for acc, p, q in zip(total, params, p_k)]
    return None, flatten([a / len(tasks) for a in total])


def _newton_first_order(case: Case) -> tuple[Any, np.ndarray]:
    from reference import newton

    h = case.hyper
    total, grad = 0.0, None
    for t in case.tasks:
        p_k = newton.adapt(case.model, case.params, t, h["inner_lr"], h["inner_steps"], h["damping"])
        loss, g = case.model._loss_and_grad(p_k, t.x_query, t.y_query)
        total = total + loss
        grad = list(g) if grad is None else [a + b for a, b in zip(grad, g)]
    m = len(case.tasks)
    return total / m, flatten([g / m for g in grad])


class _DetachedSupport:
    """A ``reference.features.TaskFeatures`` whose VJP drops the support cotangent (support branch detached)."""

    def __init__(self, feats: Any):
        self._feats, self.support, self.query, self.n_support = feats, feats.support, feats.query, feats.n_support

    def vjp(self, g_support: Any, g_query: Any) -> list[np.ndarray]:
        return self._feats.vjp(None, g_query)


def _support_detached(case: Case) -> tuple[Any, np.ndarray]:
    """Backbone algorithms with the support features treated as constants, from the reference's task kernels."""
    import importlib

    from reference.features import TaskFeatures

    mod = importlib.import_module(f"reference.{case.algorithm}")
    h, e = case.hyper, case.extra
    total, grads, heads = 0.0, None, None
    for i, t in enumerate(case.tasks):
        feats = _DetachedSupport(TaskFeatures(case.model, case.params, t, f"tasks[{i}]"))
        if case.algorithm == "r2d2":
            value, (g, *head) = mod._task(feats, t, h["n_classes"], e["lam"][()], e["scale"][()], e["offset"][()],
                                          h["bias_column"], h["normalize"], h["form"], h.get("regression", False),
                                          f"tasks[{i}]", True)
        elif case.algorithm == "lrd2":
            value, (g, *head) = mod._task(feats, t, e["lam"][()], e["scale"][()], e["offset"][()],
                                          h["newton_steps"], h["bias_column"], f"tasks[{i}]", True)
        elif case.algorithm == "protonet":
            value, g = mod._task(feats, t, h["n_classes"], True)
            head = []
        else:
            value, g = mod._task(feats, t, f"tasks[{i}]", True)
            head = []
        total = total + value
        grads = list(g) if grads is None else [a + b for a, b in zip(grads, g)]
        heads = list(head) if heads is None else [a + b for a, b in zip(heads, head)]
    m = len(case.tasks)
    return total / m, flatten([np.asarray(g) / m for g in grads] + [np.asarray(v) / m for v in heads])


# ---------------------------------------------------------------------------
# iMAML pieces: per-task phi*, grad L_q(phi*), eigendecomposition of H_s(phi*)
# ---------------------------------------------------------------------------


@dataclass
class _ImamlTask:
    b: np.ndarray
    w: np.ndarray
    Q: np.ndarray
    H: np.ndarray

    @property
    def y(self) -> np.ndarray:
        return self.Q.T @ self.b


def _imaml_pieces(case: Case) -> list[_ImamlTask] | None:
    from reference import imaml

    if case.model.n_params > MAX_DENSE_HESSIAN:
        return None
    result = imaml.meta_loss_and_grad_info(case.model, case.params, case.tasks, case.hyper["lam"])
    out = []
    for t, info in zip(case.tasks, result.tasks):
        _, gq = case.model._loss_and_grad(info.phi, t.x_query, t.y_query)
        H = case.model.hessian(info.phi, t.x_support, t.y_support)
        H = 0.5 * (H + H.T)
        w, Q = np.linalg.eigh(H)
        out.append(_ImamlTask(flatten(gq), w, Q, H))
    return out


def _imaml_solution(pieces: list[_ImamlTask], c: float, beta: float) -> np.ndarray:
    """``mean_t (c I + beta H_t)^{-1} b_t`` through the eigendecompositions."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return sum(p.Q @ (p.y / (c + beta * p.w)) for p in pieces) / len(pieces)


def _cg_iterates(A: np.ndarray, b: np.ndarray, m_max: int) -> list[tuple[np.ndarray, float]]:
    """Conjugate-gradient iterates ``x_1 .. x_m`` from ``x_0 = 0`` with their relative residuals."""
    x = np.zeros_like(b)
    r = b.copy()
    p = r.copy()
    rr = float(r @ r)
    bnorm = math.sqrt(rr)
    out = []
    for _ in range(m_max):
        if rr == 0.0:
            break
        Ap = A @ p
        alpha = rr / float(p @ Ap)
        x = x + alpha * p
        r = r - alpha * Ap
        rr_new = float(r @ r)
        out.append((x.copy(), float(np.linalg.norm(b - A @ x)) / bnorm))
        p = r + (rr_new / rr) * p
        rr = rr_new
    return out


# ---------------------------------------------------------------------------
# the candidates of a problem
# ---------------------------------------------------------------------------


def _safe(fn: Callable[[], Any]) -> Any:
    """Run a variant; a variant that is undefined for this problem (singular, non-convergent) is skipped."""
    try:
        with np.errstate(all="ignore"):
            return fn()
    except (MetaverifyError, np.linalg.LinAlgError, ValueError, ZeroDivisionError, FloatingPointError):
        return None


def _gradient_kind(algorithm: str) -> str:
    return {"maml": "maml", "fomaml": "maml", "anil": "anil", "metasgd": "metasgd"}.get(algorithm, "maml")


def _base_rate(case: Case) -> float:
    return 1.0 if case.algorithm == "metasgd" else float(case.hyper["inner_lr"])


def candidates(case: Case) -> list[Candidate]:
    """The fixed variants of the catalogue for this problem (fitted ones need the claim: see :func:`diagnose`)."""
    a = case.algorithm
    out: list[Candidate] = []

    def add(key: str, label: str, fn: Callable[[], tuple[Any, np.ndarray]]) -> None:
        res = _safe(fn)
        if res is None:
            return
        loss, g = res
        if not np.all(np.isfinite(g)):
            return
        out.append(Candidate(key, label, np.asarray(g, dtype=float),
                             () if loss is None else (float(np.real(loss)),)))

    if a in GRADIENT_BASED:
        kind, rate, K = _gradient_kind(a), _base_rate(case), int(case.hyper["inner_steps"])
        first = a == "fomaml"
        keep_all = (lambda k: False) if first else (lambda k: True)
        if first:
            add("second_order_instead", "the exact second-order MAML meta-gradient", lambda: _unrolled(case, kind, rate))
        elif a == "maml":
            add("first_order", "first-order MAML (the reference FOMAML direction)", lambda: _eval(case, "fomaml"))
        else:
            add("first_order", f"first-order {a} (inner gradients treated as constants)",
                lambda: _unrolled(case, kind, rate, keep=lambda k: False))
        if not first and K >= 2:
            add("last_step_only", f"only the last of the {K} inner steps differentiated",
                lambda: _unrolled(case, kind, rate, keep=lambda k: k == K - 1))
            add("first_step_only", f"only the first of the {K} inner steps differentiated",
                lambda: _unrolled(case, kind, rate, keep=lambda k: k == 0))
        for k2 in range(1, max(2 * K, K + 3) + 1):
            if k2 != K:
                add("wrong_inner_steps", f"inner_steps={k2} instead of {K}",
                    lambda k2=k2: _unrolled(case, kind, rate, steps=k2, keep=keep_all))
        add("swapped_support_query", "support and query sets swapped",
            lambda: _unrolled(case, kind, rate, keep=keep_all, tasks=_swapped(case.tasks)))
        add("no_adaptation", "no adaptation: the query loss at the initial parameters",
            lambda: _unrolled(case, kind, 0.0, keep=keep_all))
        if a == "maml":
            add("anil_instead_of_maml", "ANIL (head-only inner loop) instead of MAML", lambda: _eval(case, "anil"))
        if a == "anil":
            add("maml_instead_of_anil", "MAML (all layers adapted) instead of ANIL", lambda: _eval(case, "maml"))
        if a == "metasgd":
            add("metasgd_transposed", "Meta-SGD with the step Jacobian transposed (a * (H v) instead of H (a * v))",
                lambda: _unrolled(case, kind, rate, transpose=True))
    elif a == "reptile":
        K, rate = int(case.hyper["inner_steps"]), float(case.hyper["inner_lr"])
        for k2 in range(1, max(2 * K, K + 3) + 1):
            if k2 != K:
                add("wrong_inner_steps", f"inner_steps={k2} instead of {K}",
                    lambda k2=k2: _reptile(case, "maml", rate, steps=k2))
        add("swapped_support_query", "inner loop run on the query set",
            lambda: _reptile(case, "maml", rate, tasks=_swapped(case.tasks)))
        add("reptile_head_only", "only the head adapted", lambda: _reptile(case, "anil", rate))
    elif a == "newton":
        K = int(case.hyper["inner_steps"])
        add("first_order", "first-order Newton-MAML (grad L_q(p_K), the inner steps not differentiated)",
            lambda: _newton_first_order(case))
        for k2 in range(1, max(2 * K, K + 3) + 1):
            if k2 != K:
                add("wrong_inner_steps", f"inner_steps={k2} instead of {K}", lambda k2=k2: _eval(case, inner_steps=k2))
        add("swapped_support_query", "support and query sets swapped", lambda: _eval(case, tasks=_swapped(case.tasks)))
        add("no_adaptation", "no adaptation: the query loss at the initial parameters",
            lambda: _eval(case, inner_lr=0.0))
    elif a == "imaml":
        add("swapped_support_query", "support and query sets swapped", lambda: _eval(case, tasks=_swapped(case.tasks)))
    elif a in BACKBONES:
        h = case.hyper
        add("swapped_support_query", "support and query sets swapped", lambda: _eval(case, tasks=_swapped(case.tasks)))
        add("support_detached", "support branch detached (gradient through the query features only)",
            lambda: _support_detached(case))
        if a == "r2d2":
            nb, bc = h["normalize"], h["bias_column"]
            add("normalize_mismatch", f"normalize={not nb} instead of {nb}", lambda: _eval(case, normalize=not nb))
            add("bias_column_mismatch", f"bias_column={not bc} instead of {bc}",
                lambda: _eval(case, bias_column=not bc))
            add("bias_column_mismatch", f"normalize={not nb} and bias_column={not bc} (both options mismatched)",
                lambda: _eval(case, normalize=not nb, bias_column=not bc))
        if a == "lrd2":
            bc, K = h["bias_column"], int(h["newton_steps"])
            add("bias_column_mismatch", f"bias_column={not bc} instead of {bc}",
                lambda: _eval(case, bias_column=not bc))
            for k2 in range(1, K + 4):
                if k2 != K:
                    add("wrong_inner_steps", f"newton_steps={k2} instead of {K}",
                        lambda k2=k2: _eval(case, newton_steps=k2))
    return out


# ---------------------------------------------------------------------------
# fitted variants
# ---------------------------------------------------------------------------

_RATE_GRID = (0.0625, 0.125, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 8.0, 16.0, 32.0, 64.0)


def _rate_function(case: Case) -> Callable[[Any], tuple[Any, np.ndarray]] | None:
    """``a -> (loss, flat grad)`` of the asked algorithm with inner rate ``a`` (complex ``a`` allowed)."""
    a = case.algorithm
    if a in GRADIENT_BASED:
        kind = _gradient_kind(a)
        keep = (lambda k: False) if a == "fomaml" else (lambda k: True)
        return lambda r: _unrolled(case, kind, r, keep=keep)
    if a == "reptile":
        return lambda r: _reptile(case, "maml", r)
    if a == "newton":
        return lambda r: _eval(case, inner_lr=r)
    return None


def _fit_rate(case: Case, g: np.ndarray) -> Candidate | None:
    """Fit ``g ~ c * G(a)``: the effective inner learning rate ``a`` and a scale ``c``.

    Grid over ``a`` (``c`` by projection at each point), then Gauss-Newton on
    ``(a, c)`` from the three best grid points with ``dG/da`` by a complex step
    in ``a`` (the reference is analytic in the step size), so the fit converges
    to round-off when ``g`` really is ``c G(a)``.
    """
    fn = _rate_function(case)
    if fn is None:
        return None
    base = _base_rate(case)
    shots = case.tasks[0].x_support.shape[0]
    d_out = case.model.sizes[-1] if case.model.loss_name == "mse" else 1
    grid = sorted({base * s * f for f in _RATE_GRID for s in (1.0, -1.0)} | {base * shots * d_out})
    gnorm = float(np.linalg.norm(g))
    if gnorm == 0.0:
        return None

    def project(G: np.ndarray) -> tuple[float, float]:
        gg = float(G @ G)
        c = float(G @ g) / gg if gg > 0 else 0.0
        return c, float(np.linalg.norm(g - c * G)) / gnorm

    scored = []
    for r in grid:
        res = _safe(lambda r=r: fn(r))
        if res is None or not np.all(np.isfinite(res[1])):
            continue
        c, err = project(np.asarray(res[1], dtype=float))
        scored.append((err, r, c))
    scored.sort()
    best: tuple[float, float, float] | None = None
    for _, r, c in scored[:3]:
        for _ in range(40):
            h = 1e-20 * max(abs(r), 1e-300)
            res = _safe(lambda: fn(complex(r, h)))
            if res is None:
                break
            z = np.asarray(res[1])
            G, dG = z.real, z.imag / h
            J = np.stack([c * dG, G], axis=1)
            step, *_ = np.linalg.lstsq(J, g - c * G, rcond=None)
            r, c = r + float(step[0]), c + float(step[1])
            if abs(step[0]) <= 1e-15 * abs(r) and abs(step[1]) <= 1e-15 * abs(c):
                break
        res = _safe(lambda: fn(r))
        if res is None:
            continue
        err = float(np.linalg.norm(g - c * np.asarray(res[1], dtype=float))) / gnorm
        if best is None or err < best[0]:
            best = (err, r, c)
    if best is None:
        return None
    _, r, c = best
    if _close(r, base, 1e-9):
        return None  # the asked rate: a pure scale, which the scale layer names
    loss, G = fn(r)
    label = _rate_label(case, r, base, shots * d_out)
    if abs(c - 1.0) > 1e-9:
        label += f", scaled by {c:.6g}"
    losses = () if loss is None else (float(np.real(loss)), float(np.real(loss)) * c)
    fitted = {"inner_lr" if case.algorithm != "metasgd" else "lrs_multiplier": r, "scale": c}
    return Candidate("wrong_inner_lr", label, c * np.asarray(G, dtype=float), losses, fitted, rank=3)


def _close(x: float, y: float, rtol: float = 1e-8) -> bool:
    return abs(x - y) <= rtol * max(abs(x), abs(y))


def _rate_label(case: Case, r: float, base: float, n_sum: int) -> str:
    what = "Meta-SGD learning rates multiplied by" if case.algorithm == "metasgd" else "effective inner_lr ="
    text = f"{what} {r:.10g}" + ("" if case.algorithm == "metasgd" else f" instead of {base:.10g}")
    if _close(r, -base):
        return text + " (the inner update's sign is flipped: p + alpha grad L_s)"
    if _close(r, base * n_sum) and n_sum > 1:
        return text + f" (= alpha x {n_sum}: the support loss is summed over its {n_sum} elements, reduction='sum')"
    return text


def _fit_imaml(case: Case, g: np.ndarray, pieces: list[_ImamlTask], loss: float) -> Candidate | None:
    """Fit ``g ~ mean_t (c I + beta H_t)^{-1} b_t`` over ``(c, beta)`` (``beta = 1/lam'``)."""
    import scipy.optimize

    lam = float(case.hyper["lam"])

    def resid(z: np.ndarray) -> np.ndarray:
        return _imaml_solution(pieces, z[0], z[1]) - g

    def jac(z: np.ndarray) -> np.ndarray:
        c, beta = z
        cols = []
        for weight in (lambda p: 1.0, lambda p: p.w):
            col = sum(p.Q @ (-weight(p) * p.y / (c + beta * p.w) ** 2) for p in pieces) / len(pieces)
            cols.append(col)
        return np.stack(cols, axis=1)

    best = None
    for start in ((1.0, 1.0 / lam), (0.0, 1.0 / lam), (1.0, lam), (lam, 1.0), (1.0, 0.0), (1.0, 2.0 / lam),
                  (1.0, 0.5 / lam)):
        with np.errstate(all="ignore"):
            try:
                sol = scipy.optimize.least_squares(resid, np.array(start), jac=jac, method="lm", xtol=1e-15,
                                                   ftol=1e-15, gtol=1e-15, max_nfev=200)
            except (ValueError, np.linalg.LinAlgError):
                continue
        if not np.all(np.isfinite(sol.fun)):
            continue
        err = match_error(g, g + sol.fun)
        if best is None or err < best[0]:
            best = (err, float(sol.x[0]), float(sol.x[1]))
    if best is None:
        return None
    _, c, beta = best
    x = _imaml_solution(pieces, c, beta)
    if not np.all(np.isfinite(x)):
        return None
    lam_eff = 1.0 / beta if beta != 0 else math.inf
    label = f"iMAML solving (c I + H/lam') x = grad L_q with c={c:.6g}, lam'={lam_eff:.6g} (asked: c=1, lam'={lam:.6g})"
    if _close(c, 1.0, 1e-6) and abs(beta) <= 1e-9 / lam:
        label = "first-order iMAML: x = grad L_q(phi*) (the implicit solve skipped)"
    elif abs(c) <= 1e-9 and _close(beta, 1.0 / lam, 1e-6):
        label = "iMAML without the identity term: H x = lam grad L_q"
    elif _close(c, 1.0, 1e-6) and _close(beta, lam, 1e-6):
        label = "iMAML with lam where 1/lam belongs: (I + lam H) x = grad L_q"
    elif _close(c, lam, 1e-6) and _close(beta, 1.0, 1e-6):
        label = "iMAML solving (lam I + H) x = grad L_q: a factor 1/lam missing"
    return Candidate("imaml_system", label, x, (loss,), {"c": c, "lam_prime": lam_eff}, rank=3)


def _imaml_cg(case: Case, pieces: list[_ImamlTask], loss: float, m_max: int = 50) -> list[Candidate]:
    lam = float(case.hyper["lam"])
    runs = []
    for p in pieces:
        A = np.eye(p.H.shape[0]) + p.H / lam
        runs.append(_cg_iterates(A, p.b, min(m_max, p.H.shape[0])))
    out = []
    for m in range(1, min(len(r) for r in runs) + 1):
        x = sum(r[m - 1][0] for r in runs) / len(runs)
        worst = max(r[m - 1][1] for r in runs)
        out.append(Candidate("imaml_truncated_cg",
                             f"iMAML linear solve truncated after {m} conjugate-gradient iteration(s) from x0 = 0 "
                             f"(relative residual ||(I + H/lam) x - grad L_q|| / ||grad L_q|| up to {worst:.1e})",
                             x, (loss,), {"cg_iterations": m, "residual": worst}))
    return out


# ---------------------------------------------------------------------------
# layers: constant factor, disconnected tensors
# ---------------------------------------------------------------------------


def _scale_label(case: Case, c: float) -> str:
    T = len(case.tasks)
    nq = {t.x_query.shape[0] for t in case.tasks}
    d_out = case.model.sizes[-1] if (case.model.loss_name == "mse" and case.algorithm not in BACKBONES) else 1
    named: list[tuple[float, str]] = [
        (-1.0, "sign flipped"),
        (float(T), f"summed over the {T} tasks instead of averaged"),
        (-float(T), f"summed over the {T} tasks and sign flipped"),
    ]
    if len(nq) == 1:
        q = nq.pop() * d_out
        named += [(float(q), f"per-task query loss summed over its {q} elements (reduction='sum') instead of averaged"),
                  (float(q * T), f"summed over the {T} tasks and over the {q} query elements (reduction='sum')")]
    if case.algorithm == "imaml":
        lam = float(case.hyper["lam"])
        named += [(1.0 / lam, "iMAML solving (lam I + H) x = grad L_q: a factor 1/lam missing"),
                  (lam, "scaled by lam")]
    for value, text in named:
        if T > 1 or abs(value) != T:
            if _close(c, value, 1e-8):
                return f"{text} (factor {c:.6g})"
    return f"scaled by a constant factor {c:.6g}"


def _with_scale(case: Case, base: Candidate, g: np.ndarray, ref_scale: float) -> Candidate | None:
    G = base.grads
    gg = float(G @ G)
    if gg == 0.0:
        return None
    c = float(G @ g) / gg
    if c == 0.0 or _close(c, 1.0, 1e-10):
        return None
    label = _scale_label(case, c)
    if base.key != "correct":
        label = f"{base.label}, {label}"
    losses = tuple(v for loss in base.losses for v in (loss, c * loss))
    return Candidate("scale" if base.key == "correct" else base.key, label, c * G, losses,
                     {**base.fitted, "scale": c}, rank=2 if base.key == "correct" else 4)


def _zero_tensors(case: Case, claimed: Sequence[np.ndarray], missing: Sequence[bool]) -> list[int]:
    return [i for i, (g, m) in enumerate(zip(claimed, missing)) if m or not np.any(np.asarray(g))]


def _with_disconnected(case: Case, base: Candidate, zeros: list[int]) -> Candidate | None:
    sizes = [int(np.prod(s)) for s in case.shapes]
    offsets = np.cumsum([0] + sizes)
    G = base.grads.copy()
    hit = []
    for i in zeros:
        block = G[offsets[i]:offsets[i + 1]]
        if np.any(block):
            hit.append(i)
        G[offsets[i]:offsets[i + 1]] = 0.0
    if not hit:
        return None
    names = [case.names[i] for i in hit]
    n_params = len(case.params)
    if len(zeros) == len(case.variables):
        key, label = "disconnected", "no gradient reached any tensor (all None or exactly zero)"
    elif case.algorithm == "metasgd" and all(i >= n_params for i in hit):
        key, label = "metasgd_lrs_no_grad", f"the Meta-SGD learning rates receive no gradient ({', '.join(names)})"
    elif case.algorithm in ("r2d2", "lrd2") and all(i >= n_params for i in hit):
        key, label = "hyper_detached", f"{', '.join(names)} detached (no gradient)"
    else:
        key, label = "disconnected", f"no gradient reached {', '.join(names)} (None or exactly zero)"
    if base.key != "correct":
        label = f"{base.label}, and {label}"
    return Candidate(key, label, G, base.losses, dict(base.fitted), rank=2 if base.key == "correct" else 4)


# ---------------------------------------------------------------------------
# the diagnosis
# ---------------------------------------------------------------------------


def diagnose(
    case: Case,
    claimed_loss: float | None,
    claimed_grads: Sequence[np.ndarray],
    *,
    missing: Sequence[bool],
    reference_loss: float | None,
    reference_grads: Sequence[np.ndarray],
    tol: float,
) -> Diagnosis | None:
    """Name the bug behind a mismatching claimed meta-gradient, or return None ("unexplained mismatch").

    Args:
        case: the audited problem.
        claimed_loss: the meta-loss the implementation returned (None if none, e.g. Reptile).
        claimed_grads: its gradients, aligned with ``case.variables`` (zeros where it gave None).
        missing: per tensor, whether the implementation gave no gradient at all (None).
        reference_loss, reference_grads: the correct values.
        tol: the match tolerance (the audit's, ``tolerance("float64", "reference_match", condition=...)``).
    """
    g = flatten([np.asarray(x, dtype=float) for x in claimed_grads])
    ref = flatten([np.asarray(x, dtype=float) for x in reference_grads])
    ref_losses = () if reference_loss is None else (float(reference_loss),)
    correct = Candidate("correct", "the correct meta-gradient", ref, ref_losses, rank=0)

    def same_as_correct(c: Candidate) -> bool:
        return match_error(c.grads, ref) <= tol and _loss_ok(reference_loss, c.losses, tol)

    fixed = [c for c in candidates(case) if not same_as_correct(c)]
    fitted: list[Candidate] = []
    rate = _safe(lambda: _fit_rate(case, g))
    if rate is not None:
        fitted.append(rate)
    if case.algorithm == "imaml":
        pieces = _safe(lambda: _imaml_pieces(case))
        if pieces:
            loss = float(reference_loss) if reference_loss is not None else math.nan
            fixed += [c for c in _imaml_cg(case, pieces, loss) if not same_as_correct(c)]
            fit = _safe(lambda: _fit_imaml(case, g, pieces, loss))
            if fit is not None:
                fitted.append(fit)
            # The named special cases of the linear system as fixed candidates too.
            lam = float(case.hyper["lam"])
            for key_c, key_b, label in ((1.0, 0.0, "first-order iMAML: x = grad L_q(phi*) (the implicit solve skipped)"),
                                        (0.0, 1.0 / lam, "iMAML without the identity term: H x = lam grad L_q"),
                                        (1.0, lam, "iMAML with lam where 1/lam belongs: (I + lam H) x = grad L_q")):
                x = _imaml_solution(pieces, key_c, key_b)
                if np.all(np.isfinite(x)):
                    key = "first_order" if key_b == 0.0 else "imaml_system"
                    fixed.append(Candidate(key, label, x, (loss,), {"c": key_c, "lam_prime": 1 / key_b if key_b else math.inf}))
    zeros = _zero_tensors(case, claimed_grads, missing)
    layered: list[Candidate] = []
    ref_scale = float(np.max(np.abs(ref), initial=0.0))
    for base in [correct, *fixed]:
        s = _with_scale(case, base, g, ref_scale)
        if s is not None:
            layered.append(s)
        if zeros:
            d = _with_disconnected(case, base, zeros)
            if d is not None:
                layered.append(d)

    matches = []
    for cand in [*fixed, *fitted, *layered]:
        if not np.all(np.isfinite(cand.grads)) or cand.grads.shape != g.shape:
            continue
        err = match_error(g, cand.grads)
        if err <= tol and _loss_ok(claimed_loss, cand.losses, tol):
            matches.append((cand.rank, err, cand))
    if not matches:
        return None
    matches.sort(key=lambda m: (m[0], m[1]))
    _, err, best = matches[0]
    gap = match_error(g, ref)
    entry = CATALOGUE[best.key]
    detail = (f"{entry.title}. The claimed meta-gradient matches this variant ({best.label}) to rel {err:.1e} "
              f"(tol {tol:.1e}) and differs from the correct meta-gradient by rel {gap:.1e}")
    also = tuple(dict.fromkeys(m[2].label for m in matches[1:] if m[2].label != best.label))
    return Diagnosis(best.key, entry.title, detail, entry.cause, dict(best.fitted), err, tol, also[:5])
