"""Differentiable inner-loop optimisers with hand-written, elementwise VJPs.

Contract: ``shared/CONVENTIONS.md``, section "Inner-loop optimisers". One inner
step is

    g_k = grad L_s(p_k),
    d_k, s_{k+1} = T_k(p_k, s_k, g_k[, L_s(p_k)]),
    p_{k+1} = p_k - a_k * d_k,

with ``T_k`` the optimiser's *direction transform* (``optax`` calls it a
gradient transformation), ``s_k`` its state and ``a_k`` the learning rate of
step ``k`` (one per parameter tensor and step: MAML++; or an array: Meta-SGD).
The unrolled loop and its adjoint live in :mod:`reference.inner_optim`; this
module gives each transform's forward map and its vector-Jacobian product

    (bar_d, bar_s_{k+1})  ->  (bar_p, bar_s_k, bar_g, bar_loss, bar_phi),

where ``phi`` are the meta-parameters of a learned optimiser
(:mod:`reference.learned_optimizers`; empty here). Every Jacobian of the
hand-designed transforms is diagonal, so its VJP is a few elementwise products.

Semantics follow ``torch.optim`` (``SGD``: momentum buffer set to the gradient
at the first step, dampening from the second; ``Adam``: ``eps`` added to
``sqrt(v_hat)``, bias correction on). Named variants: ``Momentum(init="zeros")``
(buffer starts at 0, so the first step is dampened too, as optax's ``trace``
and torchopt after its first call) and ``Adam(eps_root=...)`` (optax:
``sqrt(v_hat + eps_root) + eps``).

The first Adam step, ``v = 0`` (see :class:`Adam`): ``d = m_hat / (sqrt(v_hat)
+ eps)`` is differentiable wherever ``eps > 0`` even when ``v = 0``, but its
chain rule through ``sqrt`` multiplies ``1 / (2 sqrt(v)) = inf`` by ``m = 0``;
the reference uses the limit (zero) and raises :class:`NotDifferentiableError`
where the derivative is genuinely undefined (``eps = eps_root = 0`` and
``v = 0``: ``d = 0 / 0``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from reference.validation import check_finite_scalar
from reference.errors import InvalidInputError, MetaverifyError

__all__ = [
    "Adam",
    "Momentum",
    "NotDifferentiableError",
    "Optimizer",
    "SGD",
    "StepVJP",
]

Params = list[np.ndarray]


class NotDifferentiableError(MetaverifyError, ArithmeticError):
    """A meta-gradient was asked where it does not exist (infinite or 0/0); answering NaN would be a lie."""


class StepVJP(NamedTuple):
    """Cotangents of one transform's inputs (``None`` entries are zero)."""

    params: list[np.ndarray | None]   # bar_p from a direct dependence of d on p (weight decay, R&L)
    state: Any                        # bar_s_k, same structure as the state (None: zero)
    grads: list[np.ndarray | None]    # bar_g
    loss: Any                         # bar of the support loss value (0.0 unless the transform reads it)
    meta: list[np.ndarray]            # bar_phi, one per meta-parameter (empty for hand-designed)
    hyper: dict[str, Any] = {}        # d/d of the hand-designed hyper-parameters (momentum, b1, b2, eps, ...)


class Optimizer(ABC):
    """A direction transform ``T_k`` with its VJP.

    ``active[i]`` says whether tensor ``i`` is adapted (False: excluded from
    the inner loop, e.g. batch-norm parameters in MAML++ or ANIL's body); the
    transform returns ``None`` directions and states for inactive tensors.
    """

    name: str = "optimizer"
    #: The transform reads the support loss value ``L_s(p_k)`` (Ravi & Larochelle's meta-learner).
    uses_loss: bool = False

    @property
    def meta_params(self) -> list[np.ndarray]:
        """Meta-parameters ``phi`` of a learned optimiser (empty for hand-designed ones)."""
        return []

    @abstractmethod
    def init(self, params: Params, active: Sequence[bool]) -> Any:
        """The state ``s_0`` (zero moments; a learned optimiser's zero hidden state)."""

    @abstractmethod
    def direction(self, k: int, params: Params, state: Any, grads: Sequence[Any], loss: Any,
                  active: Sequence[bool]) -> tuple[list[Any], Any, Any]:
        """``(d_k, s_{k+1}, cache)``; ``cache`` holds what :meth:`vjp` needs."""

    @abstractmethod
    def vjp(self, k: int, cache: Any, bar_d: Sequence[Any], bar_state: Any) -> StepVJP:
        """Cotangents of ``(p_k, s_k, g_k, L_s(p_k), phi)`` given those of ``(d_k, s_{k+1})``.

        ``bar_state`` is ``None`` when ``s_{k+1}`` has no cotangent (last step,
        or a detached state).
        """


class _Elementwise(Optimizer):
    """An optimiser acting on each tensor separately, elementwise (state: one tuple per tensor)."""

    n_state: int = 0

    def init(self, params: Params, active: Sequence[bool]) -> list[tuple[np.ndarray, ...] | None]:
        return [tuple(np.zeros_like(p) for _ in range(self.n_state)) if a else None
                for p, a in zip(params, active)]

    def direction(self, k, params, state, grads, loss, active):
        ds, ss, caches = [], [], []
        for p, s, g, a in zip(params, state, grads, active):
            if not a:
                ds.append(None), ss.append(None), caches.append(None)
                continue
            d, s_new, c = self._direction(k, p, s, g)
            ds.append(d), ss.append(s_new), caches.append(c)
        return ds, ss, caches

    #: Names of the hyper-parameters whose meta-gradient :meth:`_vjp` returns.
    hyper_names: tuple[str, ...] = ()

    def vjp(self, k, cache, bar_d, bar_state):
        bp, bs, bg = [], [], []
        hyper = dict.fromkeys(self.hyper_names, 0.0)
        for i, c in enumerate(cache):
            if c is None:
                bp.append(None), bs.append(None), bg.append(None)
                continue
            p_bar, s_bar, g_bar, h_bar = self._vjp(k, c, bar_d[i], None if bar_state is None else bar_state[i])
            bp.append(p_bar), bs.append(s_bar), bg.append(g_bar)
            for name, value in h_bar.items():
                hyper[name] = hyper[name] + value
        return StepVJP(bp, bs, bg, 0.0, [], hyper)

    @abstractmethod
    def _direction(self, k: int, p: np.ndarray, s: tuple, g: np.ndarray) -> tuple[np.ndarray, tuple, Any]:
        """``(d, s_new, cache)`` of one active tensor; ``cache`` must not be ``None`` (marks inactive)."""

    @abstractmethod
    def _vjp(self, k: int, cache: Any, bar_d: np.ndarray, bar_s: tuple | None
             ) -> tuple[np.ndarray | None, tuple | None, np.ndarray, dict[str, Any]]:
        """``(bar_p, bar_s_k, bar_g, {hyper-parameter: cotangent})`` of one active tensor."""


def _check_weight_decay(weight_decay: Any) -> float:
    return check_finite_scalar("weight_decay", weight_decay, nonnegative=True,
                               hint="; pass the L2 coefficient of torch.optim (0 for none)")


def _check_unit(name: str, value: Any, hint: str) -> float:
    value = check_finite_scalar(name, value, hint=hint)
    if isinstance(value, complex) or not 0.0 <= value < 1.0:
        raise InvalidInputError(f"{name}={value!r} must be a real number in [0, 1){hint}")
    return float(value)


class SGD(_Elementwise):
    """Plain gradient descent: ``d = g + wd p`` (``torch.optim.SGD`` without momentum).

    With ``weight_decay = 0`` and a scalar rate this is MAML's inner step.
    """

    name = "sgd"

    def __init__(self, *, weight_decay: float = 0.0):
        self.weight_decay = _check_weight_decay(weight_decay)

    def __repr__(self) -> str:
        return f"SGD(weight_decay={self.weight_decay})"

    def _direction(self, k, p, s, g):
        d = g + self.weight_decay * p if self.weight_decay else g
        return d, (), ()

    def _vjp(self, k, cache, bar_d, bar_s):
        return (self.weight_decay * bar_d if self.weight_decay else None), (), bar_d, {}


class Momentum(_Elementwise):
    """Heavy-ball / Nesterov momentum with ``torch.optim.SGD`` semantics.

    With ``g' = g + wd p`` (L2 weight decay, torch's ``weight_decay``):

        b_1 = g'_0                                  (init="torch": torch's first step, no dampening)
        b_1 = (1 - tau) g'_0                        (init="zeros": b_0 = 0, the same rule at every step)
        b_{k+1} = mu b_k + (1 - tau) g'_k           (k >= 1)
        d_k = g'_k + mu b_{k+1}  (nesterov)   or   d_k = b_{k+1}

    (Polyak 1964; Sutskever et al. 2013 for the Nesterov form torch uses.)
    ``init`` only matters when ``dampening != 0``.

    VJP (``bar_b`` the cotangent of ``b_{k+1}``): ``bar_b += bar_d`` (or
    ``mu bar_d`` for Nesterov, which also sends ``bar_d`` to ``g'``);
    ``bar_g' += c bar_b`` with ``c`` the gradient's coefficient above;
    ``bar_b_k = mu bar_b`` (zero at torch's first step); ``bar_p = wd bar_g'``.
    """

    name = "momentum"
    n_state = 1
    hyper_names = ("momentum", "dampening")

    def __init__(self, momentum: float = 0.9, *, dampening: float = 0.0, nesterov: bool = False,
                 weight_decay: float = 0.0, init: str = "torch"):
        hint = "; torch.optim.SGD takes momentum in [0, 1), e.g. 0.9"
        self.momentum = _check_unit("momentum", momentum, hint)
        self.dampening = _check_unit("dampening", dampening, "; dampening is in [0, 1) (torch default 0)")
        self.nesterov = bool(nesterov)
        self.weight_decay = _check_weight_decay(weight_decay)
        if init not in ("torch", "zeros"):
            raise InvalidInputError(f"init={init!r} must be 'torch' (buffer = first gradient) or 'zeros' (buffer 0)")
        self.init_rule = init
        if self.nesterov and (self.momentum <= 0.0 or self.dampening != 0.0):
            raise InvalidInputError(
                f"nesterov=True needs momentum > 0 and dampening = 0 (got momentum={momentum!r}, "
                f"dampening={dampening!r}), as torch.optim.SGD requires"
            )

    def __repr__(self) -> str:
        return (f"Momentum(momentum={self.momentum}, dampening={self.dampening}, nesterov={self.nesterov}, "
                f"weight_decay={self.weight_decay}, init={self.init_rule!r})")

    def _coef(self, k: int) -> float:
        return 1.0 if (k == 0 and self.init_rule == "torch") else 1.0 - self.dampening

    def _direction(self, k, p, s, g):
        gp = g + self.weight_decay * p if self.weight_decay else g
        c = self._coef(k)
        if k == 0 and self.init_rule == "torch":
            b = gp
        else:
            b = self.momentum * s[0] + c * gp
        d = gp + self.momentum * b if self.nesterov else b
        return d, (b,), (s[0], b, gp)

    def _vjp(self, k, cache, bar_d, bar_s):
        mu = self.momentum
        bar_b = bar_d * mu if self.nesterov else bar_d
        if bar_s is not None:
            bar_b = bar_b + bar_s[0]
        bar_gp = self._coef(k) * bar_b
        if self.nesterov:
            bar_gp = bar_gp + bar_d
        first = k == 0 and self.init_rule == "torch"
        bar_prev = None if first else (mu * bar_b,)
        bar_p = self.weight_decay * bar_gp if self.weight_decay else None
        s_prev, b, gp = cache
        # d b / d mu = b_k, d b / d tau = -g' (not at torch's first step); Nesterov: d d / d mu = b too.
        h_mu = 0.0 if first else np.sum(bar_b * s_prev)
        if self.nesterov:
            h_mu = h_mu + np.sum(bar_d * b)
        h_tau = 0.0 if first else -np.sum(bar_b * gp)
        return bar_p, bar_prev, bar_gp, {"momentum": h_mu, "dampening": h_tau}


class Adam(_Elementwise):
    """Adam (Kingma & Ba 2015) with ``torch.optim.Adam`` semantics, or optax's ``eps_root`` variant.

    With ``g' = g + wd p`` (L2, torch's ``weight_decay``; with
    ``decoupled=True`` the gradient is not touched and ``wd p`` is added to
    the direction instead: ``torch.optim.AdamW``, Loshchilov & Hutter 2019),
    ``t = k + 1``:

        m_{k+1} = b1 m_k + (1 - b1) g',     v_{k+1} = b2 v_k + (1 - b2) g'^2,
        r = sqrt(v_{k+1} / (1 - b2^t) + eps_root),
        d_k = m_{k+1} / ((1 - b1^t) (r + eps))   [+ wd p_k if decoupled].

    ``eps_root = 0`` is torch's Adam (``eps`` outside the root); optax's
    ``adam(eps_root=...)`` puts ``eps_root`` inside. ``eps_placement="v"`` is
    Kingma & Ba's section-2 "eps-hat" form ``a sqrt(bc2) / bc1 * m / (sqrt(v) +
    eps)`` (TensorFlow/Keras, ``higher.optim.DifferentiableAdam``), i.e. ``eps``
    replaced by ``eps / sqrt(1 - b2^t)`` above: a different optimiser, ~31x
    larger ``eps`` at the first step with ``b2 = 0.999``.

    VJP (``bar_m, bar_v`` include the next step's state cotangents):

        bar_m += bar_d / (bc1 (r + eps)),
        bar_v += -bar_d m / (bc1 (r + eps)^2) * 1 / (2 r bc2),
        bar_g' = (1 - b1) bar_m + 2 (1 - b2) g' bar_v,   bar_m_k = b1 bar_m,   bar_v_k = b2 bar_v.

    ``v = 0`` (every gradient so far exactly zero in that coordinate, hence
    ``m = 0``): the ``bar_v`` term is ``0 * inf``. ``d`` is differentiable
    there (``m r`` is second order in the gradients and ``|m| <= C r``), the
    term's limit is 0 and it is set to 0 (autograd returns NaN here; higher
    masks the gradient; this is the exact value). With ``eps = eps_root = 0``
    and ``v = 0`` the direction itself is ``0/0`` and
    :class:`NotDifferentiableError` is raised.
    """

    name = "adam"
    n_state = 2
    hyper_names = ("b1", "b2", "eps", "eps_root")

    def __init__(self, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, *, eps_root: float = 0.0,
                 weight_decay: float = 0.0, decoupled: bool = False, eps_placement: str = "v_hat"):
        self.b1 = _check_unit("b1", b1, "; torch.optim.Adam's betas[0], e.g. 0.9")
        self.b2 = _check_unit("b2", b2, "; torch.optim.Adam's betas[1], e.g. 0.999")
        self.eps = float(check_finite_scalar("eps", eps, nonnegative=True, hint="; e.g. eps=1e-8 (torch default)"))
        self.eps_root = float(check_finite_scalar("eps_root", eps_root, nonnegative=True,
                                                  hint="; optax's eps inside the square root, 0 for torch"))
        self.weight_decay = _check_weight_decay(weight_decay)
        self.decoupled = bool(decoupled)
        if eps_placement not in ("v_hat", "v"):
            raise InvalidInputError(
                f"eps_placement={eps_placement!r} must be 'v_hat' (torch.optim.Adam, optax: eps added to "
                "sqrt(v_hat)) or 'v' (Kingma & Ba's eps-hat, TensorFlow, higher: eps added to sqrt(v))")
        self.eps_placement = eps_placement

    def __repr__(self) -> str:
        return (f"Adam(b1={self.b1}, b2={self.b2}, eps={self.eps}, eps_root={self.eps_root}, "
                f"weight_decay={self.weight_decay}, decoupled={self.decoupled}, eps_placement={self.eps_placement!r})")

    def eps_at(self, k: int) -> float:
        """The ``eps`` added to ``sqrt(v_hat)`` at step ``k``: ``eps``, or ``eps / sqrt(1 - b2^t)`` for ``'v'``."""
        return self.eps if self.eps_placement == "v_hat" else self.eps / np.sqrt(self._bias(k)[1])

    def _bias(self, k: int) -> tuple[float, float]:
        t = k + 1
        return 1.0 - self.b1**t, 1.0 - self.b2**t

    def _direction(self, k, p, s, g):
        wd = self.weight_decay
        gp = g + wd * p if (wd and not self.decoupled) else g
        m = self.b1 * s[0] + (1.0 - self.b1) * gp
        v = self.b2 * s[1] + (1.0 - self.b2) * (gp * gp)
        bc1, bc2 = self._bias(k)
        if self.eps_root == 0.0:
            r = np.sqrt(v) / np.sqrt(bc2)  # torch's order: sqrt(v) / sqrt(bc2)
        else:
            r = np.sqrt(v / bc2 + self.eps_root)
        denom = r + self.eps_at(k)
        if self.eps == 0.0 and np.any(denom == 0):
            idx = tuple(int(i) for i in np.argwhere(denom == 0)[0])
            raise NotDifferentiableError(
                f"Adam step {k}: v_hat + eps_root = 0 at index {idx} with eps=0: the direction m_hat / "
                "(sqrt(v_hat) + eps) is 0/0 and its derivative is undefined; use eps > 0 or eps_root > 0"
            )
        d = m / (bc1 * denom)
        if wd and self.decoupled:
            d = d + wd * p
        return d, (m, v), (gp, m, r, denom, s[0], s[1], v)

    def _vjp(self, k, cache, bar_d, bar_s):
        gp, m, r, denom, m_prev, v_prev, v = cache
        bc1, bc2 = self._bias(k)
        bar_m = bar_d / (bc1 * denom)
        zero = r == 0
        if np.any(zero):
            # v = 0: every gradient so far was exactly 0 there, so m = 0 too (checked: an
            # underflowed g'^2 with m != 0 has no exact answer in float64).
            if np.any(m[zero] != 0):
                idx = tuple(int(i) for i in np.argwhere(zero & (m != 0))[0])
                raise NotDifferentiableError(
                    f"Adam step {k}: v = 0 but m != 0 at index {idx} (g'^2 underflowed): d(sqrt v)/dv is "
                    "infinite there; rescale the loss or use eps_root > 0"
                )
            safe_r = np.where(zero, 1.0, r)
            bar_v = np.where(zero, 0.0, -bar_d * m / (bc1 * denom * denom) / (2.0 * safe_r * bc2))
        else:
            bar_v = -bar_d * m / (bc1 * denom * denom) / (2.0 * r * bc2)
        if bar_s is not None:
            bar_m = bar_m + bar_s[0]
            bar_v = bar_v + bar_s[1]
        bar_gp = (1.0 - self.b1) * bar_m + 2.0 * (1.0 - self.b2) * gp * bar_v
        wd = self.weight_decay
        if not wd:
            bar_p = None
        elif self.decoupled:
            bar_p = wd * bar_d
        else:
            bar_p = wd * bar_gp
        return bar_p, (self.b1 * bar_m, self.b2 * bar_v), bar_gp, self._hyper_vjp(k, cache, bar_d, bar_m, bar_v)

    def _hyper_vjp(self, k: int, cache: tuple, bar_d: np.ndarray, bar_m: np.ndarray, bar_v: np.ndarray
                   ) -> dict[str, Any]:
        """Cotangents of ``b1, b2, eps, eps_root`` at step ``k`` (``bar_m, bar_v``: totals of ``m_{k+1}, v_{k+1}``).

        ``q = m / (bc1 (r + e))`` with ``e = eps`` (or ``eps / sqrt(bc2)``):
        ``dq/dbc1 = -q / bc1``, ``dq/dr = dq/de = -q / (r + e)``,
        ``dr/dbc2 = -v / (2 r bc2^2)`` (``= -r / (2 bc2)`` when ``eps_root = 0``,
        finite at ``v = 0``), ``dr/deps_root = 1 / (2 r)``;
        ``dbc_i / db_i = -t b_i^(t-1)``; ``dm/db1 = m_k - g'``, ``dv/db2 = v_k - g'^2``.
        """
        gp, m, r, denom, m_prev, v_prev, v = cache
        bc1, bc2 = self._bias(k)
        t = k + 1
        q = m / (bc1 * denom)
        dq_dden = -q / denom
        if self.eps_root == 0.0:
            dr_dbc2 = -r / (2.0 * bc2)
        else:
            dr_dbc2 = -v / (2.0 * r * bc2 * bc2)
        de_dbc2 = 0.0 if self.eps_placement == "v_hat" else -self.eps_at(k) / (2.0 * bc2)
        de_deps = 1.0 if self.eps_placement == "v_hat" else 1.0 / np.sqrt(bc2)
        h_b1 = np.sum(bar_m * (m_prev - gp)) + np.sum(bar_d * (-q / bc1)) * (-t * self.b1 ** (t - 1))
        h_b2 = (np.sum(bar_v * (v_prev - gp * gp))
                + np.sum(bar_d * dq_dden * (dr_dbc2 + de_dbc2)) * (-t * self.b2 ** (t - 1)))
        h_eps = np.sum(bar_d * dq_dden) * de_deps
        # At r = 0 (v = 0, eps_root = 0) q = 0 for every eps_root: that coordinate contributes 0.
        safe = np.where(r == 0, 1.0, r)
        h_root = np.sum(np.where(r == 0, 0.0, bar_d * dq_dden / (2.0 * safe)))
        return {"b1": h_b1, "b2": h_b2, "eps": h_eps, "eps_root": h_root}
