"""iMAML's linear solves in the coordinates of the support Hessian's range (issue 18, ninth pass).

Every conjugate-gradient solve of :mod:`reference.imaml` is with ``alpha I + beta H_s(phi)`` at one point
``phi`` of an MLP: ``I + H_s/lam`` for the meta-gradient, ``H_s + lam I`` for the inner problem's Newton
steps. For a layer ``l`` with weight ``W_l`` (``out x in``), input rows ``h_l`` and backpropagated rows
``g_l`` (the ``n`` support rows, Pearlmutter's R-operator in :mod:`reference.models`):

* the weight block of ``H_s v`` is ``R{g_l}^T h_l + g_l^T R{h_l}``: it lies in
  ``S_l = {A^T h_l + g_l^T B}``, the matrices ``M`` with ``(I - P_g) M (I - P_h) = 0`` (``P_h``, ``P_g`` the
  orthogonal projectors on the row spaces of ``h_l`` and ``g_l``);
* ``H_s v`` depends on ``v``'s block ``U_l`` only through ``h_l U_l^T`` and ``g_l U_l``, which vanish on the
  complement ``(I - P_g) M (I - P_h)``.

So ``S = (+)_l S_l (+) (the other blocks)`` is invariant under ``alpha I + beta H_s``, and so is
``S (+) span(b_perp)`` for a right-hand side ``b = b_S + b_perp`` (``H_s b_perp = 0``). With orthonormal
rows ``Q_h`` (``k_h x in``) and ``Q_g`` (``k_g x out``), ``M in S_l`` is ``P_g M + (I - P_g) M P_h``:

    ``M = Q_g^T G + R Q_h``,   ``G = Q_g M`` (``k_g x in``),   ``R = (I - P_g) M Q_h^T`` (``out x k_h``),

two orthogonal terms, so ``||M||_F^2 = ||G||^2 + ||R||^2``: the coordinates ``(G, R)`` per factored
layer, the other blocks as they are and one number ``t`` along ``b_perp / ||b_perp||`` embed that
invariant subspace *isometrically*. Conjugate gradient run on the coordinates
(:func:`reference.linalg.conjugate_gradient`, unchanged) is therefore, in exact arithmetic, the same
iteration as on the full vectors: the same iterates, residual norms, stopping iteration and Lanczos
condition estimate; so is Steihaug's trust-region CG (:func:`trust_region`), whose norms and inner
products are those of the full vectors. What changes is the cost: a coordinate vector has
``k_g in + out k_h`` (``<= n (in + out)``) entries per layer instead of ``out in``, and a product
needs the point's own weights (``R{h} W^T`` and ``R{g} W``) but no weight-sized direction or result
(at 1-256-256-1, 10 support rows: 6,146 coordinates against 66,561 parameters).

Scope: a real MLP point (complex step keeps the full vectors), layers with at least :data:`MIN_BLOCK`
weights whose coordinates are at most :data:`MAX_FRACTION` of them (:func:`layers`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from reference.linalg import EPS

__all__ = ["MAX_FRACTION", "MIN_BLOCK", "Subspace", "layers", "trust_region"]

#: Weight blocks below this many entries stay dense (the coordinates' extra small products cost more
#: than they save; the flat product's own threshold, ``reference.imaml.FLAT_HVP_MIN_BLOCK``).
MIN_BLOCK = 2**14
#: A layer is factored only if its coordinates, at most ``n (in + out)``, are this fraction of ``out in``.
MAX_FRACTION = 0.25


def layers(model: Any, rows: int) -> tuple[int, ...]:
    """The MLP layers whose weight blocks :class:`Subspace` factors for ``rows`` support rows (maybe none)."""
    found = []
    for l in range(model.n_layers):
        out, inp = model.sizes[l + 1], model.sizes[l]
        if out * inp >= MIN_BLOCK and rows * (out + inp) <= MAX_FRACTION * out * inp:
            found.append(l)
    return tuple(found)


def _row_basis(a: np.ndarray) -> np.ndarray:
    """Orthonormal rows spanning the row space of ``a`` (SVD; directions below ``max(shape) eps s_max`` dropped:
    a dropped direction changes the products by round-off only)."""
    _, s, vt = np.linalg.svd(a, full_matrices=False)
    return vt[: int(np.count_nonzero(s > max(a.shape) * EPS * s[0]))]  # a zero matrix: s[0] = 0, no row


class Subspace:
    """The coordinates of ``S (+) span(b_perp)`` at one MLP point (module notes).

    Args:
        model: the :class:`reference.models.MLP`.
        point: ``model._hvp_point(params, x, y)`` at a real point.
        factored: the layers to factor (:func:`layers`).
    """

    def __init__(self, model: Any, point: tuple, factored: Sequence[int]):
        self.model, self.point = model, point
        params, hs, _, _, gs, _ = point
        self.Ws, _ = model._split(params)
        self.factored = tuple(factored)
        self.nk = 2 if model.bias else 1
        self.bounds = model._bounds()
        # Per factored layer: (Qh, Qg, Th = h Qh^T, Tg = g Qg^T) and the slices of G and R in the coordinates.
        self.bases: dict[int, tuple[np.ndarray, ...]] = {}
        self.slices: dict[int, tuple[slice, slice]] = {}
        at = 0
        for l in self.factored:
            qh, qg = _row_basis(hs[l]), _row_basis(gs[l])
            self.bases[l] = (qh, qg, hs[l] @ qh.T, gs[l] @ qg.T)
            out, inp = model.shapes[self.nk * l]
            n_g, n_r = qg.shape[0] * inp, out * qh.shape[0]
            self.slices[l] = (slice(at, at + n_g), slice(at + n_g, at + n_g + n_r))
            at += n_g + n_r
        # The other parameter blocks, dense: parameter index -> (slice in the flat vector, slice in the coordinates).
        self.dense: dict[int, tuple[slice, slice]] = {}
        weights = {self.nk * l for l in self.factored}
        for i in range(len(model.shapes)):
            if i not in weights:
                n = self.bounds[i + 1] - self.bounds[i]
                self.dense[i] = (slice(self.bounds[i], self.bounds[i + 1]), slice(at, at + n))
                at += n
        self.size = at + 1  # the last coordinate: t along b_perp / ||b_perp||

    def _gr(self, y: np.ndarray, l: int) -> tuple[np.ndarray, np.ndarray]:
        qh, qg = self.bases[l][:2]
        out, inp = self.model.shapes[self.nk * l]
        sg, sr = self.slices[l]
        return y[sg].reshape(qg.shape[0], inp), y[sr].reshape(out, qh.shape[0])

    def _block(self, v: np.ndarray, i: int) -> np.ndarray:
        return v[self.bounds[i]:self.bounds[i + 1]].reshape(self.model.shapes[i])

    def project(self, b: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Coordinates of the flat vector ``b`` and the unit direction ``e = b_perp / ||b_perp||`` (None if 0)."""
        y = np.empty(self.size)
        perp = []
        for l in self.factored:
            qh, qg = self.bases[l][:2]
            m = self._block(b, self.nk * l)
            sg, sr = self.slices[l]
            g = qg @ m
            left = m - qg.T @ g  # (I - P_g) M
            r = left @ qh.T
            y[sg], y[sr] = g.ravel(), r.ravel()
            perp.append((self.nk * l, left - r @ qh))  # (I - P_g) M (I - P_h)
        for src, dst in self.dense.values():
            y[dst] = b[src]
        t = float(np.sqrt(sum(float(np.vdot(p, p)) for _, p in perp)))
        y[-1] = t
        if not t > 0:
            return y, None
        e = np.zeros_like(b)
        for i, p in perp:
            self._block(e, i)[...] = p / t
        return y, e

    def expand(self, y: np.ndarray, e: np.ndarray | None) -> np.ndarray:
        """The flat vector of coordinates ``y`` (``e`` from :meth:`project` of the same right-hand side)."""
        x = np.zeros(self.bounds[-1]) if e is None else y[-1] * e
        for l in self.factored:
            qh, qg = self.bases[l][:2]
            g, r = self._gr(y, l)
            self._block(x, self.nk * l)[...] += qg.T @ g + r @ qh
        for src, dst in self.dense.values():
            x[src] = y[dst]
        return x

    def hvp(self, y: np.ndarray) -> np.ndarray:
        """Coordinates of ``H_s v`` for the coordinates ``y`` of ``v`` (the R-operator of
        :meth:`reference.models.MLP._hvp_at`, with the factored blocks' products through their bases)."""
        model = self.model
        _, hs, derivs, loss, gs, ghs = self.point
        n_layers = model.n_layers
        views: list[Any] = [None] * len(model.shapes)
        for i, (_, dst) in self.dense.items():
            views[i] = y[dst].reshape(model.shapes[i])
        Us, cs = model._split(views)
        grs = {l: self._gr(y, l) for l in self.factored}
        # R-forward: R{z_l} = h_l U_l^T + c_l + R{h_l} W_l^T, with h U^T = (h G^T) Qg + Th R^T.
        r_h = None
        r_hs: list[Any] = [None]
        for l in range(n_layers):
            if l in grs:
                qh, qg, th, _ = self.bases[l]
                g_l, r_l = grs[l]
                r_z = (hs[l] @ g_l.T) @ qg + th @ r_l.T
            else:
                r_z = hs[l] @ Us[l].T
            if cs[l] is not None:
                r_z = r_z + cs[l]
            if r_h is not None:
                r_z = r_z + r_h @ self.Ws[l].T
            if l < n_layers - 1:
                r_h = derivs[l][1] * r_z
                r_hs.append((r_h, r_z))
        r_g = loss.hvp(r_z)
        out = np.empty(self.size)
        out[-1] = 0.0  # H_s b_perp = 0
        for l in reversed(range(n_layers)):
            g = gs[l]
            i = self.nk * l
            if l in grs:
                # The block M = R{g}^T h + g^T R{h} in coordinates: G = Qg M = (R{g} Qg^T)^T h + Tg^T R{h};
                # R = (I - P_g) M Qh^T = (I - P_g) R{g}^T Th, the g^T R{h} term being killed by I - P_g.
                qh, qg, th, tg = self.bases[l]
                rg_q = r_g @ qg.T
                g_new = rg_q.T @ hs[l]
                if l > 0:
                    g_new = g_new + tg.T @ r_hs[l][0]
                sg, sr = self.slices[l]
                out[sg] = g_new.ravel()
                out[sr] = (r_g.T @ th - qg.T @ (rg_q.T @ th)).ravel()
            else:
                block = r_g.T @ hs[l]
                if l > 0:
                    block = block + g.T @ r_hs[l][0]
                out[self.dense[i][1]] = block.ravel()
            if model.bias:
                out[self.dense[i + 1][1]] = np.add.reduce(r_g, axis=0)
            if l > 0:
                if l in grs:
                    # g U = Tg G + (g R) Qh, and g R = 0: R's columns are orthogonal to g's rows (Qg R = 0).
                    g_u = self.bases[l][3] @ grs[l][0]
                else:
                    g_u = g @ Us[l]
                r_gh = r_g @ self.Ws[l] + g_u
                r_g = r_gh * derivs[l - 1][1] + ghs[l] * derivs[l - 1][2] * r_hs[l][1]
        return out


# The trust-region loop of scipy.optimize.minimize's trust-region methods (Nocedal & Wright 2006, Alg. 4.1),
# with its defaults: first radius, largest radius, acceptance threshold.
INITIAL_RADIUS = 1.0
MAX_RADIUS = 1000.0
ETA = 0.15


def _steihaug(hvp: Callable[[np.ndarray], np.ndarray], g: np.ndarray, radius: float
              ) -> tuple[np.ndarray, np.ndarray, bool]:
    """Steihaug-Toint truncated CG for ``min_p g.p + p.B p / 2, ||p|| <= radius`` (Nocedal & Wright 2006,
    Alg. 7.2; scipy's ``trust-ncg`` subproblem): ``(p, B p, hits_boundary)``.

    CG from ``p = 0`` until the residual is below ``min(0.5, sqrt(||g||)) ||g||`` (superlinear
    convergence of the outer iteration), stopping on the boundary along a direction of negative
    curvature or one that leaves the region (at most ``2 len(g) + 100`` products, the reference's CG cap).
    """
    g_norm = float(np.linalg.norm(g))
    tol = min(0.5, np.sqrt(g_norm)) * g_norm
    p, bp = np.zeros_like(g), np.zeros_like(g)
    if not g_norm > 0:  # g = 0 (or NaN): no step
        return p, bp, False
    r, d = g.copy(), -g
    rr = float(r @ r)
    for _ in range(2 * g.size + 100):
        bd = hvp(d)
        dbd = float(d @ bd)
        if dbd <= 0:
            # Negative curvature: of the two points where p + tau d meets the boundary, the lower model value.
            ta, tb = _boundary(p, d, radius)
            pa, pb, bpa, bpb = p + ta * d, p + tb * d, bp + ta * bd, bp + tb * bd
            if g @ pa + 0.5 * (pa @ bpa) < g @ pb + 0.5 * (pb @ bpb):
                return pa, bpa, True
            return pb, bpb, True
        alpha = rr / dbd
        p_next = p + alpha * d
        if np.linalg.norm(p_next) >= radius:
            tb = _boundary(p, d, radius)[1]
            return p + tb * d, bp + tb * bd, True
        p, bp = p_next, bp + alpha * bd
        r = r + alpha * bd
        rr_next = float(r @ r)
        if np.sqrt(rr_next) < tol:
            return p, bp, False
        d = -r + (rr_next / rr) * d
        rr = rr_next
    return p, bp, False


def _boundary(p: np.ndarray, d: np.ndarray, radius: float) -> tuple[float, float]:
    """``ta <= tb`` with ``||p + tau d|| = radius`` (``||p|| < radius``: one root of each sign), the
    roots of ``|d|^2 tau^2 + 2 p.d tau + |p|^2 - radius^2`` computed without cancellation."""
    a, b, c = float(d @ d), 2.0 * float(p @ d), float(p @ p) - radius**2
    q = -0.5 * (b + np.copysign(np.sqrt(b * b - 4 * a * c), b))
    ta, tb = sorted((q / a, c / q))
    return ta, tb


def trust_region(fun: Callable[[np.ndarray], tuple[float, np.ndarray]],
                 subspace_at: Callable[[np.ndarray], Subspace], lam: float, z: np.ndarray, *, gtol: float,
                 maxiter: int) -> tuple[np.ndarray, int, str]:
    """Minimise ``F(z) = L_s(z) + lam/2 ||z - theta||^2`` from ``z`` until ``||grad F|| < gtol``: scipy's
    trust-region loop with Steihaug's subproblem (:func:`_steihaug`), each subproblem's CG on the
    coordinates of ``S (+) span(grad_perp)`` at the iterate (the gradient's part outside ``S``,
    ``lam (z - theta)``'s, is a direction of curvature ``lam``: the same CG as on the full vectors).

    Args:
        fun: ``z -> (F(z), grad F(z))``.
        subspace_at: ``z -> Subspace`` at the iterate.
        lam: the proximal weight (``H_F = H_s + lam I``).
        z: the starting point (flat).
        gtol, maxiter: as scipy's ``minimize(method="trust-ncg")``.

    Returns:
        ``(z, iterations, message)``; the caller tests the stationarity residual.
    """
    f, g = fun(z)
    radius = INITIAL_RADIUS
    k = 0
    message = "Optimization terminated successfully."
    while np.linalg.norm(g) >= gtol:
        if k >= maxiter:
            message = "Maximum number of iterations has been exceeded."
            break
        sub = subspace_at(z)
        y, e = sub.project(g)
        p, bp, boundary = _steihaug(lambda v: sub.hvp(v) + lam * v, y, radius)
        predicted = -(float(y @ p) + 0.5 * float(p @ bp))
        z_new = z + sub.expand(p, e)
        f_new, g_new = fun(z_new)
        if not predicted > 0:
            message = "A bad approximation caused failure to predict improvement."
            break
        rho = (f - f_new) / predicted
        if np.isnan(rho):  # a step to where F is NaN: rejected and the region shrunk (scipy would retry it as is)
            rho = -np.inf
        if rho < 0.25:
            radius *= 0.25
        elif rho > 0.75 and boundary:
            radius = min(2 * radius, MAX_RADIUS)
        if rho > ETA:
            z, f, g = z_new, f_new, g_new
        k += 1
    return z, k, message

