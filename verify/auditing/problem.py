"""The problem an audit runs on: ``--model`` specs and the seeded case.

:func:`build_problem` turns the audit's keyword arguments (``model="mlp:1-40-1:tanh"``,
``inner_lr=...``) into a :class:`verify.algorithms.Case`, with the checks a user's
typo deserves (:class:`verify.errors.InvalidInputError`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from reference.errors import AuditInputError, InvalidInputError
from reference.models import MLP
from verify.algorithms import ALGORITHMS, Case, build_case

__all__ = ["ALGORITHM_OPTIONS", "BACKENDS", "AuditInputError", "build_problem", "check_options_apply", "parse_model"]

#: The frameworks with an audit harness (``verify.backends.<name>.audit_harness``).
BACKENDS = ("torch", "jax")


#: Problem options of each algorithm (besides --model, --tasks, --shots, --queries, --seed): an option
#: outside its row is a usage error, never silently echoed in the problem line as if it were used.
_GRADIENT = ("inner_lr", "inner_steps", "loss")
ALGORITHM_OPTIONS: dict[str, tuple[str, ...]] = {
    "maml": _GRADIENT, "fomaml": _GRADIENT, "anil": _GRADIENT, "reptile": _GRADIENT, "metasgd": _GRADIENT,
    "newton": (*_GRADIENT, "damping"),
    "imaml": ("lam", "loss"),
    "r2d2": ("lam", "scale", "offset", "bias_column", "normalize", "form", "n_way"),
    "lrd2": ("lam", "scale", "offset", "bias_column", "newton_steps", "n_way"),
    "protonet": ("n_way",), "matchingnet": ("n_way",),
}
#: CONVENTIONS' defaults of the discrete conventions ("wherever a caller does not say otherwise, never
#: drawn at random"): ones column on, normalisation on, the dual form.
CONVENTION_DEFAULTS: dict[str, dict[str, Any]] = {
    "r2d2": {"bias_column": True, "normalize": True, "form": "dual"},
    "lrd2": {"bias_column": True},
}
#: Options every algorithm takes.
COMMON_OPTIONS = ("model", "n_tasks", "shots", "queries")


def _flag(name: str) -> str:
    return "--tasks" if name == "n_tasks" else "--" + name.replace("_", "-")


def check_options_apply(algorithm: str, given: dict[str, Any], *, spell: Callable[[str], str] = _flag) -> None:
    """Refuse problem options that ``algorithm`` does not have (e.g. ``--lam`` with ``maml``).

    Raises:
        InvalidInputError: naming the options that do not apply and the ones that do.
    """
    own = ALGORITHM_OPTIONS.get(algorithm, ())
    bad = [k for k, v in given.items() if v is not None and k not in own and k not in COMMON_OPTIONS]
    if bad:
        names = ", ".join(spell(k) for k in bad)
        takes = ", ".join(spell(k) for k in (*own, *COMMON_OPTIONS))
        raise InvalidInputError(f"{names} {'does' if len(bad) == 1 else 'do'} not apply to {algorithm}; its problem "
                                f"options are {takes}; remove {names}")


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
    # Discrete conventions a caller did not give take CONVENTIONS' defaults, never a draw from the seed
    # (a draw made the verdict of an implementation of the default flip with the seed).
    hyper = {**CONVENTION_DEFAULTS.get(algorithm, {}), **hyper}
    if "inner_steps" in hyper and (isinstance(hyper["inner_steps"], bool) or int(hyper["inner_steps"]) < 1):
        raise InvalidInputError(f"inner_steps={hyper['inner_steps']!r} must be >= 1")
    try:
        case = build_case(algorithm, seed=seed, **kwargs, **hyper)
    except TypeError as exc:
        raise InvalidInputError(f"bad problem description for {algorithm}: {exc}") from exc
    if loss == "ce" and case.model.sizes[-1] < 2 and ALGORITHMS[algorithm].family != "backbone":
        raise InvalidInputError(f"loss='ce' needs at least 2 outputs; model sizes {list(case.model.sizes)}")
    return case

