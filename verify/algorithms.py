"""One table of the algorithms metaverify checks, and how to call each one.

Every algorithm of ``shared/CONVENTIONS.md`` is described by an
:class:`Algorithm`: how to build a random problem (a :class:`Case`), which
arrays are differentiated (``variables``: the parameters, plus Meta-SGD's
learning rates or R2-D2's ``lam, scale, offset``), and how to call the
``meta_loss_and_grad``-style function of a backend module. The NumPy
reference (``reference.*``) and the backends (``verify.backends.torch.*``,
``verify.backends.jax.*``) share signatures, so one adapter serves all.

The check matrix (:mod:`verify.matrix`), the audit (its harnesses and its
diagnosis catalogue) and the reports read this table; adding an algorithm is
adding a row (:func:`register`) and a reference module.

Length: about 700 lines: the table (one row per algorithm with its calling
convention, audit signature, formulas and diagnoses) and the seeded problem
builder the rows share. The builder still branches on a few row names (R2-D2,
LR-D2, Meta-SGD, iMAML, Newton); moving those into per-row builders is the
next split.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import numpy as np

from reference.errors import InvalidInputError
from reference.models import MLP
from reference.tasks import Task, gaussian_classification
from verify.formulas import TEXTS, AlgorithmText

GRADIENT_FAMILY = ("maml", "fomaml", "anil", "metasgd", "reptile", "newton")
#: rows whose inner loop is a recurrence worth K >= 2 steps (MAML++'s multi-step loss, the learned optimisers)
_RECURRENT = ("mamlpp", "lstm-optimizer", "meta-lstm")


@dataclass
class Case:
    """A concrete problem for one algorithm.

    ``hyper`` holds the non-differentiated hyper-parameters (``inner_lr``,
    ``inner_steps``, ``damping``, ``n_classes``, ``bias_column`` ...);
    ``variables`` the differentiated arrays (flattened in this order for
    directional derivatives), ``names`` their labels (``W1``, ``b1``, ...,
    ``lrs[0]``, ``lam``).
    """

    algorithm: str
    model: MLP
    params: list[np.ndarray]
    tasks: list[Task]
    hyper: dict[str, Any]
    seed: int
    extra: dict[str, np.ndarray] = field(default_factory=dict)
    #: the ``build_case(...)`` call that rebuilds this case (its ``repr`` when set)
    recipe: str = field(default="", repr=False, compare=False)

    def __repr__(self) -> str:
        if self.recipe:
            return f"from verify.algorithms import build_case\ncase = {self.recipe}"
        return (f"Case(algorithm={self.algorithm!r}, model={self.model!r}, hyper={self.hyper!r}, seed={self.seed!r}, "
                f"shapes={self.shapes!r})")

    @property
    def variables(self) -> list[np.ndarray]:
        return list(self.params) + list(self.extra.values())

    @property
    def names(self) -> list[str]:
        return param_names(self.model) + list(self.extra)

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        return [np.shape(v) for v in self.variables]

    def describe(self) -> str:
        """Every value the problem uses: the model, the task sizes, the hyper-parameters (given or drawn,
        including R2-D2/LR-D2's ``lam, scale, offset`` and Meta-SGD's learning-rate range), the seed."""
        m = self.model
        row = ALGORITHMS.get(self.algorithm)
        backbone = row is not None and row.family == "backbone"
        values = [f"{k}={v!r}" for k, v in self.hyper.items()]
        for name, value in self.extra.items():
            arr = np.asarray(value)
            if arr.ndim == 0:
                values.append(f"{name}={float(arr):.6g}")
        lrs = [np.asarray(v) for k, v in self.extra.items() if k.startswith("lrs[")]
        if lrs:
            flat = np.concatenate([a.ravel() for a in lrs])
            values.append(f"lrs in [{float(flat.min()):.4g}, {float(flat.max()):.4g}] (per entry)")
        head = {"lrd2": "the head's loss is 'bce'"}.get(self.algorithm, "the head's loss is 'ce'")
        if not isinstance(m, MLP):  # a reference.nets.Network (Conv4, ResNet-12, a translated torch module)
            model = m.summary() if hasattr(m, "summary") else repr(m)
        elif backbone:
            model = f"MLP(sizes={list(m.sizes)}, activation={m.activation!r}, bias={m.bias}) as the backbone ({head})"
        else:
            model = f"MLP(sizes={list(m.sizes)}, activation={m.activation!r}, loss={m.loss_name!r}, bias={m.bias})"
        t = self.tasks[0] if self.tasks else None
        sizes = (f"{len(self.tasks)} task(s) of {np.shape(t.x_support)[0]} support / {np.shape(t.x_query)[0]} "
                 "query examples" if t is not None else f"{len(self.tasks)} task(s)")
        return f"{self.algorithm}: {model}, {sizes}, {', '.join(values)}, seed={self.seed}"

    def split(self, variables: list[np.ndarray]) -> tuple[list[np.ndarray], dict[str, Any]]:
        """Split a variables list back into ``(params, extra)``."""
        n = len(self.params)
        return list(variables[:n]), dict(zip(self.extra, variables[n:]))


def param_names(model: Any) -> list[str]:
    """CONVENTIONS names of the parameter tensors: ``W1, b1, W2, b2, ...`` (``theta`` for a Quadratic)."""
    if not isinstance(model, MLP):
        if hasattr(model, "param_names"):  # reference.nets.Network: PyTorch's names (0.weight, layer1.conv1.weight)
            return list(model.param_names)
        return ["theta"] if len(model.shapes) == 1 else [f"p{i}" for i in range(len(model.shapes))]
    names = []
    for layer in range(1, model.n_layers + 1):
        names.append(f"W{layer}")
        if model.bias:
            names.append(f"b{layer}")
    return names


# ---------------------------------------------------------------------------
# Calling conventions, per algorithm. ``mod`` is the package root of a backend
# (``reference`` or ``verify.backends.torch`` ...); ``kw`` the backend's own
# keywords (dtype, device, jit).
# ---------------------------------------------------------------------------


def _sub(mod: ModuleType, name: str) -> ModuleType:
    return importlib.import_module(f"{mod.__name__}.{name}")


def _call_maml(mod, case, variables, first_order=False, **kw):
    p, _ = case.split(variables)
    h = case.hyper
    return _sub(mod, "maml").meta_loss_and_grad(
        case.model, p, case.tasks, h["inner_lr"], h["inner_steps"], first_order=first_order, **kw
    )


def _call_anil(mod, case, variables, **kw):
    p, _ = case.split(variables)
    h = case.hyper
    return _sub(mod, "anil").meta_loss_and_grad(case.model, p, case.tasks, h["inner_lr"], h["inner_steps"], **kw)


def _call_metasgd(mod, case, variables, **kw):
    p, extra = case.split(variables)
    lrs = [extra[f"lrs[{i}]"] for i in range(len(p))]
    loss, gp, glr = _sub(mod, "metasgd").meta_loss_and_grad(case.model, p, lrs, case.tasks, case.hyper["inner_steps"], **kw)
    return loss, list(gp) + list(glr)


def _call_reptile(mod, case, variables, **kw):
    p, _ = case.split(variables)
    h = case.hyper
    direction = _sub(mod, "reptile").direction(case.model, p, case.tasks, h["inner_lr"], h["inner_steps"], **kw)
    return None, list(direction)


def _call_newton(mod, case, variables, **kw):
    p, _ = case.split(variables)
    h = case.hyper
    return _sub(mod, "newton").meta_loss_and_grad(
        case.model, p, case.tasks, h["inner_lr"], h["inner_steps"], damping=h["damping"], **kw
    )


def _call_imaml(mod, case, variables, **kw):
    p, _ = case.split(variables)
    return _sub(mod, "imaml").meta_loss_and_grad(case.model, p, case.tasks, case.hyper["lam"], **kw)


def _head_grads(extra_grads: dict[str, Any]) -> list[np.ndarray]:
    return [np.asarray(extra_grads[k]) for k in ("lam", "scale", "offset")]


def _call_r2d2(mod, case, variables, **kw):
    p, extra = case.split(variables)
    h = case.hyper
    loss, grads, head = _sub(mod, "r2d2").meta_loss_and_grad(
        case.model, p, case.tasks, h["n_classes"], extra["lam"][()], extra["scale"][()], extra["offset"][()],
        bias_column=h["bias_column"], normalize=h["normalize"], form=h["form"], regression=h.get("regression", False),
        **kw,
    )
    return loss, list(grads) + _head_grads(head)


def _call_lrd2(mod, case, variables, **kw):
    p, extra = case.split(variables)
    h = case.hyper
    loss, grads, head = _sub(mod, "lrd2").meta_loss_and_grad(
        case.model, p, case.tasks, extra["lam"][()], extra["scale"][()], extra["offset"][()], h["newton_steps"],
        bias_column=h["bias_column"], **kw,
    )
    return loss, list(grads) + _head_grads(head)


def _call_metric(module_name):
    def call(mod, case, variables, **kw):
        p, _ = case.split(variables)
        return _sub(mod, module_name).loss_and_grad(case.model, p, case.tasks, case.hyper["n_classes"], **kw)

    return call


def _call_mlp(mod, case, variables, **kw):
    if mod.__name__ != "reference":
        raise NotImplementedError("the base-model check runs on the NumPy reference only")
    p, _ = case.split(variables)
    t = case.tasks[0]
    return case.model.loss_and_grad(p, t.x_support, t.y_support)


# ---------------------------------------------------------------------------
# Problem builders
# ---------------------------------------------------------------------------


def _regression_or_classification(rng, model: MLP, n_tasks: int, shots: int, queries: int) -> list[Task]:
    d0, d_out = model.sizes[0], model.sizes[-1]
    tasks = []
    for _ in range(n_tasks):
        xs, xq = rng.normal(size=(shots, d0)), rng.normal(size=(queries, d0))
        if model.loss_name == "ce":
            ys = rng.permutation(np.arange(shots) % d_out).astype(np.int64)
            yq = rng.integers(0, d_out, size=queries).astype(np.int64)
        elif model.loss_name == "bce":
            ys, yq = rng.integers(0, 2, (shots, d_out)).astype(float), rng.integers(0, 2, (queries, d_out)).astype(float)
        else:
            ys, yq = rng.normal(size=(shots, d_out)), rng.normal(size=(queries, d_out))
        tasks.append(Task(xs, ys, xq, yq))
    return tasks


def build_case(
    algorithm: str,
    *,
    seed: int = 0,
    sizes: list[int] | None = None,
    activation: str | None = None,
    loss: str | None = None,
    bias: bool = True,
    n_tasks: int | None = None,
    shots: int | None = None,
    queries: int | None = None,
    n_way: int | None = None,
    backbone: str | None = None,
    **hyper: Any,
) -> Case:
    """Build a seeded random :class:`Case` for ``algorithm``.

    Unspecified sizes and hyper-parameters are drawn from the seed within
    ranges where every algorithm is well posed (inner problems converge,
    Newton systems are well conditioned, all classes appear in each support
    set). Keyword overrides fix them.

    ``backbone`` (one of :data:`BACKBONES`, e.g. ``"conv4:1x8x8"``) replaces the
    MLP by a small Conv4 (Finn et al. 2017: four ``conv3x3 -> BatchNorm2d
    (train mode) -> relu -> MaxPool2d(2, ceil_mode=True)`` blocks) on seeded
    image tasks; see :func:`_backbone_case`. Only :data:`BACKBONE_ALGORITHMS`
    accept one.
    """
    if algorithm not in ALGORITHMS:
        raise InvalidInputError(f"algorithm={algorithm!r} is unknown; choose one of {sorted(ALGORITHMS)}")
    if ALGORITHMS[algorithm].audit:
        raise InvalidInputError(f"algorithm={algorithm!r} has no Case (its problem is built by "
                                f"{ALGORITHMS[algorithm].audit}); choose one of {', '.join(case_algorithms())}")
    given = dict(seed=seed, sizes=sizes, activation=activation, loss=loss, bias=None if bias else False,
                 n_tasks=n_tasks, shots=shots, queries=queries, n_way=n_way, backbone=backbone, **hyper)
    recipe = "build_case(" + ", ".join([repr(algorithm)] + [f"{k}={v!r}" for k, v in given.items()
                                                            if v is not None]) + ")"
    if backbone is not None:
        if sizes is not None or activation is not None or loss is not None or not bias:
            raise InvalidInputError(f"backbone={backbone!r} fixes the network; drop sizes/activation/loss/bias")
        return _backbone_case(algorithm, backbone, seed=seed, n_tasks=n_tasks, shots=shots, queries=queries,
                              n_way=n_way, hyper=hyper, recipe=recipe)
    rng = np.random.default_rng(seed)
    spec = ALGORITHMS[algorithm]
    act = activation or str(rng.choice(["tanh", "sigmoid", "softplus"]))
    n_tasks = n_tasks or int(rng.integers(1, 4))
    hyper = dict(hyper)
    extra: dict[str, np.ndarray] = {}

    if spec.family == "backbone":
        n_way = n_way or (2 if algorithm == "lrd2" else int(rng.integers(2, 4)))
        shots = shots or int(rng.integers(1, 4))
        queries = queries or int(rng.integers(1, 4))
        d0 = sizes[0] if sizes else int(rng.integers(2, 5))
        sizes = sizes or [d0, int(rng.integers(2, 6)), int(rng.integers(2, 5))]
        model = MLP(sizes, act, "mse", bias)
        tasks = gaussian_classification(n_way, shots, queries, d0, n_tasks=n_tasks, seed=int(rng.integers(2**31)))
        hyper.setdefault("n_classes", n_way)
        if algorithm in ("r2d2", "lrd2"):
            extra["lam"] = np.array(hyper.pop("lam", float(rng.uniform(0.5, 2.0))))
            extra["scale"] = np.array(hyper.pop("scale", float(rng.uniform(0.5, 1.5))))
            extra["offset"] = np.array(hyper.pop("offset", float(rng.uniform(-0.5, 0.5))))
            hyper.setdefault("bias_column", bool(rng.integers(2)))
        if algorithm == "r2d2":
            hyper.setdefault("normalize", bool(rng.integers(2)))
            hyper.setdefault("form", str(rng.choice(["primal", "dual"])))
        if algorithm == "lrd2":
            hyper.setdefault("newton_steps", int(rng.integers(1, 4)))
    else:
        loss = loss or str(rng.choice(["mse", "ce"]))
        shots = shots or int(rng.integers(2, 6))
        queries = queries or int(rng.integers(2, 6))
        if sizes is None:
            d0 = int(rng.integers(1, 4))
            width = int(rng.integers(2, 6 if algorithm != "newton" else 4))
            d_out = int(rng.integers(2, 4)) if loss == "ce" else 1
            sizes = [d0, width, d_out]
        model = MLP(sizes, act, loss, bias)
        tasks = _regression_or_classification(rng, model, n_tasks, shots, queries)
        if spec.family == "gradient":
            # MAML++'s multi-step loss and an LSTM optimiser's recurrence need K >= 2 to be exercised
            hyper.setdefault("inner_steps", int(rng.integers(2 if algorithm in _RECURRENT else 1, 4)))
            hyper.setdefault("inner_lr", float(rng.uniform(0.05, 0.4)))
        if algorithm == "newton":
            hyper.setdefault("damping", float(rng.uniform(1.0, 2.0)))
            hyper["inner_lr"] = min(hyper["inner_lr"], 0.3)
        if algorithm == "imaml":
            hyper.setdefault("lam", float(rng.uniform(2.0, 8.0)))
    params = model.init(int(rng.integers(2**31)))
    if algorithm == "mamlpp":
        # per-step per-tensor rates around inner_lr; multi-step loss weights of MAML++'s annealing at epoch 0
        from reference.mamlpp import msl_weights

        K = int(hyper["inner_steps"])
        base = hyper.pop("inner_lr")
        extra["lrs"] = base * rng.uniform(0.5, 1.5, size=(K, len(params)))
        hyper.setdefault("weights", tuple(float(w) for w in msl_weights(K, 0, 10)))
    if algorithm == "lstm-optimizer":
        from reference.learned_optimizers import LSTMOptimizer

        hyper.setdefault("hidden", 2)
        for j, phi in enumerate(LSTMOptimizer.random_params(hyper["hidden"], seed=int(rng.integers(2**31)))):
            extra[f"phi[{j}]"] = phi
    if algorithm == "meta-lstm":
        # Ravi & Larochelle: the step is the meta-learner's (p_{k+1} = f_k p_k - i_k g_k, rate 1); no inner_lr
        from reference.learned_optimizers import MetaLearnerLSTM

        hyper.pop("inner_lr", None)
        for j, phi in enumerate(MetaLearnerLSTM.random_params(seed=int(rng.integers(2**31)))):
            extra[f"phi[{j}]"] = np.asarray(phi, dtype=float)
    if algorithm == "metasgd":
        base = hyper.pop("inner_lr")
        for i, p in enumerate(params):
            extra[f"lrs[{i}]"] = base * rng.uniform(0.5, 1.5, size=p.shape)
    return Case(algorithm, model, params, tasks, hyper, seed, extra, recipe=recipe)


#: Convolutional backbones of the check matrix: ``name -> (image shape, hidden channels)``. Small images so
#: that the CPU-only CI stays fast; four 2x2 max-pools need ``ceil_mode=True`` there (8 -> 4 -> 2 -> 1 -> 1,
#: 12 -> 6 -> 3 -> 2 -> 1).
BACKBONES: dict[str, tuple[tuple[int, int, int], int]] = {
    "conv4:1x8x8": ((1, 8, 8), 4),
    "conv4:3x12x12": ((3, 12, 12), 4),
}
#: The algorithms with check-matrix cells on :data:`BACKBONES` (the others' reference on a network is
#: exercised by the test suite; their cells would cost minutes per example on the CPU).
BACKBONE_ALGORITHMS = ("maml", "fomaml", "anil", "protonet", "r2d2")


def _backbone_case(algorithm: str, backbone: str, *, seed: int, n_tasks: int | None, shots: int | None,
                   queries: int | None, n_way: int | None, hyper: dict[str, Any], recipe: str) -> Case:
    """A seeded few-shot image-classification :class:`Case` on a small Conv4 (see :data:`BACKBONES`).

    Gradient-based algorithms get the full Conv4 with its ``Linear`` head (``n_way`` logits, softmax
    cross-entropy); the feature-extractor algorithms the headless Conv4 (features of ``hidden`` entries).
    Batch norm is in train mode (batch statistics of each support or query batch, differentiated through),
    as in MAML's reference implementation; every class has ``shots`` support images, so each batch has at
    least two examples and the batch variance at the 1x1 last block is defined.
    """
    from reference.nets import conv4

    if backbone not in BACKBONES:
        raise InvalidInputError(f"backbone={backbone!r} is unknown; choose one of {sorted(BACKBONES)}")
    if algorithm not in BACKBONE_ALGORITHMS:
        raise InvalidInputError(f"algorithm={algorithm!r} has no {backbone} case; choose one of "
                                f"{', '.join(BACKBONE_ALGORITHMS)}")
    shape, hidden = BACKBONES[backbone]
    spec = ALGORITHMS[algorithm]
    rng = np.random.default_rng(seed)
    n_way = n_way or int(rng.integers(2, 4))
    shots = shots or int(rng.integers(1, 3))
    queries = queries or int(rng.integers(1, 3))
    n_tasks = n_tasks or int(rng.integers(1, 3))
    head = spec.family != "backbone"
    net = conv4(shape, n_way, hidden=hidden, ceil_mode=True, head=head)
    tasks = []
    for _ in range(n_tasks):
        ys = rng.permutation(np.repeat(np.arange(n_way), shots)).astype(np.int64)
        yq = rng.permutation(np.repeat(np.arange(n_way), queries)).astype(np.int64)
        tasks.append(Task(rng.normal(size=(ys.size, *shape)), ys, rng.normal(size=(yq.size, *shape)), yq))
    hyper = dict(hyper)
    extra: dict[str, np.ndarray] = {}
    if head:
        hyper.setdefault("inner_steps", int(rng.integers(1, 3)))
        hyper.setdefault("inner_lr", float(rng.uniform(0.05, 0.3)))
    else:
        hyper.setdefault("n_classes", n_way)
        if algorithm == "r2d2":
            extra["lam"] = np.array(hyper.pop("lam", float(rng.uniform(0.5, 2.0))))
            extra["scale"] = np.array(hyper.pop("scale", float(rng.uniform(0.5, 1.5))))
            extra["offset"] = np.array(hyper.pop("offset", float(rng.uniform(-0.5, 0.5))))
            hyper.setdefault("bias_column", bool(rng.integers(2)))
            hyper.setdefault("normalize", bool(rng.integers(2)))
            hyper.setdefault("form", str(rng.choice(["primal", "dual"])))
    params = net.init(int(rng.integers(2**31)))
    return Case(algorithm, net, params, tasks, hyper, seed, extra, recipe=recipe)


#: The catalogue keys (``verify.auditing.diagnosis.CATALOGUE``) of each family's known-wrong variants.
_GRADIENT_DIAGNOSES = ("wrong_inner_lr", "wrong_inner_steps", "swapped_support_query", "scale", "disconnected")
_BACKBONE_DIAGNOSES = ("swapped_support_query", "scale", "disconnected", "support_detached", "bn_joint_batch")
#: Batch-norm diagnoses (networks with batch norm only; :mod:`verify.auditing.diagnosis.batchnorm`).
_BN_DIAGNOSES = ("bn_running_stats", "bn_batch_stats", "bn_state_leaked")


@dataclass(frozen=True)
class Algorithm:
    """A row of the algorithm table: everything metaverify knows about one algorithm.

    Adding an algorithm is adding a row (:func:`register`) plus its reference
    module: the check matrix, the audit (both frameworks' harnesses), the
    diagnosis catalogue and the report read the row.

    Attributes:
        name: CLI name.
        family: ``"mlp"``, ``"gradient"``, ``"implicit"`` or ``"backbone"`` (how
            :func:`build_case` draws a problem).
        call: ``call(module_root, case, variables, **backend_kwargs) -> (loss, grads)``
            with ``grads`` aligned with ``case.variables``.
        differentiable: whether ``grads`` is the exact gradient of ``loss``
            (False for FOMAML and Reptile, whose directions are defined, not
            derived; they are compared with the reference only).
        paper: citation for reports.
        extra: the differentiated variables after the parameters, in
            ``case.variables`` order: ``"lrs"`` (Meta-SGD: one array per
            parameter tensor, named ``lrs[i]``) or 0-dim scalars (R2-D2's
            ``"lam", "scale", "offset"``).
        signature: the audit's calling contract: the positional arguments of a
            user's PyTorch function (``"model"``: the ``nn.Sequential``;
            ``"tasks"``: the task list; a name of ``extra``: that differentiated
            variable, as tensors requiring grad; any other name: that
            hyper-parameter of the case). The JAX contract is the same with
            ``"model"`` replaced by ``params, apply_fn``. None: not auditable.
        options: hyper-parameters passed as keywords to an audited function
            that declares a parameter of that name.
        quantity: what the function returns the derivative as: ``"meta-gradient"``,
            ``"gradient"`` (metric learners) or ``"direction"`` (Reptile: the
            function returns the direction itself, no loss).
        backends: where the check matrix runs it (``"numpy"`` is the reference).
        text: the report's formulas (:class:`verify.formulas.AlgorithmText`), or None.
        symbolic: ``(reference.symbolic constructor, keyword arguments)`` of the
            exact toy derivation the report shows, or None.
        diagnoses: the keys of the diagnosis catalogue that apply to it.
        diagnosis: the module of ``verify.auditing.diagnosis`` (a short name, or a
            dotted path) whose ``variants(case)`` and ``fitted(case, g, loss)``
            compute those variants; ``""``: only the layers that need no
            algorithm (constant factor, disconnected tensors).
        condition: ``condition(case) -> (kappa, why)``: a condition estimate of the
            reference gradient that widens the audit's tolerance, or None.
        audit: ``"module:function"`` of an audit of its own, for an algorithm whose
            problem is not a :class:`Case` (``maml-rl``: the user's function gets
            trajectory batches, :mod:`verify.rl_audit`). Such a row has no check-matrix
            cell (``backends=()``), its ``call`` refuses a Case, and everything that
            builds Cases iterates :func:`case_algorithms` instead of the whole table.
        default: whether a plain ``metaverify check`` (no ``--algorithm``) runs it; False for rows
            whose cells would lengthen the default matrix by more than ~20%, checked with
            ``--algorithm NAME``. (``mamlpp`` and ``lstm-optimizer`` were such rows while JAX's
            optimiser loop ran eagerly; compiled, their cells cost what the others do: issue #18.)
    """

    name: str
    family: str
    call: Callable[..., tuple[Any, list[np.ndarray]]]
    differentiable: bool = True
    paper: str = ""
    extra: tuple[str, ...] = ()
    signature: tuple[str, ...] | None = None
    options: tuple[str, ...] = ()
    quantity: str = "meta-gradient"
    backends: tuple[str, ...] = ("numpy", "torch", "jax")
    text: AlgorithmText | None = None
    symbolic: tuple[str, dict[str, Any]] | None = None
    diagnoses: tuple[str, ...] = ()
    diagnosis: str = ""
    condition: Callable[[Case], tuple[float, str]] | None = None
    audit: str = ""
    default: bool = True

    @property
    def auditable(self) -> bool:
        return self.signature is not None

    def jax_signature(self) -> tuple[str, ...]:
        """The JAX calling contract: ``"model"`` becomes ``"params", "apply_fn"``."""
        out: list[str] = []
        for name in self.signature or ():
            out += ["params", "apply_fn"] if name == "model" else [name]
        return tuple(out)


def _imaml_condition(case: Case) -> tuple[float, str]:
    """The implicit gradient goes through ``(I + H/lam)^{-1}``: forward errors (the reference's own
    CG and inner solves included, each to a 1e-12 relative residual) scale with its condition."""
    from reference import imaml

    info = imaml.meta_loss_and_grad_info(case.model, case.params, case.tasks, case.hyper["lam"])
    return (max(t.cond_estimate for t in info.tasks),
            "max over tasks of cond(I + H_s(phi*)/lam), estimated by the reference's CG")


_OPTIMIZER_DIAGNOSES = ("first_order", "optimizer_state_detached", "bptt_truncated", "wrong_inner_steps",
                        "swapped_support_query", "scale", "disconnected")


#: the learned optimisers (Andrychowicz's LSTM, Ravi & Larochelle's meta-learner): the optimiser family's; MAML++
#: runs SGD (no optimiser state to detach)
_LEARNED_DIAGNOSES = _OPTIMIZER_DIAGNOSES
_MAMLPP_DIAGNOSES = tuple(k for k in _OPTIMIZER_DIAGNOSES if k != "optimizer_state_detached")


def _with_optimizer(call: Callable[..., Any], name: str) -> Callable[..., Any]:
    """``call`` with a differentiable inner optimiser (``reference.optimizers`` with torch.optim's defaults)."""
    from reference.optimizers import Adam, Momentum

    make = {"momentum": lambda: Momentum(0.9), "adam": lambda: Adam()}[name]

    def with_optimizer(mod, case, variables, inner_optimizer=None, **kw):
        # inner_optimizer: a replacement spec (the float32 condition estimate passes its float32-step copy)
        return call(mod, case, variables, inner_optimizer=make() if inner_optimizer is None else inner_optimizer, **kw)

    with_optimizer.make_optimizer = make  # type: ignore[attr-defined]  # read by verify.matrix.float32_condition
    return with_optimizer


def _call_mamlpp(mod, case, variables, **kw):
    p, extra = case.split(variables)
    h = case.hyper
    loss, gp, glr = _sub(mod, "mamlpp").meta_loss_and_grad(case.model, p, extra["lrs"], case.tasks, h["inner_steps"],
                                                           weights=np.asarray(h["weights"], dtype=float), **kw)
    return loss, list(gp) + [np.asarray(glr)]


def _learned_loop(mod, case, params, opt, rate, **kw):
    """The optimiser-driven loop (``inner_optim``) with a learned optimiser ``opt`` and one rate for every step and
    tensor; returns ``(loss, dL/dtheta + dL/dphi)``."""
    K = case.hyper["inner_steps"]
    rates = [[rate] * len(params) for _ in range(K)]
    allow_tf32 = kw.pop("allow_tf32", False)  # torch: the loop module takes no TF32 switch, the context does
    with contextlib.ExitStack() as stack:
        if allow_tf32:
            from verify.backends.torch._model import tf32

            stack.enter_context(tf32(True))
        r = _sub(mod, "inner_optim").meta_loss_and_grad(case.model, params, case.tasks, rates, K, optimizer=opt, **kw)
    return r.loss, list(r.params) + list(r.optimizer)


def _call_lstm_optimizer(mod, case, variables, **kw):
    from reference.learned_optimizers import LSTMOptimizer

    p, extra = case.split(variables)
    opt = LSTMOptimizer([extra[f"phi[{j}]"] for j in range(len(extra))], hidden=case.hyper["hidden"])
    return _learned_loop(mod, case, p, opt, case.hyper["inner_lr"], **kw)


def _call_meta_lstm(mod, case, variables, **kw):
    from reference.learned_optimizers import MetaLearnerLSTM

    p, extra = case.split(variables)
    opt = MetaLearnerLSTM([extra[f"phi[{j}]"] for j in range(len(extra))])
    return _learned_loop(mod, case, p, opt, 1.0, **kw)


def _call_no_case(mod, case, variables, **kw):
    raise InvalidInputError(f"algorithm={case.algorithm!r} has no Case-based reference call; its row's audit "
                            "function computes everything (see Algorithm.audit)")


_LOOP = ("model", "tasks", "inner_lr", "inner_steps")
_HEAD = ("model", "tasks", "lam", "scale", "offset")
_SCALARS = ("lam", "scale", "offset")

ALGORITHMS: dict[str, Algorithm] = {
    a.name: a
    for a in [
        Algorithm("mlp", "mlp", _call_mlp, paper="the base model: backpropagation and Pearlmutter (1994) HVPs",
                  backends=("numpy",), text=TEXTS["mlp"], symbolic=("linear_regression_maml", {})),
        Algorithm("maml", "gradient", _call_maml, paper="Finn, Abbeel, Levine 2017", signature=_LOOP,
                  text=TEXTS["maml"], symbolic=("quadratic_maml", {"dim": 1, "steps": 2}), diagnosis="gradient",
                  diagnoses=("first_order", "last_step_only", "first_step_only", "no_adaptation",
                             "anil_instead_of_maml", *_GRADIENT_DIAGNOSES, *_BN_DIAGNOSES, "bn_params_frozen")),
        Algorithm("fomaml", "gradient", lambda m, c, v, **kw: _call_maml(m, c, v, first_order=True, **kw),
                  differentiable=False, paper="Finn et al. 2017 (first-order approximation)", signature=_LOOP,
                  text=TEXTS["fomaml"], symbolic=("quadratic_maml", {"dim": 1, "steps": 2, "first_order": True}),
                  diagnosis="gradient", diagnoses=("second_order_instead", "no_adaptation", *_GRADIENT_DIAGNOSES,
                                                   *_BN_DIAGNOSES, "bn_params_frozen")),
        Algorithm("anil", "gradient", _call_anil, paper="Raghu et al. 2020", signature=_LOOP, text=TEXTS["anil"],
                  symbolic=("anil_linear", {}), diagnosis="gradient",
                  diagnoses=("first_order", "last_step_only", "first_step_only", "no_adaptation",
                             "maml_instead_of_anil", *_GRADIENT_DIAGNOSES, *_BN_DIAGNOSES, "bn_params_adapted")),
        Algorithm("metasgd", "gradient", _call_metasgd, paper="Li et al. 2017", extra=("lrs",),
                  signature=("model", "lrs", "tasks", "inner_steps"), text=TEXTS["metasgd"],
                  symbolic=("quadratic_metasgd", {}), diagnosis="gradient",
                  diagnoses=("first_order", "last_step_only", "first_step_only", "no_adaptation",
                             "metasgd_lrs_no_grad", "metasgd_transposed", "bptt_truncated", *_GRADIENT_DIAGNOSES)),
        Algorithm("reptile", "gradient", _call_reptile, differentiable=False, paper="Nichol, Achiam, Schulman 2018",
                  signature=_LOOP, quantity="direction", text=TEXTS["reptile"], symbolic=("quadratic_reptile", {}),
                  diagnosis="gradient", diagnoses=("reptile_head_only", *_GRADIENT_DIAGNOSES)),
        Algorithm("newton", "gradient", _call_newton, paper="Hessian-preconditioned inner step (CONVENTIONS)",
                  signature=(*_LOOP, "damping"), text=TEXTS["newton"], symbolic=("quadratic_newton_maml", {}),
                  diagnosis="gradient", diagnoses=("first_order", "no_adaptation", *_GRADIENT_DIAGNOSES)),
        # Differentiable inner optimisers (issue #17): the same algorithms with torch.optim's momentum / Adam
        # in the inner loop (reference.optimizers; exact through parameters and optimiser state).
        Algorithm("maml-momentum", "gradient", _with_optimizer(_call_maml, "momentum"),
                  paper="Finn et al. 2017 with torch.optim.SGD(momentum=0.9) as the inner optimiser",
                  signature=_LOOP, diagnosis="optimizer", diagnoses=_OPTIMIZER_DIAGNOSES),
        # Adam's step Jacobian is a cancellation (d = m_hat / (sqrt(v_hat) + eps): two O(1/|g|) terms whose
        # difference is O(eps / g^2)) that float32 evaluates to ~eps32 / |g|: the float32 cells' condition
        # estimate evaluates the step in float32 too (verify.step_rounding; reports/inner-optimizers/adam-float32.md).
        Algorithm("maml-adam", "gradient", _with_optimizer(_call_maml, "adam"),
                  paper="Finn et al. 2017 with torch.optim.Adam (defaults) as the inner optimiser",
                  signature=_LOOP, diagnosis="optimizer", diagnoses=_OPTIMIZER_DIAGNOSES + ("adam_eps_placement",)),
        Algorithm("anil-adam", "gradient", _with_optimizer(_call_anil, "adam"),
                  paper="Raghu et al. 2020 with torch.optim.Adam (defaults) as the inner optimiser",
                  signature=_LOOP, diagnosis="optimizer", diagnoses=_OPTIMIZER_DIAGNOSES + ("adam_eps_placement",)),
        # MAML++ (Antoniou et al. 2019): per-step per-tensor learned rates (the (K, n_tensors) variable "lrs")
        # and the multi-step loss sum_k w_k L_q(p_k) with the annealed weights (reference.mamlpp).
        Algorithm("mamlpp", "gradient", _call_mamlpp, paper="Antoniou, Edwards, Storkey 2019 (MAML++: LSLR + MSL)",
                  extra=("lrs",), signature=("model", "lrs", "tasks", "inner_steps", "weights"),
                  diagnosis="optimizer", diagnoses=_MAMLPP_DIAGNOSES),
        # A coordinatewise LSTM optimiser (Andrychowicz et al. 2016) on an MLP optimisee: the meta-gradient w.r.t.
        # theta and the LSTM's phi by exact BPTT through the unrolled inner loop (reference.learned_optimizers).
        Algorithm("lstm-optimizer", "gradient", _call_lstm_optimizer,
                  paper="Andrychowicz et al. 2016 (learning to learn by gradient descent by gradient descent)",
                  extra=("phi",), signature=("model", "phi", "tasks", "inner_lr", "inner_steps"),
                  diagnosis="optimizer", diagnoses=_LEARNED_DIAGNOSES),
        # Ravi & Larochelle's meta-learner LSTM (2017) on an MLP learner: the learner's parameters are the cell state
        # (c_0 = theta, the learned initialisation), p_{k+1} = f_k p_k - i_k g_k with gates on [g, L, p, previous
        # gate]; meta-gradient w.r.t. theta and the gates' phi = [W_I, b_I, W_F, b_F] by exact BPTT.
        Algorithm("meta-lstm", "gradient", _call_meta_lstm,
                  paper="Ravi & Larochelle 2017 (optimization as a model for few-shot learning)",
                  extra=("phi",), default=False, signature=("model", "phi", "tasks", "inner_steps"),
                  text=TEXTS["meta-lstm"],
                  diagnosis="optimizer", diagnoses=_LEARNED_DIAGNOSES),
        Algorithm("imaml", "implicit", _call_imaml, paper="Rajeswaran et al. 2019", signature=("model", "tasks", "lam"),
                  text=TEXTS["imaml"], symbolic=("quadratic_imaml", {}), diagnosis="implicit",
                  diagnoses=("first_order", "swapped_support_query", "scale", "disconnected", "imaml_system",
                             "imaml_truncated_cg"), condition=_imaml_condition),
        Algorithm("r2d2", "backbone", _call_r2d2, paper="Bertinetto et al. 2019", extra=_SCALARS, signature=_HEAD,
                  options=("n_classes", "bias_column", "normalize", "form"), text=TEXTS["r2d2"],
                  symbolic=("r2d2_ridge", {}), diagnosis="backbone",
                  diagnoses=("hyper_detached", "normalize_mismatch", "bias_column_mismatch", *_BACKBONE_DIAGNOSES)),
        Algorithm("lrd2", "backbone", _call_lrd2, paper="Bertinetto et al. 2019 (logistic regression head)",
                  extra=_SCALARS, signature=_HEAD, options=("bias_column", "newton_steps"), text=TEXTS["lrd2"],
                  diagnosis="backbone", diagnoses=("wrong_inner_steps", "hyper_detached", "bias_column_mismatch",
                                                   *_BACKBONE_DIAGNOSES)),
        Algorithm("protonet", "backbone", _call_metric("protonet"), paper="Snell, Swersky, Zemel 2017",
                  signature=("model", "tasks", "n_classes"), quantity="gradient", text=TEXTS["protonet"],
                  diagnosis="backbone", diagnoses=_BACKBONE_DIAGNOSES),
        Algorithm("matchingnet", "backbone", _call_metric("matchingnet"), paper="Vinyals et al. 2016",
                  signature=("model", "tasks", "n_classes"), quantity="gradient", text=TEXTS["matchingnet"],
                  diagnosis="backbone", diagnoses=_BACKBONE_DIAGNOSES),
        # MAML-RL (reference.rl): exact expectations over enumerated trajectory batches; the user's
        # function returns a surrogate loss whose gradient estimates grad J (docs/meta-rl.md).
        Algorithm("maml-rl", "rl", _call_no_case, differentiable=False,
                  paper="Finn et al. 2017 (MAML-RL); DiCE: Foerster et al. 2018",
                  signature=("params", "inner", "outer", "alpha", "gamma"), quantity="gradient estimate",
                  backends=(), symbolic=("bandit_maml_rl", {"batch": 1}), audit="verify.rl_audit:audit_function"),
    ]
}


def register(row: Algorithm, *, replace: bool = False) -> Algorithm:
    """Add ``row`` to :data:`ALGORITHMS` (the check matrix, the audit, the diagnosis and the report read it).

    Raises:
        InvalidInputError: ``row.name`` is taken (pass ``replace=True`` to overwrite it), or
            ``row.diagnoses`` names a key the diagnosis catalogue does not have.
    """
    if not isinstance(row, Algorithm):
        raise InvalidInputError(f"row={row!r} is not an Algorithm; build one with Algorithm(name, family, call, ...)")
    if row.name in ALGORITHMS and not replace:
        raise InvalidInputError(f"algorithm {row.name!r} is already registered; pass replace=True to overwrite it")
    ALGORITHMS[row.name] = row
    return row


def unregister(name: str) -> Algorithm:
    """Remove ``name`` from :data:`ALGORITHMS` and return its row (tests that register a toy algorithm)."""
    if name not in ALGORITHMS:
        raise InvalidInputError(f"algorithm={name!r} is not registered; registered: {', '.join(ALGORITHMS)}")
    return ALGORITHMS.pop(name)


def auditable() -> tuple[str, ...]:
    """The algorithms with an audit calling contract (``Algorithm.signature``), in table order."""
    return tuple(name for name, row in ALGORITHMS.items() if row.auditable)


def default_algorithms() -> tuple[str, ...]:
    """The rows a plain ``metaverify check`` runs: :func:`case_algorithms` with ``Algorithm.default``."""
    return tuple(name for name in case_algorithms() if ALGORITHMS[name].default)


def case_algorithms() -> tuple[str, ...]:
    """The rows whose problem is a :class:`Case` (all but those with an ``audit`` of their own), in table order."""
    return tuple(name for name, row in ALGORITHMS.items() if not row.audit)


def reference_root() -> ModuleType:
    return importlib.import_module("reference")


def evaluate(case: Case, root: ModuleType | None = None, variables: list[np.ndarray] | None = None, **kw: Any):
    """Run ``case`` on a backend root module (default: the NumPy reference).

    Returns ``(loss, grads)`` with ``grads`` a list aligned with ``case.variables``.
    """
    root = root or reference_root()
    return ALGORITHMS[case.algorithm].call(root, case, case.variables if variables is None else variables, **kw)


__all__ = ["ALGORITHMS", "BACKBONES", "BACKBONE_ALGORITHMS", "GRADIENT_FAMILY", "Algorithm", "Case", "auditable",
           "build_case", "case_algorithms", "default_algorithms",
           "evaluate", "param_names",
           "reference_root", "register", "unregister"]
