"""Second-order checks of the single PyTorch operations meta-learning code relies on.

Meta-gradients through an inner loop (MAML, iMAML, R2-D2, ...) need every
operation on the path to support *double backward*: the gradient of a
gradient built with ``create_graph=True``. For each operation this module
builds a scalar function ``f(x)`` of one flat vector ``x`` (the op's inputs,
packed) and checks the Hessian-vector product from double backward,

    H v = torch.autograd.grad(grad f(x) [create_graph=True], x, grad_outputs=v),

against finite differences of the float64 gradient (first-order backward,
the part every framework test suite covers): for a few random ``u``,
``<u, H v>`` must equal ``D_v <u, grad f>(x)``, estimated by
:func:`verify.directional_derivative` with Richardson extrapolation, which
also supplies an error bound (the ``jax.check_grads`` habit: a random
projection, no Hessian). The HVP under test runs in the requested dtype and
device; the finite-difference reference is always float64 on the CPU.
Complex step is not used: torch's complex autograd returns conjugate
Wirtinger derivatives, not the analytic continuation of the gradient.

Verdicts: ``"pass"``; ``"fail"`` (a wrong HVP, a NaN, or a gradient that
silently carries no graph); ``"unsupported"`` (double backward raises, as for
``torch.cdist``'s default path: ``_cdist_backward`` has no derivative; see
:data:`KNOWN_GAPS`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from verify import directional_derivative
from verify.backends.torch._model import resolve_device, resolve_dtype, tf32
from verify.tolerance import tolerance

__all__ = ["KNOWN_GAPS", "OPS", "check_second_order_ops"]

#: Operations whose double backward PyTorch does not implement (reported, never hidden).
KNOWN_GAPS: dict[str, str] = {
    "cdist": (
        "torch.cdist (p=2, compute_mode 'use_mm_for_euclid_dist_if_necessary' for < 25 rows, or "
        "'donot_use_mm_for_euclid_dist') backpropagates through _cdist_backward, whose derivative is not "
        "implemented: double backward raises. Use the broadcast form ((a[:, None] - b[None]) ** 2).sum(-1) "
        "or compute_mode='use_mm_for_euclid_dist'"
    ),
}

# Random projections <u, H v> compared per op.
_PROJECTIONS = 3

Fn = Callable[[torch.Tensor], torch.Tensor]


def _split(x: torch.Tensor, *shapes: tuple[int, ...]) -> list[torch.Tensor]:
    out, start = [], 0
    for s in shapes:
        n = math.prod(s)
        out.append(x[start : start + n].reshape(s))
        start += n
    return out


def _away_from_zero(rng: np.random.Generator, n: int, low: float = 0.5, high: float = 2.0) -> np.ndarray:
    """Points with ``|x_i| >= low``: a finite-difference step (<= 2^-4 per unit of v) never crosses a kink."""
    return rng.choice([-1.0, 1.0], size=n) * rng.uniform(low, high, size=n)


def _elementwise(act: Fn) -> Callable[[np.random.Generator], tuple[Fn, np.ndarray]]:
    def build(rng: np.random.Generator):
        c = torch.as_tensor(rng.normal(size=8))
        return (lambda x: (c.to(x) * act(x)).sum()), _away_from_zero(rng, 8)

    return build


def _cross_entropy(rng):
    y = torch.as_tensor(rng.integers(0, 5, size=4))
    return (lambda x: F.cross_entropy(x.reshape(4, 5), y.to(x.device))), rng.normal(size=20)


def _log_softmax(rng):
    c = torch.as_tensor(rng.normal(size=(4, 5)))
    return (lambda x: (c.to(x) * F.log_softmax(x.reshape(4, 5), dim=1)).sum()), rng.normal(size=20)


def _logsumexp(rng):
    c = torch.as_tensor(rng.normal(size=4))
    return (lambda x: (c.to(x) * torch.logsumexp(x.reshape(4, 5), dim=1)).sum()), rng.normal(size=20)


def _pairwise(kind: str):
    def build(rng):
        c = torch.as_tensor(rng.normal(size=(4, 5)))

        def f(x):
            a, b = _split(x, (4, 3), (5, 3))
            if kind == "broadcast":
                d = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
            elif kind == "cdist":
                d = torch.cdist(a, b) ** 2
            else:
                d = torch.cdist(a, b, compute_mode="use_mm_for_euclid_dist") ** 2
            return (c.to(x) * d).sum()

        return f, rng.normal(size=27)

    return build


def _solve(rng):
    c = torch.as_tensor(rng.normal(size=4))
    x0 = np.concatenate([(rng.normal(size=(4, 4)) + 4 * np.eye(4)).ravel(), rng.normal(size=4)])

    def f(x):
        A, b = _split(x, (4, 4), (4,))
        return (c.to(x) * torch.linalg.solve(A, b)).sum()

    return f, x0


def _cholesky(rng):
    c = torch.as_tensor(np.tril(rng.normal(size=(4, 4))))

    def f(x):
        (M,) = _split(x, (4, 4))
        S = M @ M.T + 4 * torch.eye(4, dtype=x.dtype, device=x.device)
        return (c.to(x) * torch.linalg.cholesky(S)).sum()

    return f, rng.normal(size=16)


def _layer_norm(rng):
    c = torch.as_tensor(rng.normal(size=(3, 6)))
    x0 = np.concatenate([rng.normal(size=18), 1 + 0.1 * rng.normal(size=6), 0.1 * rng.normal(size=6)])

    def f(x):
        X, w, b = _split(x, (3, 6), (6,), (6,))
        return (c.to(x) * F.layer_norm(X, (6,), w, b)).sum()

    return f, x0


def _batch_norm(rng):
    c = torch.as_tensor(rng.normal(size=(6, 4)))
    x0 = np.concatenate([rng.normal(size=24), 1 + 0.1 * rng.normal(size=4), 0.1 * rng.normal(size=4)])

    def f(x):
        X, w, b = _split(x, (6, 4), (4,), (4,))
        return (c.to(x) * F.batch_norm(X, None, None, w, b, training=True)).sum()

    return f, x0


def _conv2d(rng):
    c = torch.as_tensor(rng.normal(size=(1, 3, 3, 3)))
    x0 = np.concatenate([rng.normal(size=50), 0.3 * rng.normal(size=54), 0.1 * rng.normal(size=3)])

    def f(x):
        inp, w, b = _split(x, (1, 2, 5, 5), (3, 2, 3, 3), (3,))
        return (c.to(x) * torch.tanh(F.conv2d(inp, w, b))).sum()

    return f, x0


def _mse(rng):
    y = torch.as_tensor(rng.normal(size=(4, 3)))
    return (lambda x: F.mse_loss(torch.tanh(x.reshape(4, 3)), y.to(x))), rng.normal(size=12)


def _bce(rng):
    y = torch.as_tensor(rng.integers(0, 2, size=(4, 3)).astype(float))
    return (lambda x: F.binary_cross_entropy_with_logits(x.reshape(4, 3), y.to(x))), rng.normal(size=12)


def _cosine(rng):
    c = torch.as_tensor(rng.normal(size=(3, 4)))

    def f(x):
        a, b = _split(x, (3, 5), (4, 5))
        return (c.to(x) * F.cosine_similarity(a[:, None, :], b[None, :, :], dim=-1)).sum()

    return f, rng.normal(size=35)


#: op name -> builder ``rng -> (f, x0)``; ``f`` maps one flat tensor to a scalar.
OPS: dict[str, Callable[[np.random.Generator], tuple[Fn, np.ndarray]]] = {
    "tanh": _elementwise(torch.tanh),
    "sigmoid": _elementwise(torch.sigmoid),
    "softplus": _elementwise(F.softplus),
    "relu": _elementwise(F.relu),
    "gelu": _elementwise(F.gelu),
    "gelu(approximate='tanh')": _elementwise(lambda z: F.gelu(z, approximate="tanh")),
    "log_softmax": _log_softmax,
    "cross_entropy": _cross_entropy,
    "logsumexp": _logsumexp,
    "mse_loss": _mse,
    "binary_cross_entropy_with_logits": _bce,
    "pairwise_sqdist(broadcast)": _pairwise("broadcast"),
    "cdist": _pairwise("cdist"),
    "cdist(use_mm_for_euclid_dist)": _pairwise("mm"),
    "cosine_similarity": _cosine,
    "linalg.solve": _solve,
    "linalg.cholesky": _cholesky,
    "layer_norm": _layer_norm,
    "batch_norm(training)": _batch_norm,
    "conv2d": _conv2d,
}


def _gradient64(f: Fn) -> Callable[[np.ndarray], np.ndarray]:
    """``x -> grad f(x)`` in float64 on the CPU (first-order backward only)."""

    cache: dict[bytes, np.ndarray] = {}

    def grad(x: np.ndarray) -> np.ndarray:
        # The projections evaluate the gradient at the same points (same x, v, steps): cache them.
        key = np.ascontiguousarray(x, dtype=np.float64).tobytes()
        if key not in cache:
            xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
            (g,) = torch.autograd.grad(f(xt), xt)
            cache[key] = g.numpy()
        return cache[key]

    return grad


def _check_op(name: str, build, rng: np.random.Generator, dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
    f, x0 = build(rng)
    v = rng.normal(size=x0.size)
    v /= np.max(np.abs(v))
    row: dict[str, Any] = {"op": name, "dtype": str(dtype).replace("torch.", ""), "device": str(device)}
    # The HVP under test: double backward in the requested dtype/device.
    try:
        xt = torch.tensor(x0, dtype=dtype, device=device, requires_grad=True)
        (g,) = torch.autograd.grad(f(xt), xt, create_graph=True)
        if not g.requires_grad:
            hv = np.zeros_like(x0)
            note = "the gradient carries no graph (create_graph=True had no effect): HVP taken as 0; "
        else:
            (hvt,) = torch.autograd.grad(g, xt, torch.as_tensor(v, dtype=dtype, device=device))
            hv = hvt.detach().to("cpu", torch.float64).numpy()
            note = ""
    except (RuntimeError, NotImplementedError) as exc:
        gap = next((text for key, text in KNOWN_GAPS.items() if name == key), None)
        detail = f"double backward raised {type(exc).__name__}: {str(exc).splitlines()[0]}"
        if gap:
            detail += f" (known PyTorch gap: {gap})"
        return {**row, "status": "unsupported", "error": None, "tolerance": None, "detail": detail}
    tol_table = tolerance(np.float64 if dtype == torch.float64 else np.float32, "gradient")
    if not np.all(np.isfinite(hv)):
        return {**row, "status": "fail", "error": math.inf, "tolerance": tol_table,
                "detail": note + "double backward returned non-finite values"}
    grad = _gradient64(f)
    hv_norm = float(np.linalg.norm(hv))
    worst_err, worst_tol, worst = 0.0, tol_table, ""
    for _ in range(_PROJECTIONS):
        u = rng.normal(size=x0.size)
        est = directional_derivative(lambda x, u=u: float(u @ grad(x)), x0, v, method="richardson")
        claimed = float(u @ hv)
        scale = float(np.linalg.norm(u)) * max(hv_norm, abs(est.value) / float(np.linalg.norm(u)))
        if scale == 0.0:
            err, tol = 0.0, tol_table  # H v = 0 and D_v <u, g> = 0 (e.g. relu away from its kink)
        else:
            # Normwise, like the "gradient" kind: relative to ||u|| ||H v||, plus the estimate's own bound.
            err, tol = abs(claimed - est.value) / scale, tol_table + est.error / scale
        if err / tol >= worst_err / worst_tol:
            worst_err, worst_tol = err, tol
            worst = f"<u, Hv> = {claimed:.12g}, Richardson D_v<u, grad> = {est.value:.12g} +- {est.error:.2g}"
    status = "pass" if worst_err <= worst_tol else "fail"
    return {**row, "status": status, "error": worst_err, "tolerance": worst_tol, "detail": note + worst}


def check_second_order_ops(*, dtype: str = "float64", seed: int = 0, device: str = "cpu",
                           allow_tf32: bool = False, ops: list[str] | None = None) -> list[dict[str, Any]]:
    """Check double-backward Hessian-vector products of single ops against finite differences.

    Args:
        dtype: dtype of the HVP under test (``"float64"`` or ``"float32"``);
            the finite-difference reference is always float64.
        seed: seeds the points, directions and projections.
        device: where the HVP under test runs (``"cpu"`` or ``"cuda"``).
        allow_tf32: allow TF32 matmuls/convolutions on CUDA during the check.
        ops: names from :data:`OPS` (default: all).

    Returns:
        One dict per op: ``op``, ``status`` (``"pass"``, ``"fail"``,
        ``"unsupported"``), ``error`` (worst normwise relative error of
        ``<u, H v>``; ``None`` when unsupported), ``tolerance`` (the table's
        ``"gradient"`` entry for ``dtype`` plus the finite-difference error
        bound, same scale), ``detail``, ``dtype``, ``device``.
    """
    tdtype, dev = resolve_dtype(dtype), resolve_device(device)
    names = list(OPS) if ops is None else list(ops)
    unknown = [n for n in names if n not in OPS]
    if unknown:
        from reference.errors import InvalidInputError

        raise InvalidInputError(f"ops={unknown!r} are unknown; choose from {list(OPS)}")
    rows = []
    with tf32(allow_tf32):
        for i, name in enumerate(names):
            rng = np.random.default_rng([seed, i])
            rows.append(_check_op(name, OPS[name], rng, tdtype, dev))
    return rows


def _main(argv: list[str] | None = None) -> int:
    """``python -m verify.backends.torch.ops [--dtype float64|float32|all] [--seed S] [--device D]``: print the table."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m verify.backends.torch.ops", description=_main.__doc__)
    parser.add_argument("--dtype", choices=["float64", "float32", "all"], default="all")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--allow-tf32", action="store_true")
    args = parser.parse_args(argv)
    dtypes = ["float64", "float32"] if args.dtype == "all" else [args.dtype]
    print(f"torch {torch.__version__}: double-backward HVP vs Richardson differences of the float64 gradient")
    print(f"{'op':34s} {'dtype':8s} {'status':11s} {'error':>9s} {'tolerance':>9s}  detail")
    failed = False
    for dtype in dtypes:
        for r in check_second_order_ops(dtype=dtype, seed=args.seed, device=args.device, allow_tf32=args.allow_tf32):
            err = "-" if r["error"] is None else f"{r['error']:.2e}"
            tol = "-" if r["tolerance"] is None else f"{r['tolerance']:.2e}"
            detail = r["detail"] if r["status"] != "pass" else ""
            print(f"{r['op']:34s} {dtype:8s} {r['status']:11s} {err:>9s} {tol:>9s}  {detail}")
            failed |= r["status"] == "fail"
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(_main())
