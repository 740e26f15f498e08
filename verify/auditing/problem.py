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
from reference.tasks import Task
from verify.algorithms import ALGORITHMS, Case, build_case

__all__ = ["ALGORITHM_OPTIONS", "BACKENDS", "AuditInputError", "build_problem", "check_options_apply",
           "network_from_spec", "parse_model"]

#: The frameworks with an audit harness (``verify.backends.<name>.audit_harness``).
BACKENDS = ("torch", "jax")


#: Problem options of each algorithm (besides --model, --tasks, --shots, --queries, --seed): an option
#: outside its row is a usage error, never silently echoed in the problem line as if it were used.
_GRADIENT = ("inner_lr", "inner_steps", "loss")
ALGORITHM_OPTIONS: dict[str, tuple[str, ...]] = {
    "maml": _GRADIENT, "fomaml": _GRADIENT, "anil": _GRADIENT, "reptile": _GRADIENT, "metasgd": _GRADIENT,
    "newton": (*_GRADIENT, "damping"),
    # MAML++ (inner_lr: the centre of the drawn (K, n) rates) and the learned optimisers (Ravi & Larochelle's
    # meta-learner takes its step from its gates: no inner_lr)
    "mamlpp": _GRADIENT, "lstm-optimizer": _GRADIENT, "meta-lstm": ("inner_steps", "loss"),
    "imaml": ("lam", "loss"),
    "r2d2": ("lam", "scale", "offset", "bias_column", "normalize", "form", "n_way"),
    "lrd2": ("lam", "scale", "offset", "bias_column", "newton_steps", "n_way"),
    "protonet": ("n_way",), "matchingnet": ("n_way",),
}
#: Rows whose problem is built on an MLP only (MAML++'s (K, n) rates, the learned optimisers' phi).
MLP_ONLY = ("mamlpp", "lstm-optimizer", "meta-lstm")
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
    if algorithm not in ALGORITHM_OPTIONS:
        return  # a row registered elsewhere (verify.algorithms.register) declares no option table here
    own = ALGORITHM_OPTIONS[algorithm]
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


_NETWORK_HINT = ("use conv4:CxHxW:N_WAY[:hidden=64], resnet12:CxHxW:N_WAY[:widths=64-160-320-640], "
                 "FILE.py:factory[:CxHxW] or package.module:factory[:CxHxW]")


def _shape(text: str, where: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in text.lower().split("x"))
    except ValueError:
        raise InvalidInputError(f"model={where!r}: the image shape {text!r} must be CxHxW, e.g. 1x28x28") from None
    if len(shape) != 3 or min(shape) < 1:
        raise InvalidInputError(f"model={where!r}: the image shape {text!r} must be CxHxW, e.g. 1x28x28")
    return shape


def _load_factory(target: str, where: str) -> Any:
    """``FILE.py:factory`` or ``package.module:factory`` -> the factory callable."""
    import importlib
    import importlib.util
    import os

    module_name, _, attr = target.rpartition(":")
    if module_name.endswith(".py"):
        if not os.path.isfile(module_name):
            raise InvalidInputError(f"model={where!r}: no file {module_name!r}")
        spec = importlib.util.spec_from_file_location(f"_metaverify_model_{abs(hash(module_name))}", module_name)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise InvalidInputError(f"model={where!r}: cannot import {module_name!r} ({exc})") from None
    if not hasattr(module, attr):
        raise InvalidInputError(f"model={where!r}: {module_name!r} has no attribute {attr!r}")
    return getattr(module, attr)


def network_from_spec(text: str) -> tuple[Any, list[np.ndarray] | None]:
    """A convolutional model spec -> ``(reference.nets.Network, params or None)``; ``None`` if not one.

    * ``conv4:1x28x28:5[:hidden=64]`` and ``resnet12:3x84x84:5[:widths=64-160-320-640]``: the
      reference constructors (parameters from the seed);
    * ``FILE.py:factory[:CxHxW]`` / ``package.module:factory[:CxHxW]``: the user's factory is called
      (no arguments), its ``torch.nn.Module`` translated by ``reference.from_torch`` with *its* initial
      values and batch-norm state; the image shape defaults to 1x28x28 (Omniglot).
    """
    parts = str(text).split(":")
    kind = parts[0]
    if kind in ("conv4", "resnet12"):
        from reference.nets import conv4, resnet12

        if len(parts) < 3:
            raise InvalidInputError(f"model={text!r} needs an image shape and a class count; {_NETWORK_HINT}")
        shape = _shape(parts[1], text)
        try:
            n_way = int(parts[2])
        except ValueError:
            raise InvalidInputError(f"model={text!r}: the class count {parts[2]!r} must be an integer") from None
        options: dict[str, Any] = {}
        for extra in parts[3:]:
            name, _, value = extra.partition("=")
            if kind == "conv4" and name == "hidden":
                options["hidden"] = int(value)
            elif kind == "resnet12" and name == "widths":
                options["widths"] = tuple(int(w) for w in value.split("-"))
            else:
                raise InvalidInputError(f"model={text!r}: unknown option {extra!r}; {_NETWORK_HINT}")
        if kind == "conv4":
            return conv4(shape, n_way, ceil_mode=min(shape[1:]) < 16, **options), None
        return resnet12(shape, n_way, **options), None
    if len(parts) >= 2 and (parts[0].endswith(".py") or ("." in parts[0] and parts[0].replace(".", "").replace(
            "_", "").isalnum())):
        import reference

        shape = _shape(parts[2], text) if len(parts) > 2 else (1, 28, 28)
        factory = _load_factory(f"{parts[0]}:{parts[1]}", text)
        module = factory()
        net, params = reference.from_torch(module, shape)
        return net, params
    return None


def _network_case(algorithm: str, net: Any, params: list[np.ndarray] | None, *, n_tasks: int | None,
                  shots: int | None, queries: int | None, n_way: int | None, seed: int,
                  hyper: dict[str, Any]) -> Case:
    """A seeded image-classification case on a convolutional network (gradient-based algorithms)."""
    spec = ALGORITHMS[algorithm]
    metric = algorithm in ("protonet", "matchingnet")
    if algorithm in MLP_ONLY:
        raise InvalidInputError(f"algorithm={algorithm!r} is audited on MLPs (its rates / learned optimiser are drawn "
                                "for an MLP's tensors); use an mlp: spec, e.g. --model mlp:2-8-1:tanh")
    if spec.family != "gradient" and not metric:
        raise InvalidInputError(f"algorithm={algorithm!r}: convolutional models are audited for the gradient-based "
                                "algorithms (maml, fomaml, anil, metasgd, reptile, ...) and the metric learners "
                                "(protonet, matchingnet: the model is the feature extractor); use an mlp: spec")
    if net.loss_name != "ce":
        raise InvalidInputError(f"the network's loss is {net.loss_name!r}; image tasks need class logits ('ce')")
    rng = np.random.default_rng(seed)
    n_way = n_way or net.n_out
    if n_way > net.n_out and not metric:
        raise InvalidInputError(f"n_way={n_way} exceeds the network's {net.n_out} outputs")
    shots, queries, n_tasks = shots or 1, queries or 5, n_tasks or 2
    tasks = []
    for _ in range(n_tasks):
        ys = rng.permutation(np.repeat(np.arange(n_way), shots))
        yq = rng.permutation(np.repeat(np.arange(n_way), queries))
        tasks.append(Task(rng.normal(size=(ys.size, *net.in_shape)), ys, rng.normal(size=(yq.size, *net.in_shape)),
                          yq))
    hyper = dict(hyper)
    if metric:
        hyper.setdefault("n_classes", n_way)
    else:
        hyper.setdefault("inner_steps", 1)
        hyper.setdefault("inner_lr", 0.1)
    params = net.init(int(rng.integers(2**31))) if params is None else params
    extra: dict[str, np.ndarray] = {}
    if algorithm == "metasgd":
        base = hyper.pop("inner_lr")
        for i, p in enumerate(params):
            extra[f"lrs[{i}]"] = base * rng.uniform(0.5, 1.5, size=p.shape)
    return Case(algorithm, net, list(params), tasks, hyper, seed, extra)


def build_problem(algorithm: str, *, model: Any, loss: str | None, n_tasks: int | None, shots: int | None,
                   queries: int | None, n_way: int | None, seed: int, hyper: dict[str, Any]) -> Case:
    from reference.nets.network import Network

    # Discrete conventions a caller did not give take CONVENTIONS' defaults, never a draw from the seed
    # (a draw made the verdict of an implementation of the default flip with the seed).
    hyper = {**CONVENTION_DEFAULTS.get(algorithm, {}), **hyper}
    network = None
    if isinstance(model, Network):
        network = (model, None)
    elif isinstance(model, str):
        network = network_from_spec(model)
    if network is not None:
        if "inner_steps" in hyper and (isinstance(hyper["inner_steps"], bool) or int(hyper["inner_steps"]) < 1):
            raise InvalidInputError(f"inner_steps={hyper['inner_steps']!r} must be >= 1")
        return _network_case(algorithm, network[0], network[1], n_tasks=n_tasks, shots=shots, queries=queries,
                             n_way=n_way, seed=seed, hyper=hyper)
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

