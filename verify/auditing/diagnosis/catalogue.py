"""The diagnosis catalogue: the known-wrong variants, what a candidate and a diagnosis are, comparisons.

A gradient checker says "mismatch". The audit (:mod:`verify.auditing`) also says
*which* bug produced the mismatch when it can: every entry of
:data:`CATALOGUE` is a known way of getting a meta-gradient wrong, and for a
given problem (a :class:`verify.algorithms.Case`) the wrong meta-gradient it
produces is computed here **analytically**, from the NumPy reference's own
pieces (``model.loss_and_grad_unchecked``, the adjoint of
:mod:`reference.inner_loop` with exact Hessian-vector products, the reference
algorithms run with changed arguments). Nothing here runs the implementation under audit or any autodiff framework.

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

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from reference.errors import MetaverifyError
from reference.models import flatten
from reference.tasks import Task
from verify._verdict import record
from verify.algorithms import ALGORITHMS, Case, evaluate

__all__ = ["CATALOGUE", "Candidate", "Diagnosis", "Entry", "loss_elements_per_row", "match_error"]


@dataclass(frozen=True)
class Entry:
    """One known-wrong variant: what it is, what code produces it; where it applies comes from the rows."""

    key: str
    title: str
    cause: str

    @property
    def algorithms(self) -> tuple[str, ...]:
        """The algorithms whose row lists this entry (``Algorithm.diagnoses``), in table order."""
        return tuple(name for name, row in ALGORITHMS.items() if self.key in row.diagnoses)


CATALOGUE: dict[str, Entry] = {
    e.key: e
    for e in [
        Entry('first_order', 'first-order only: the inner-loop gradients were not differentiated',
              "torch: torch.autograd.grad(..., create_graph=False) or .detach() in the inner loop, higher's "
              'track_higher_grads=False, learn2learn first_order=True; JAX: jax.lax.stop_gradient on the '
              'inner gradient. iMAML: the implicit solve skipped (grad L_q(phi*) returned). The result is '
              "FOMAML's direction, not the meta-gradient"),
        Entry('optimizer_state_detached', 'optimiser state detached between inner steps',
              'the momentum buffer / Adam moments (or a learned optimiser\'s hidden state) were .detach()-ed or '
              'stop_gradient-ed between steps, so no meta-gradient flows through them; declare it with '
              'verify.inner_audit (approximation="stop_gradient") if intended'),
        Entry('bptt_truncated', 'backpropagation truncated to the last inner steps',
              'the inner loop was unrolled under torch.no_grad()/detach (or stop_gradient) except for its last '
              'steps; declare it with verify.inner_audit (approximation="truncated:T") if intended'),
        Entry('adam_eps_placement', "Adam's eps placed differently",
              "torch.optim.Adam adds eps to sqrt(v_hat); higher's DifferentiableAdam and TensorFlow add it to "
              "sqrt(v) before bias correction (Kingma & Ba's eps-hat), optax's eps_root puts it inside the root"),
        Entry('second_order_instead', 'exact second-order MAML gradient returned where FOMAML was asked',
              'the inner gradients were differentiated (create_graph=True); FOMAML defines the direction with'
              ' every step Jacobian replaced by the identity'),
        Entry('last_step_only', 'only the last inner step differentiated',
              "create_graph=True (or no stop_gradient) only on the last inner step; the earlier steps' "
              'Jacobians (I - alpha H_s(p_k)) are replaced by I'),
        Entry('first_step_only', 'only the first inner step differentiated',
              'create_graph=(step == 0) or the graph kept for the first step only'),
        Entry('wrong_inner_lr', 'wrong inner learning rate or sign (effective value fitted)',
              'a different inner_lr than the one passed, p + alpha grad instead of p - alpha grad, a support '
              "loss with reduction='sum' (effective rate alpha * n_support), or a stale optimiser lr"),
        Entry('no_adaptation', 'the inner loop had no effect (the adapted parameters were not used)',
              'the query loss evaluated with the initial parameters (model(x_query) instead of '
              'fmodel(x_query) / functional_call with the fast weights); equivalent to inner_lr = 0'),
        Entry('wrong_inner_steps', 'wrong number of inner steps',
              'an off-by-one in the inner loop (range(K + 1), range(K - 1)) or a hard-coded step count'),
        Entry('swapped_support_query', 'support and query sets swapped',
              'the inner loop (or the closed-form solver / prototypes) run on the query set and the loss on '
              'the support set'),
        Entry('anil_instead_of_maml', 'only the head adapted (ANIL) where MAML was asked',
              'the inner optimiser built over model[-1].parameters() only'),
        Entry('maml_instead_of_anil', 'every layer adapted (MAML) where ANIL was asked',
              "the inner optimiser built over model.parameters() instead of the head's"),
        Entry('scale', "constant factor: sum instead of mean over tasks, reduction='sum', sign (fitted)",
              'per-task losses summed (or gradients accumulated by repeated .backward()) instead of averaged;'
              " F.mse_loss/F.cross_entropy with reduction='sum'; a sign error; a stray constant"),
        Entry('disconnected', 'no gradient reached some tensors (None or exactly zero)',
              'higher.innerloop_ctx with the default copy_initial_weights=True, updates through .data or in '
              'place, parameters copied with .detach()/.clone().detach(), torch.no_grad(), '
              'jax.lax.stop_gradient'),
        Entry('metasgd_lrs_no_grad', 'Meta-SGD learning rates receive no gradient',
              'the per-parameter learning rates used through .data/.item()/.detach() or not marked '
              'requires_grad, so only theta is meta-learned'),
        Entry('metasgd_transposed', 'Meta-SGD step Jacobian transposed',
              'a hand-written backward pass applying a * (H v) instead of H (a * v): the step Jacobian is I -'
              ' diag(a) H, its transpose I - H diag(a)'),
        Entry('reptile_head_only', "only the head adapted in Reptile's inner loop",
              'the inner optimiser built over the last layer only'),
        Entry('hyper_detached', 'R2-D2 / LR-D2 lam, scale or offset detached',
              'the learnable hyper-parameters used as Python floats (.item(), float()) or through .detach(), '
              'so they receive no gradient'),
        Entry('normalize_mismatch', 'R2-D2 normalisation by sqrt(n) mismatched',
              'Z and Y divided by sqrt(n_support) when they should not be (or not divided when they should)'),
        Entry('bias_column_mismatch', 'ones (bias) column mismatched',
              'the column of ones appended to the features when it should not be, or forgotten'),
        Entry('support_detached', 'support branch detached (prototypes / ridge weights treated as constants)',
              'the support features computed under torch.no_grad() / .detach() / stop_gradient, so gradients '
              'flow through the query features only'),
        Entry('imaml_system', "iMAML solves (c I + H/lam') x = grad L_q with other c, lam' (fitted)",
              'the identity term dropped (H x = lam g), lam where 1/lam belongs ((I + lam H) x = g), (lam I +'
              ' H) without rescaling, or a different lam in the solve than in the inner problem'),
        Entry('imaml_truncated_cg', "iMAML's linear solve truncated (conjugate gradient stopped early)",
              'a fixed small number of CG iterations (or a loose CG tolerance) for (I + H/lam) x = grad L_q; '
              'the residual is reported'),
        Entry('bn_running_stats', 'batch norm: running statistics used where batch statistics were meant',
              'model.eval() (or a BatchNorm with track_running_stats=True in eval mode) around the inner loop '
              'and model.train() for the query loss, or eval mode everywhere; in PyTorch the eval-mode inner '
              "loop then uses statistics the earlier tasks' train-mode forwards left in the module's buffers"),
        Entry('bn_batch_stats', 'batch norm: batch statistics used where running statistics were meant',
              'model.train() left on (or a functional_call without the eval-mode flag) where the model is '
              'meant to be in eval mode'),
        Entry('bn_params_frozen', 'batch norm: weight and bias not adapted in the inner loop',
              "the inner update built over the conv/linear parameters only (e.g. filtering names on 'conv' "
              "or skipping 1-D tensors), so the batch-norm gamma/beta keep their initial values"),
        Entry('bn_params_adapted', 'batch norm: weight and bias adapted in the inner loop where only the head was '
              'meant', "ANIL's inner update built over the head and the batch-norm parameters (e.g. selected by "
              "requires_grad or by a name filter that matches 'bn')"),
        Entry('bn_joint_batch', 'batch norm: support and query normalised together vs separately',
              'the encoder called on torch.cat([x_support, x_query]) where two calls were meant, or the '
              'reverse; with batch statistics the two give different features'),
        Entry('bn_state_leaked', "batch norm: running statistics updated by the meta-gradient evaluation",
              'train-mode forwards update the running statistics in place (state leaks across tasks and '
              'calls): evaluate with torch.func.functional_call(..., (params, buffers)) on copies of the '
              'buffers, or set momentum / restore the buffers after the call'),
    ]
}


@dataclass
class Candidate:
    """A variant's meta-gradient for the problem at hand.

    ``grads`` is flat, aligned with ``case.variables``; ``losses`` the meta-loss
    values consistent with it (empty: the variant says nothing about the loss).
    ``rank``: 1 fixed, 2 a layer on the correct gradient (a factor, zeroed
    tensors), 3 fitted, 4 a layer on another variant (simpler explanations are
    preferred; within a rank, the smaller match error).
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
        return record(self)

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


def loss_ok(claimed: float | None, losses: Sequence[float], tol: float) -> bool:
    if claimed is None or not losses:
        return True
    return any(abs(claimed - v) <= tol * max(abs(v), abs(claimed), np.finfo(float).tiny) for v in losses)




# ---------------------------------------------------------------------------
# evaluation helpers (all analytic: the reference and its pieces)
# ---------------------------------------------------------------------------


def swapped(tasks: Sequence[Task]) -> list[Task]:
    """The tasks with support and query exchanged."""
    return [Task(t.x_query, t.y_query, t.x_support, t.y_support) for t in tasks]


def rerun(case: Case, algorithm: str | None = None, tasks: Sequence[Task] | None = None,
                     extra: dict[str, np.ndarray] | None = None, **hyper: Any) -> tuple[Any, np.ndarray]:
    """The reference run on ``case`` with some arguments changed: ``(loss, flat grads)``."""
    changed = Case(algorithm or case.algorithm, case.model, case.params, list(tasks or case.tasks),
                   {**case.hyper, **hyper}, case.seed, dict(case.extra if extra is None else extra))
    loss, grads = evaluate(changed)
    return loss, flatten([np.asarray(g) for g in grads])


def safe(fn: Callable[[], Any]) -> Any:
    """Run a variant; a variant that is undefined for this problem (singular, non-convergent) is skipped."""
    try:
        with np.errstate(all="ignore"):
            return fn()
    except (MetaverifyError, np.linalg.LinAlgError, ValueError, ZeroDivisionError, FloatingPointError):
        return None


def close(x: float, y: float, rtol: float = 1e-8) -> bool:
    return abs(x - y) <= rtol * max(abs(x), abs(y))


def loss_elements_per_row(case: Case) -> int:
    """How many loss elements one row of a support or query set contributes to the loss's mean.

    The model's loss (:class:`reference.models.MLP`) is a mean over rows x outputs for ``mse`` and ``bce``
    and over rows only for ``ce``, so ``reduction='sum'`` instead of the mean multiplies a set's loss by
    ``rows x loss_elements_per_row(case)``. A backbone family's loss is the head's (a classifier on the
    features, over rows), not the network output's: 1.
    """
    if case.model.loss_name in ("mse", "bce") and ALGORITHMS[case.algorithm].family != "backbone":
        return int(case.model.sizes[-1])
    return 1
