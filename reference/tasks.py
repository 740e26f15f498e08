"""Tasks and seeded task generators.

A task is ``(x_support, y_support, x_query, y_query)`` (CONVENTIONS); a
meta-batch is a list of tasks. Every generator is deterministic in its seed
and returns float64 inputs; regression targets have shape ``(k, 1)`` (or
``(k, d_out)``), classification labels are ``int64`` of shape ``(k,)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from reference.errors import InvalidInputError
from reference.formatting import article
from reference.validation import check_finite_scalar, check_nonempty, check_positive_int


class Task(NamedTuple):
    """One few-shot task: a support set to adapt on, a query set to evaluate."""

    x_support: np.ndarray
    y_support: np.ndarray
    x_query: np.ndarray
    y_query: np.ndarray


def sinusoid(n_tasks: int = 1, k_shot: int = 10, k_query: int = 10, *, seed: int = 0) -> list[Task]:
    """Sinusoid regression tasks of Finn et al. 2017 (MAML), section 5.1.

    ``y = A sin(x - phase)`` with amplitude ``A ~ U[0.1, 5]``, phase
    ``~ U[0, pi]`` and inputs ``x ~ U[-5, 5]``; shapes ``(k, 1)``.
    """
    n_tasks = check_positive_int("n_tasks", n_tasks)
    k_shot = check_positive_int("k_shot", k_shot)
    k_query = check_positive_int("k_query", k_query)
    rng = np.random.default_rng(seed)
    tasks = []
    for _ in range(n_tasks):
        amplitude = rng.uniform(0.1, 5.0)
        phase = rng.uniform(0.0, np.pi)
        xs = rng.uniform(-5.0, 5.0, size=(k_shot, 1))
        xq = rng.uniform(-5.0, 5.0, size=(k_query, 1))
        tasks.append(Task(xs, amplitude * np.sin(xs - phase), xq, amplitude * np.sin(xq - phase)))
    return tasks


def linear_regression(
    n_tasks: int = 1,
    k_shot: int = 10,
    k_query: int = 10,
    dim: int = 1,
    *,
    noise: float = 0.0,
    bias: bool = True,
    seed: int = 0,
) -> list[Task]:
    """Linear regression tasks ``y = x w + b + noise``, ``w ~ N(0, I)``, ``b ~ N(0, 1)``, ``x ~ N(0, I)``."""
    n_tasks = check_positive_int("n_tasks", n_tasks)
    k_shot = check_positive_int("k_shot", k_shot)
    k_query = check_positive_int("k_query", k_query)
    dim = check_positive_int("dim", dim)
    noise = check_finite_scalar("noise", noise, nonnegative=True)
    rng = np.random.default_rng(seed)
    tasks = []
    for _ in range(n_tasks):
        w = rng.normal(size=(dim, 1))
        b = rng.normal() if bias else 0.0
        xs = rng.normal(size=(k_shot, dim))
        xq = rng.normal(size=(k_query, dim))
        ys = xs @ w + b + noise * rng.normal(size=(k_shot, 1))
        yq = xq @ w + b + noise * rng.normal(size=(k_query, 1))
        tasks.append(Task(xs, ys, xq, yq))
    return tasks


def gaussian_classification(
    n_way: int,
    k_shot: int,
    k_query: int,
    dim: int,
    *,
    n_tasks: int = 1,
    spread: float = 2.0,
    seed: int = 0,
) -> list[Task]:
    """N-way K-shot classification of isotropic Gaussian clusters.

    Each task draws ``n_way`` class means ``~ N(0, spread^2 I)``; examples are
    ``mean + N(0, I)``. Support has ``k_shot`` and query ``k_query`` examples
    per class, in a seeded random order; labels are ``int64`` in
    ``[0, n_way)``.
    """
    n_way = check_positive_int("n_way", n_way, minimum=2)
    k_shot = check_positive_int("k_shot", k_shot)
    k_query = check_positive_int("k_query", k_query)
    dim = check_positive_int("dim", dim)
    n_tasks = check_positive_int("n_tasks", n_tasks)
    spread = check_finite_scalar("spread", spread, positive=True)
    rng = np.random.default_rng(seed)
    tasks = []
    for _ in range(n_tasks):
        means = spread * rng.normal(size=(n_way, dim))

        def draw(k: int) -> tuple[np.ndarray, np.ndarray]:
            labels = np.repeat(np.arange(n_way, dtype=np.int64), k)
            order = rng.permutation(labels.size)
            labels = labels[order]
            return means[labels] + rng.normal(size=(labels.size, dim)), labels

        xs, ys = draw(k_shot)
        xq, yq = draw(k_query)
        tasks.append(Task(xs, ys, xq, yq))
    return tasks


def as_tasks(tasks: Any, name: str = "tasks") -> list[Task]:
    """Accept a list of :class:`Task` (or 4-tuples / objects with the four
    attributes) and return a list of :class:`Task` with array fields."""
    if isinstance(tasks, Task) or not isinstance(tasks, Sequence) or isinstance(tasks, (str, bytes)):
        raise InvalidInputError(f"{name} must be a list of Task, got {type(tasks).__name__}; wrap one task in a list")
    check_nonempty(name, tasks)
    out = []
    fields = Task._fields
    for i, t in enumerate(tasks):
        if all(hasattr(t, f) for f in fields):
            out.append(Task(*(np.asarray(getattr(t, f)) for f in fields)))
        elif isinstance(t, Sequence) and len(t) == 4:
            out.append(Task(*(np.asarray(a) for a in t)))
        else:
            raise InvalidInputError(
                f"{name}[{i}] is {article(type(t).__name__)}; expected a Task(x_support, y_support, x_query, y_query)"
            )
    return out


def check_tasks(model: Any, tasks: Any, name: str = "tasks") -> list[Task]:
    """Validate every task against a :class:`reference.models.MLP` (shapes, labels, finiteness).

    Returns tasks whose arrays are converted (``y`` of shape ``(n, 1)`` for a
    scalar-output regression, ``int64`` labels for ``ce``).
    """
    out = []
    for i, t in enumerate(as_tasks(tasks, name)):
        xs = model.check_x(t.x_support, f"{name}[{i}].x_support")
        xq = model.check_x(t.x_query, f"{name}[{i}].x_query")
        ys = model.check_y(t.y_support, xs.shape[0], f"{name}[{i}].y_support")
        yq = model.check_y(t.y_query, xq.shape[0], f"{name}[{i}].y_query")
        out.append(Task(xs, ys, xq, yq))
    return out


__all__ = ["Task", "as_tasks", "check_tasks", "gaussian_classification", "linear_regression", "sinusoid"]
