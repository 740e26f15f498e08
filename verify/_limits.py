"""Refuse problems that cannot fit in memory, before any work (``--shots 1000000000``, a 1e10-parameter MLP).

The estimate is a lower bound of what the reference and the audited function hold at once, in
float64 (8 bytes): the parameters times the inner-loop iterates and gradients kept for the
backward pass, and per task the data and the activations of every inner step. It only has to
be right within an order of magnitude: it separates problems that fit from sizes that are
typos or tests of the tool (tens of gigabytes and more), and the refusal says which factor
dominates.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from reference.errors import InvalidInputError

__all__ = ["available_memory", "check_problem_fits", "problem_bytes"]

#: Upper ends of the sizes :func:`verify.algorithms.build_case` draws when a value is not given.
DRAWN_MAX = {"n_tasks": 3, "shots": 5, "queries": 5, "n_way": 3, "inner_steps": 3, "sizes": (3, 5, 3)}
BACKBONE = ("r2d2", "lrd2", "protonet", "matchingnet")


def available_memory() -> int:
    """Bytes of memory available now (``MemAvailable`` of ``/proc/meminfo``; physical memory elsewhere)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - exotic platforms
        return 1 << 62


def problem_bytes(algorithm: str, *, sizes: Sequence[int] | None = None, n_tasks: int | None = None,
                  shots: int | None = None, queries: int | None = None, n_way: int | None = None,
                  inner_steps: int | None = None, loss: str | None = None) -> tuple[int, dict[str, int]]:
    """A lower bound of the float64 memory a problem needs, and its parts (bytes).

    Unspecified values take the largest value :func:`verify.algorithms.build_case` draws.
    """
    sizes = list(sizes) if sizes else list(DRAWN_MAX["sizes"])
    tasks = n_tasks or DRAWN_MAX["n_tasks"]
    s, q = shots or DRAWN_MAX["shots"], queries or DRAWN_MAX["queries"]
    steps = inner_steps or DRAWN_MAX["inner_steps"]
    n_params = sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:]))
    if algorithm in BACKBONE:
        classes = n_way or DRAWN_MAX["n_way"]
        steps = 1
    else:
        classes = sizes[-1] if (loss == "ce" or (loss is None and sizes[-1] > 1)) else 1
    n_support, n_query = s * classes, q * classes
    examples = n_support + n_query
    parts = {
        "parameters": 8 * n_params * (steps + 4),  # iterates, gradients and a Hessian-vector product
        "data": 8 * tasks * examples * (sizes[0] + 1),
        "activations": 8 * tasks * examples * sum(sizes) * (steps + 1),
    }
    if algorithm in ("r2d2", "lrd2"):
        # the ridge / logistic head: an n_support x n_support kernel (dual) or d x d system (primal)
        parts["head"] = 8 * tasks * min(n_support, sizes[-1] + 1) ** 2 + 8 * tasks * n_support * classes
    if algorithm == "matchingnet":
        parts["head"] = 8 * tasks * n_support * n_query
    return sum(parts.values()), parts


def _human(n: float) -> str:
    for unit, size in (("EB", 1 << 60), ("PB", 1 << 50), ("TB", 1 << 40), ("GB", 1 << 30), ("MB", 1 << 20)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n / 1024:.3g} kB"


def check_problem_fits(algorithm: str, *, available: int | None = None, **sizes: object) -> int:
    """Raise when the problem's memory estimate exceeds the memory available; return the estimate.

    Raises:
        InvalidInputError: naming the estimate, the memory available and the dominant part.
    """
    total, parts = problem_bytes(algorithm, **sizes)  # type: ignore[arg-type]
    limit = available_memory() if available is None else available
    if total > limit:
        worst = max(parts, key=lambda k: parts[k])
        given = ", ".join(f"{k}={v}" for k, v in sizes.items() if v is not None)
        raise InvalidInputError(
            f"the {algorithm} problem ({given}) needs at least {_human(total)} of memory ({worst}: "
            f"{_human(parts[worst])}), more than the {_human(limit)} available; reduce the sizes (--model, "
            "--tasks, --shots, --queries, --n-way, --inner-steps)")
    return total
