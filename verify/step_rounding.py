"""A differentiable optimiser's step evaluated in float32, for the float32 condition estimate.

Why (measured, ``scripts/adam_float32.py`` -> ``reports/inner-optimizers/adam-float32.md``):
Adam's step (Kingma & Ba 2015) ``d = m_hat / (sqrt(v_hat) + eps)`` is almost flat in ``g`` where
``|g| >> eps``: at the first step ``d = g / (|g| + eps)`` and

    dd/dg = 1 / (|g| + eps) - g^2 / (|g| (|g| + eps)^2) = eps / (|g| + eps)^2,

a difference of two terms of size ``1 / |g|`` that cancel down to
``eps / g^2`` (the reference's VJP ``bar_g = (1 - b1) bar_m + 2 (1 - b2) g
bar_v`` is that sum; autograd through torch's or JAX's Adam forms the same
two terms). In float32 the sum carries ``~eps32 |bar_d| / |g|``: a
coordinate with a small support gradient ``|g|`` amplifies float32's rounding
by ``1 / |g|``, and that error then travels back through the rest of the
inner loop. Rounding the *inputs* to float32 (the matrix's
:func:`verify.matrix.float32_condition` before this module) cannot see it: the
exact step Jacobian is ``eps / g^2 ~ 0``, so perturbed inputs barely move the
exact meta-gradient; it is the float32 *evaluation* of the Jacobian that errs.

:func:`float32_step` returns a copy of a ``reference.optimizers`` spec whose
per-tensor step and VJP (the reference's own formulas, ``_direction`` and
``_vjp``) run in float32 arithmetic: the arrays are cast to ``np.float32``,
the hyper-parameters stay Python floats (weak scalars in NumPy >= 2, as in
torch and JAX: ``(1 - b1) * g`` is float32) and Adam's bias corrections are
computed in double and rounded to float32 once, as torch.optim and optax do;
the rest of the reference stays float64. Running the
reference with it on float32-rounded inputs measures what an honest float32
evaluation of the optimiser loses on *this* problem; the relative change of
the meta-gradient, in units of float32's eps, is the condition estimate the
float32 tolerance is scaled by (``tolerance("float32", ..., condition=...)``).
It is one rounding sample, not a bound: over the matrix's 80 Adam problems a
torch float32 error is at most 6.8x this deviation, against the 54x
(``eps32^(3/4) / eps32``) the tolerance grants.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np

from reference.errors import InvalidInputError
from reference.optimizers import _Elementwise

__all__ = ["float32_step"]

_F32 = np.float32


def _down(x: Any) -> Any:
    """float64 arrays/scalars -> float32 (``None`` and non-float values kept)."""
    if x is None:
        return None
    if isinstance(x, tuple):
        return tuple(_down(a) for a in x)
    a = np.asarray(x)
    return a.astype(_F32) if a.dtype.kind == "f" else x


def _up(x: Any) -> Any:
    """Back to float64 for the (float64) rest of the reference."""
    if x is None:
        return None
    if isinstance(x, tuple):
        return tuple(_up(a) for a in x)
    if isinstance(x, dict):
        return {k: _up(v) for k, v in x.items()}
    a = np.asarray(x)
    return a.astype(np.float64)[()] if a.dtype.kind == "f" else x


def float32_step(opt: Any, parts: tuple[str, ...] = ("direction", "vjp")) -> Any:
    """A copy of the elementwise optimiser spec ``opt`` whose step and step VJP run in float32.

    ``parts``: which of the two run in float32 (``"direction"``: the forward step,
    ``"vjp"``: its VJP); the measurement script separates them, the condition
    estimate rounds both.

    The copy's class is a subclass of ``type(opt)`` (so every ``isinstance``
    dispatch of the reference still sees an ``Adam`` / ``Momentum`` / ``SGD``);
    its per-tensor
    ``_direction`` / ``_vjp`` cast their inputs to float32 and their outputs back
    to float64. The VJP's cache stays float32 between the two, as a float32
    framework's saved tensors do.

    Raises:
        InvalidInputError: ``opt`` is not an elementwise ``reference.optimizers``
            spec (SGD, Momentum, Adam): a learned optimiser's step is a small
            network whose float32 rounding is not this estimate's subject.
    """
    if not set(parts) <= {"direction", "vjp"}:
        raise InvalidInputError(f"parts={parts!r} must name 'direction' and/or 'vjp'")
    if not isinstance(opt, _Elementwise):
        raise InvalidInputError(f"opt={opt!r} is not an elementwise optimiser spec of reference.optimizers "
                                "(SGD, Momentum, Adam); pass one of those")
    base = type(opt)

    class Float32Step(base):  # type: ignore[misc, valid-type]
        _in_float32 = False

        def _float32(self, method, *args):
            self._in_float32 = True
            try:
                return method(self, *args)
            finally:
                self._in_float32 = False

        def _direction(self, k, p, s, g):
            d, s_new, cache = self._float32(base._direction, k, _down(p), _down(s), _down(g))
            return _up(d), _up(s_new), cache

        def _vjp(self, k, cache, bar_d, bar_s):
            bar_p, bar_prev, bar_g, hyper = self._float32(base._vjp, k, _down(cache), _down(bar_d), _down(bar_s))
            return _up(bar_p), _up(bar_prev), _up(bar_g), _up(hyper)

        if hasattr(base, "_bias"):
            def _bias(self, k):
                # Adam's bias corrections 1 - b^t: from the Python-float hyper-parameters in double, rounded
                # once, as torch.optim and optax do (from float32 b2 in float32, 1 - 0.999^2 is 2e-5 off:
                # torchopt's float32 bias correction, tests/torch/test_torch_inner_optim.py)
                b = base._bias(self, k)
                return tuple(_F32(x) for x in b) if self._in_float32 else b

    if "direction" not in parts:
        del Float32Step._direction
    if "vjp" not in parts:
        del Float32Step._vjp
    Float32Step.__name__ = Float32Step.__qualname__ = f"Float32Step{base.__name__}"
    out = copy.copy(opt)
    out.__class__ = Float32Step
    return out
