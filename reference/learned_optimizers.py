"""Learned optimisers as recurrent inner loops, with hand-written BPTT VJPs.

Two direction transforms for :mod:`reference.inner_optim` whose meta-parameters
``phi`` are learned; the loop's adjoint then gives the exact BPTT
meta-gradient ``dL/dphi`` through ``K`` unrolled steps (optimisee
Hessian-vector products included), and its switches give the usual
approximations: ``first_order`` is Andrychowicz et al.'s "we assume
d nabla_t / d phi = 0" (and Ravi & Larochelle's dashed edges),
``truncate=T`` truncated BPTT, ``detach_state`` a detached LSTM state.

* :class:`LSTMOptimizer` -- Andrychowicz, Denil, Gomez, Hoffman, Pfau, Schaul,
  Shillingford & de Freitas, "Learning to learn by gradient descent by
  gradient descent", NeurIPS 2016: a coordinatewise LSTM (the same ``phi`` for
  every coordinate, one hidden state per coordinate) reads ``x = s_in g`` and
  proposes ``d = s_out (W_out h + b_out)``; with the loop's
  ``p_{k+1} = p_k - a_k d_k`` and ``a_k = 1`` this is their
  ``theta_{t+1} = theta_t + g_t`` up to the sign of ``W_out``. The meta-loss
  ``sum_t w_t f(theta_t)`` is the loop's multi-step loss. (Their log/sign input
  preprocessing is not smooth and is left out; ``s_in`` scales instead.)
* :class:`MetaLearnerLSTM` -- Ravi & Larochelle, "Optimization as a model for
  few-shot learning", ICLR 2017: the parameters are the cell state,

      i_k = sigma(W_I . [g, L, p, i_{k-1}] + b_I),   f_k = sigma(W_F . [g, L, p, f_{k-1}] + b_F),
      p_{k+1} = f_k * p_k - i_k * g_k,

  coordinatewise (``L = L_s(p_k)`` is shared by all coordinates), i.e.
  ``d_k = (1 - f_k) p_k + i_k g_k`` with ``a_k = 1``. The learned initial
  cell state is ``theta`` (the loop's parameter gradient).

LSTM cell (``torch.nn.LSTMCell`` gate order ``i, f, g, o``, one bias):
``z = x W_ih^T + h W_hh^T + b``; ``c' = f c + i tanh(z_g)``; ``h' = o tanh(c')``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from reference.validation import as_float_array, check_finite_scalar, check_positive_int
from reference.errors import InvalidInputError
from reference.models import _sigmoid
from reference.optimizers import Optimizer, StepVJP

__all__ = ["LSTMOptimizer", "MetaLearnerLSTM"]


def _flat_active(xs: Sequence[Any], active: Sequence[bool]) -> np.ndarray:
    return np.concatenate([np.ravel(x) for x, a in zip(xs, active) if a])


def _split_active(flat: np.ndarray, like: Sequence[Any], active: Sequence[bool]) -> list[Any]:
    out, i = [], 0
    for x, a in zip(like, active):
        if not a:
            out.append(None)
            continue
        n = np.size(x)
        out.append(flat[i:i + n].reshape(np.shape(x)))
        i += n
    return out


def _check_meta(name: str, values: Sequence[Any], shapes: Sequence[tuple[int, ...]]) -> list[np.ndarray]:
    if isinstance(values, np.ndarray) or not isinstance(values, Sequence) or len(values) != len(shapes):
        raise InvalidInputError(f"{name} must be a list of {len(shapes)} arrays shaped {list(shapes)}; "
                                f"build one with {name.split('.')[0]}.random_params(seed=0)")
    out = []
    for j, (v, s) in enumerate(zip(values, shapes)):
        arr = as_float_array(f"{name}[{j}]", v)
        if arr.shape != tuple(s):
            raise InvalidInputError(f"{name}[{j}] has shape {arr.shape}, expected {tuple(s)}")
        out.append(arr)
    return out


class LSTMOptimizer(Optimizer):
    """Coordinatewise LSTM optimiser (Andrychowicz et al. 2016), ``layers`` stacked cells of width ``hidden``.

    ``phi = [W_ih^1 (4H, 1), W_hh^1 (4H, H), b^1 (4H,), ..., W_ih^l (4H, H), W_hh^l, b^l, W_out (1, H), b_out (1,)]``.
    State per coordinate: ``(h^l, c^l)`` for each layer, zero at ``k = 0``.

    BPTT VJP of one step (per layer, top down; ``bar_h'``, ``bar_c'`` include
    the next step's state cotangents):

        bar_o = bar_h' tanh(c'),  bar_c = bar_c' + bar_h' o (1 - tanh(c')^2),
        bar_z = [bar_c gg i(1-i), bar_c c f(1-f), bar_c i (1-gg^2), bar_o o(1-o)],
        bar_W_ih += bar_z^T x,  bar_W_hh += bar_z^T h,  bar_b += sum bar_z,
        bar_x = bar_z W_ih,  bar_h = bar_z W_hh,  bar_c_prev = bar_c f.
    """

    name = "lstm"

    def __init__(self, meta_params: Sequence[Any], *, hidden: int = 8, layers: int = 1,
                 input_scale: float = 1.0, output_scale: float = 0.1):
        self.hidden = check_positive_int("hidden", hidden)
        self.layers = check_positive_int("layers", layers)
        self.input_scale = check_finite_scalar("input_scale", input_scale, hint="; scales the gradient input")
        self.output_scale = check_finite_scalar("output_scale", output_scale, hint="; Andrychowicz use 0.1")
        self._phi = _check_meta("LSTMOptimizer.meta_params", meta_params, self.shapes(self.hidden, self.layers))

    @staticmethod
    def shapes(hidden: int, layers: int = 1) -> list[tuple[int, ...]]:
        """Shapes of ``phi`` for ``hidden`` units and ``layers`` cells."""
        out: list[tuple[int, ...]] = []
        for l in range(layers):
            out += [(4 * hidden, 1 if l == 0 else hidden), (4 * hidden, hidden), (4 * hidden,)]
        return out + [(1, hidden), (1,)]

    @staticmethod
    def random_params(hidden: int = 8, layers: int = 1, *, seed: int = 0, scale: float = 0.5) -> list[np.ndarray]:
        """Seeded ``phi`` with entries ``N(0, scale^2 / fan_in)`` (forget-gate bias +1, a common choice)."""
        rng = np.random.default_rng(seed)
        out = []
        for s in LSTMOptimizer.shapes(hidden, layers):
            fan = s[1] if len(s) == 2 else hidden
            arr = rng.normal(scale=scale / np.sqrt(fan), size=s)
            if len(s) == 1 and s[0] == 4 * hidden:
                arr[hidden:2 * hidden] += 1.0
            out.append(arr)
        return out

    def __repr__(self) -> str:
        return (f"LSTMOptimizer(hidden={self.hidden}, layers={self.layers}, input_scale={self.input_scale}, "
                f"output_scale={self.output_scale})")

    @property
    def meta_params(self) -> list[np.ndarray]:
        return self._phi

    def _layer(self, l: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self._phi[3 * l], self._phi[3 * l + 1], self._phi[3 * l + 2]

    def init(self, params: Sequence[Any], active: Sequence[bool]) -> list[np.ndarray]:
        n = sum(np.size(p) for p, a in zip(params, active) if a)
        dtype = np.result_type(*[p for p, a in zip(params, active) if a], *self._phi)
        return [np.zeros((n, self.hidden), dtype=dtype) for _ in range(2 * self.layers)]

    def direction(self, k, params, state, grads, loss, active):
        H = self.hidden
        x = self.input_scale * _flat_active(grads, active)[:, None]
        caches, new_state = [], []
        inp = x
        for l in range(self.layers):
            W_ih, W_hh, b = self._layer(l)
            h, c = state[2 * l], state[2 * l + 1]
            z = inp @ W_ih.T + h @ W_hh.T + b
            i, f, o = _sigmoid(z[:, :H]), _sigmoid(z[:, H:2 * H]), _sigmoid(z[:, 3 * H:])
            gg = np.tanh(z[:, 2 * H:3 * H])
            c_new = f * c + i * gg
            tc = np.tanh(c_new)
            h_new = o * tc
            caches.append((inp, h, c, i, f, gg, o, tc))
            new_state += [h_new, c_new]
            inp = h_new
        W_out, b_out = self._phi[-2], self._phi[-1]
        d = self.output_scale * (inp @ W_out.T + b_out)[:, 0]
        return _split_active(d, grads, active), new_state, (caches, inp, grads, active)

    def vjp(self, k, cache, bar_d, bar_state):
        caches, h_top, like, active = cache
        H = self.hidden
        bd = self.output_scale * _flat_active(bar_d, active)[:, None]
        W_out = self._phi[-2]
        meta: list[np.ndarray] = [None] * len(self._phi)  # type: ignore[list-item]
        meta[-2] = bd.T @ h_top
        meta[-1] = np.sum(bd, axis=0)
        bar_h = bd @ W_out
        bar_prev_state: list[np.ndarray] = [None] * (2 * self.layers)  # type: ignore[list-item]
        for l in reversed(range(self.layers)):
            inp, h, c, i, f, gg, o, tc = caches[l]
            W_ih, W_hh, _ = self._layer(l)
            if bar_state is not None:
                bar_h = bar_h + bar_state[2 * l]
            bar_o = bar_h * tc
            bar_c = bar_h * o * (1.0 - tc * tc)
            if bar_state is not None:
                bar_c = bar_c + bar_state[2 * l + 1]
            bar_z = np.concatenate([bar_c * gg * i * (1.0 - i), bar_c * c * f * (1.0 - f),
                                    bar_c * i * (1.0 - gg * gg), bar_o * o * (1.0 - o)], axis=1)
            meta[3 * l] = bar_z.T @ inp
            meta[3 * l + 1] = bar_z.T @ h
            meta[3 * l + 2] = np.sum(bar_z, axis=0)
            bar_prev_state[2 * l] = bar_z @ W_hh
            bar_prev_state[2 * l + 1] = bar_c * f
            bar_h = bar_z @ W_ih  # cotangent of this layer's input (the layer below's h', or x)
        bar_g = _split_active(self.input_scale * bar_h[:, 0], like, active)
        return StepVJP([None] * len(like), bar_prev_state, bar_g, 0.0, meta)


class MetaLearnerLSTM(Optimizer):
    """Ravi & Larochelle's (2017) meta-learner LSTM update (module notes), coordinatewise.

    ``phi = [W_I (4,), b_I (), W_F (4,), b_F ()]`` acting on ``[g, L, p, prev]``
    scaled by ``input_scales`` (4 numbers). State per coordinate:
    ``(i_{k-1}, f_{k-1})``, zero at ``k = 0``.

    VJP: with ``d = (1 - f) p + i g``, ``bar_i = bar_d g + bar_i_next``,
    ``bar_f = -bar_d p + bar_f_next``, ``bar_zI = bar_i i (1 - i)`` (likewise
    F): ``bar_W_I = sum bar_zI u``, ``bar_g = bar_d i + W_I[0] s_0 bar_zI``,
    ``bar_L = sum W_I[1] s_1 bar_zI``, ``bar_p = bar_d (1 - f) + W_I[2] s_2 bar_zI``,
    ``bar_i_prev = W_I[3] s_3 bar_zI`` (and the F terms).
    """

    name = "meta_lstm"
    uses_loss = True

    SHAPES: tuple[tuple[int, ...], ...] = ((4,), (), (4,), ())

    def __init__(self, meta_params: Sequence[Any], *, input_scales: Sequence[float] = (1.0, 1.0, 1.0, 1.0)):
        self._phi = _check_meta("MetaLearnerLSTM.meta_params", meta_params, self.SHAPES)
        scales = np.asarray(input_scales, dtype=float)
        if scales.shape != (4,) or not np.all(np.isfinite(scales)):
            raise InvalidInputError(f"input_scales={input_scales!r} must be 4 finite numbers (for g, L, p, prev gate)")
        self.input_scales = scales

    @staticmethod
    def random_params(*, seed: int = 0) -> list[np.ndarray]:
        """Seeded ``phi``: small weights, ``b_I = -3`` (small steps), ``b_F = 3`` (keep the parameters)."""
        rng = np.random.default_rng(seed)
        return [rng.normal(scale=0.3, size=4), np.array(-3.0), rng.normal(scale=0.3, size=4), np.array(3.0)]

    def __repr__(self) -> str:
        return f"MetaLearnerLSTM(input_scales={self.input_scales.tolist()})"

    @property
    def meta_params(self) -> list[np.ndarray]:
        return self._phi

    def init(self, params, active):
        n = sum(np.size(p) for p, a in zip(params, active) if a)
        dtype = np.result_type(*[p for p, a in zip(params, active) if a], *self._phi)
        return [np.zeros(n, dtype=dtype), np.zeros(n, dtype=dtype)]

    def direction(self, k, params, state, grads, loss, active):
        s = self.input_scales
        g = _flat_active(grads, active)
        p = _flat_active(params, active)
        ell = loss * np.ones_like(g)
        i_prev, f_prev = state
        W_I, b_I, W_F, b_F = self._phi
        u_i = [s[0] * g, s[1] * ell, s[2] * p, s[3] * i_prev]
        u_f = [s[0] * g, s[1] * ell, s[2] * p, s[3] * f_prev]
        i = _sigmoid(sum(w * u for w, u in zip(W_I, u_i)) + b_I)
        f = _sigmoid(sum(w * u for w, u in zip(W_F, u_f)) + b_F)
        d = (1.0 - f) * p + i * g
        return _split_active(d, grads, active), [i, f], (g, p, i, f, u_i, u_f, grads, params, active)

    def vjp(self, k, cache, bar_d, bar_state):
        g, p, i, f, u_i, u_f, like_g, like_p, active = cache
        s = self.input_scales
        W_I, _, W_F, _ = self._phi
        bd = _flat_active(bar_d, active)
        bar_i = bd * g
        bar_f = -bd * p
        if bar_state is not None:
            bar_i = bar_i + bar_state[0]
            bar_f = bar_f + bar_state[1]
        zi = bar_i * i * (1.0 - i)
        zf = bar_f * f * (1.0 - f)
        meta = [np.array([np.sum(zi * u) for u in u_i]), np.sum(zi), np.array([np.sum(zf * u) for u in u_f]),
                np.sum(zf)]
        bar_g = bd * i + s[0] * (W_I[0] * zi + W_F[0] * zf)
        bar_loss = s[1] * (W_I[1] * np.sum(zi) + W_F[1] * np.sum(zf))
        bar_p = bd * (1.0 - f) + s[2] * (W_I[2] * zi + W_F[2] * zf)
        bar_prev = [s[3] * W_I[3] * zi, s[3] * W_F[3] * zf]
        return StepVJP(_split_active(bar_p, like_p, active), bar_prev, _split_active(bar_g, like_g, active),
                       bar_loss, meta)
