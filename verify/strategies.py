"""Hypothesis strategies that generate meta-learning problems.

Public so that users can reuse them in their own property tests::

    from hypothesis import given
    from verify.strategies import mlp_problems

    @given(mlp_problems())
    def test_my_grad(problem):
        ...

Everything is float64 and seeded by values hypothesis draws, so a failure
shrinks to a small problem and :func:`snippet` prints it as a reproducible
Python snippet.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from hypothesis import strategies as st

from reference.models import ACTIVATIONS, ANALYTIC_ACTIVATIONS, LOSSES, MLP
from reference.tasks import Task


@dataclass(frozen=True)
class Problem:
    """A model, parameters and data: everything needed to evaluate a loss or meta-loss.

    ``tasks`` holds the meta-batch (for single-batch problems, one task whose
    support set is the data). ``hyper`` holds the algorithm's
    hyper-parameters (``inner_lr``, ``inner_steps``, ``lam`` ...). ``seed`` and
    ``spec`` suffice to rebuild the problem: see :func:`snippet`.
    """

    model: MLP
    params: list[np.ndarray]
    tasks: list[Task]
    seed: int
    spec: dict[str, Any] = field(default_factory=dict)
    hyper: dict[str, Any] = field(default_factory=dict)

    @property
    def x(self) -> np.ndarray:
        return self.tasks[0].x_support

    @property
    def y(self) -> np.ndarray:
        return self.tasks[0].y_support

    def __repr__(self) -> str:  # what hypothesis prints on failure
        return snippet(self)


def snippet(problem: Problem) -> str:
    """A Python snippet that rebuilds ``problem`` exactly (printed on failure)."""
    s = problem.spec
    lines = [
        "from verify.strategies import build_problem",
        f"problem = build_problem(sizes={list(problem.model.sizes)!r}, activation={problem.model.activation!r}, "
        f"loss={problem.model.loss_name!r}, bias={problem.model.bias!r}, n_tasks={s.get('n_tasks')!r}, "
        f"n_support={s.get('n_support')!r}, n_query={s.get('n_query')!r}, param_scale={s.get('param_scale')!r}, "
        f"seed={problem.seed!r}, hyper={problem.hyper!r})",
    ]
    return "\n".join(lines)


def _labels(rng: np.random.Generator, model: MLP, n: int) -> np.ndarray:
    d = model.sizes[-1]
    if model.loss_name == "ce":
        # every class present when n allows it, so class-conditional algorithms are defined
        base = np.arange(n) % d
        return rng.permutation(base).astype(np.int64)
    if model.loss_name == "bce":
        return rng.integers(0, 2, size=(n, d)).astype(np.float64)
    return rng.normal(size=(n, d))


def build_problem(
    *,
    sizes: list[int],
    activation: str = "tanh",
    loss: str = "mse",
    bias: bool = True,
    n_tasks: int = 1,
    n_support: int = 5,
    n_query: int = 5,
    param_scale: float = 1.0,
    seed: int = 0,
    hyper: dict[str, Any] | None = None,
) -> Problem:
    """Deterministically build a :class:`Problem` from its description."""
    model = MLP(sizes, activation, loss, bias)
    rng = np.random.default_rng(seed)
    params = [param_scale * p for p in model.init(int(rng.integers(2**31)))]
    tasks = []
    for _ in range(n_tasks):
        xs = rng.normal(size=(n_support, sizes[0]))
        xq = rng.normal(size=(n_query, sizes[0]))
        tasks.append(Task(xs, _labels(rng, model, n_support), xq, _labels(rng, model, n_query)))
    spec = dict(n_tasks=n_tasks, n_support=n_support, n_query=n_query, param_scale=param_scale)
    return Problem(model, params, tasks, seed, spec, dict(hyper or {}))


@st.composite
def mlps(
    draw: st.DrawFn,
    *,
    min_layers: int = 1,
    max_layers: int = 3,
    max_width: int = 6,
    activations: tuple[str, ...] = ACTIVATIONS,
    losses: tuple[str, ...] = LOSSES,
    analytic_only: bool = False,
    bias: bool | None = None,
) -> MLP:
    """Random :class:`reference.models.MLP` specs (small, so dense checks stay cheap)."""
    acts = tuple(a for a in activations if a in ANALYTIC_ACTIVATIONS) if analytic_only else activations
    n_layers = draw(st.integers(min_layers, max_layers))
    loss = draw(st.sampled_from(losses))
    widths = [draw(st.integers(1, max_width)) for _ in range(n_layers)]
    out = draw(st.integers(2, 4)) if loss == "ce" else draw(st.integers(1, 3))
    sizes = widths + [out]
    use_bias = draw(st.booleans()) if bias is None else bias
    return MLP(sizes, draw(st.sampled_from(acts)), loss, use_bias)


@st.composite
def mlp_problems(
    draw: st.DrawFn,
    *,
    models: st.SearchStrategy[MLP] | None = None,
    n_tasks: st.SearchStrategy[int] = st.integers(1, 3),
    n_support: st.SearchStrategy[int] = st.integers(1, 6),
    n_query: st.SearchStrategy[int] = st.integers(1, 6),
    param_scale: st.SearchStrategy[float] = st.sampled_from([0.5, 1.0, 2.0]),
    hyper: st.SearchStrategy[dict[str, Any]] | None = None,
) -> Problem:
    """Random problems: a model from ``models`` (default :func:`mlps`), seeded params and tasks."""
    model = draw(models if models is not None else mlps())
    return build_problem(
        sizes=list(model.sizes),
        activation=model.activation,
        loss=model.loss_name,
        bias=model.bias,
        n_tasks=draw(n_tasks),
        n_support=draw(n_support),
        n_query=draw(n_query),
        param_scale=draw(param_scale),
        seed=draw(st.integers(0, 2**31 - 1)),
        hyper=draw(hyper) if hyper is not None else {},
    )


@st.composite
def cases(draw: st.DrawFn, algorithm: str | st.SearchStrategy[str] | None = None) -> Any:
    """Random :class:`verify.algorithms.Case` problems for the check matrix, one field per draw.

    Every size and hyper-parameter is drawn by hypothesis (so a failure shrinks
    field by field to a minimal problem) within the ranges where the
    algorithm is well posed, the same as :func:`verify.algorithms.build_case`
    uses: model sizes, activation, loss, bias, task count, shots, queries,
    ``inner_lr``, ``inner_steps`` (K), iMAML's ``lam``, Newton's damping, the
    R2-D2/LR-D2 head's ``lam, scale, offset`` and options, and the seed of the
    parameters and data. The drawn case's ``repr`` (what hypothesis prints on
    a failure) is the ``build_case(...)`` call that rebuilds it.

    Args:
        algorithm: a name of :data:`verify.algorithms.ALGORITHMS`, a strategy
            of names, or ``None`` for any algorithm.
    """
    from verify.algorithms import ALGORITHMS, GRADIENT_FAMILY, build_case, case_algorithms

    if algorithm is None:
        algorithm = st.sampled_from(sorted(case_algorithms()))
    name = draw(algorithm) if isinstance(algorithm, st.SearchStrategy) else algorithm
    if name not in ALGORITHMS:
        raise ValueError(f"algorithm={name!r} is unknown; choose one of {sorted(ALGORITHMS)}")
    family = ALGORITHMS[name].family
    kw: dict[str, Any] = {
        "seed": draw(st.integers(0, 2**31 - 1)),
        "activation": draw(st.sampled_from(["tanh", "sigmoid", "softplus"])),
        "n_tasks": draw(st.integers(1, 3)),
    }
    if family == "backbone":
        n_way = 2 if name == "lrd2" else draw(st.integers(2, 3))
        kw.update(n_way=n_way, shots=draw(st.integers(1, 3)), queries=draw(st.integers(1, 3)),
                  sizes=[draw(st.integers(2, 4)), draw(st.integers(2, 5)), draw(st.integers(2, 4))],
                  bias=draw(st.booleans()))
        if name in ("r2d2", "lrd2"):
            kw.update(lam=draw(st.floats(0.5, 2.0)), scale=draw(st.floats(0.5, 1.5)),
                      offset=draw(st.floats(-0.5, 0.5)), bias_column=draw(st.booleans()))
        if name == "r2d2":
            kw.update(normalize=draw(st.booleans()), form=draw(st.sampled_from(["primal", "dual"])))
        if name == "lrd2":
            kw["newton_steps"] = draw(st.integers(1, 3))
    else:
        loss = draw(st.sampled_from(["mse", "ce"]))
        width = draw(st.integers(2, 3 if name == "newton" else 5))
        d_out = draw(st.integers(2, 3)) if loss == "ce" else 1
        kw.update(loss=loss, sizes=[draw(st.integers(1, 3)), width, d_out], bias=draw(st.booleans()),
                  shots=draw(st.integers(2, 5)), queries=draw(st.integers(2, 5)))
        if name in GRADIENT_FAMILY:
            kw.update(inner_steps=draw(st.integers(1, 3)),
                      inner_lr=draw(st.floats(0.05, 0.3 if name == "newton" else 0.4)))
        if name in ("mamlpp", "lstm-optimizer", "meta-lstm"):  # K >= 2: the multi-step loss and recurrence run
            kw.update(inner_steps=draw(st.integers(2, 3)), inner_lr=draw(st.floats(0.05, 0.4)))
        if name == "newton":
            kw["damping"] = draw(st.floats(1.0, 2.0))
        if name == "imaml":
            kw["lam"] = draw(st.floats(2.0, 8.0))
    return build_case(name, **kw)


def unit_directions(rng: np.random.Generator, shapes: list[tuple[int, ...]]) -> list[np.ndarray]:
    """A random direction with unit Euclidean norm over all leaves."""
    v = [rng.normal(size=s) for s in shapes]
    norm = np.sqrt(sum(float(np.sum(a * a)) for a in v))
    return [a / norm for a in v]


__all__ = ["Problem", "build_problem", "cases", "mlp_problems", "mlps", "snippet", "unit_directions"]
