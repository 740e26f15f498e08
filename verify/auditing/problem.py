"""The problem an audit runs on: ``--model`` specs and the seeded case.

:func:`build_problem` turns the audit's keyword arguments (``model="mlp:1-40-1:tanh"``,
``inner_lr=...``) into a :class:`verify.algorithms.Case`, with the checks a user's
typo deserves (:class:`verify.errors.InvalidInputError`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from reference.errors import AuditInputError, InvalidInputError
from reference.models import MLP
from verify.algorithms import ALGORITHMS, Case, build_case

__all__ = ["BACKENDS", "AuditInputError", "build_problem", "parse_model"]

#: The frameworks with an audit harness (``verify.backends.<name>.audit_harness``).
BACKENDS = ("torch", "jax")


# ---------------------------------------------------------------------------
# problem description
# ---------------------------------------------------------------------------


def parse_model(text: str) -> dict[str, Any]:
    """``"mlp:1-40-40-1:tanh[:nobias]"`` -> ``{"sizes": [1, 40, 40, 1], "activation": "tanh", "bias": True}``."""
    parts = str(text).split(":")
    hint = "use mlp:SIZES[:ACTIVATION][:nobias], e.g. mlp:1-40-40-1:tanh"
    if len(parts) < 2 or parts[0] != "mlp":
        raise InvalidInputError(f"model={text!r} is not a model spec; {hint}")
    try:
        sizes = [int(s) for s in parts[1].split("-")]
    except ValueError:
        raise InvalidInputError(f"model={text!r}: sizes {parts[1]!r} must be integers joined by '-'; {hint}") from None
    if len(sizes) < 2 or min(sizes) < 1:
        raise InvalidInputError(f"model={text!r}: needs at least two positive layer widths; {hint}")
    out: dict[str, Any] = {"sizes": sizes, "activation": None, "bias": True}
    for extra in parts[2:]:
        if extra == "nobias":
            out["bias"] = False
        elif extra in ("tanh", "sigmoid", "softplus", "relu", "identity"):
            out["activation"] = extra
        else:
            raise InvalidInputError(f"model={text!r}: unknown part {extra!r}; {hint}")
    return out


def build_problem(algorithm: str, *, model: Any, loss: str | None, n_tasks: int | None, shots: int | None,
                   queries: int | None, n_way: int | None, seed: int, hyper: dict[str, Any]) -> Case:
    kwargs: dict[str, Any] = {}
    if isinstance(model, MLP):
        kwargs.update(sizes=list(model.sizes), activation=model.activation, bias=model.bias)
        loss = loss or model.loss_name
    elif model is not None:
        spec = parse_model(model)
        kwargs.update(sizes=spec["sizes"], bias=spec["bias"])
        if spec["activation"]:
            kwargs["activation"] = spec["activation"]
    for name, value in (("n_tasks", n_tasks), ("shots", shots), ("queries", queries), ("n_way", n_way)):
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise InvalidInputError(f"{name}={value!r} must be a positive integer")
            kwargs[name] = int(value)
    if loss is None and kwargs.get("sizes") and kwargs["sizes"][-1] == 1:
        loss = "mse"  # one output: cross-entropy is undefined
    if loss is not None:
        if loss not in ("mse", "ce"):
            raise InvalidInputError(f"loss={loss!r} must be 'mse' or 'ce'")
        kwargs["loss"] = loss
    if ALGORITHMS[algorithm].family == "backbone" and "sizes" in kwargs and kwargs.get("loss"):
        kwargs.pop("loss")  # the backbone's output is a feature vector; its loss is fixed by the algorithm
    if "inner_steps" in hyper and (isinstance(hyper["inner_steps"], bool) or int(hyper["inner_steps"]) < 1):
        raise InvalidInputError(f"inner_steps={hyper['inner_steps']!r} must be >= 1")
    try:
        case = build_case(algorithm, seed=seed, **kwargs, **hyper)
    except TypeError as exc:
        raise InvalidInputError(f"bad problem description for {algorithm}: {exc}") from exc
    if loss == "ce" and case.model.sizes[-1] < 2 and ALGORITHMS[algorithm].family != "backbone":
        raise InvalidInputError(f"loss='ce' needs at least 2 outputs; model sizes {list(case.model.sizes)}")
    return case

