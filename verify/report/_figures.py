"""The report's figures (matplotlib, object API only: no pyplot, no global backend switch).

* :func:`taylor_figure`: Taylor remainders ``r0, r1, r2`` against ``h`` (log-log)
  with the fitted slopes and reference lines of slope 1, 2, 3;
* :func:`fd_figure`: relative error of central differences, Richardson
  extrapolation and the complex step against the step size (the V of
  truncation against round-off), the engine's default steps marked;
* :func:`heatmap_figure`: worst error relative to the tolerance, algorithm x
  (backend, dtype);
* :func:`audit_figure`: the audited gradient against the reference, per tensor.

:func:`render` returns PNG and SVG bytes; both are deterministic for the same
data and matplotlib version (no timestamps, a fixed SVG hash salt).
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["PNG_DPI", "audit_figure", "fd_figure", "heatmap_figure", "png_size", "render", "taylor_figure"]

_COLORS = {"r0": "#4c72b0", "r1": "#dd8452", "r2": "#55a868", "central": "#4c72b0", "richardson": "#dd8452",
           "complex": "#55a868"}
_RC = {"svg.hashsalt": "metaverify-report", "svg.fonttype": "path", "font.size": 10, "axes.titlesize": 11,
       "axes.labelsize": 10, "legend.fontsize": 8.5, "axes.grid": True, "grid.alpha": 0.3, "grid.linewidth": 0.6,
       "axes.spines.top": False, "axes.spines.right": False}


_SUB = str.maketrans("0123456789", "₀₁₂₃₄₅₆₇₈₉")
_SUP = str.maketrans("0123456789-", "⁰¹²³⁴⁵⁶⁷⁸⁹⁻")


def _power_of_ten(value: float, _pos: Any = None) -> str:
    """``10⁻⁵`` with Unicode superscripts: no mathtext, whose layout dominated the drawing time."""
    if value <= 0:
        return ""
    exp = math.log10(value)
    return f"10{str(round(exp)).translate(_SUP)}" if abs(exp - round(exp)) < 1e-9 else ""


def _formatter() -> Any:
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(_power_of_ten)


def _log_axes(ax: Any) -> None:
    from matplotlib.ticker import FuncFormatter, LogLocator

    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_locator(LogLocator(base=10.0, numticks=12))
        axis.set_major_formatter(FuncFormatter(_power_of_ten))
        axis.set_minor_formatter(FuncFormatter(lambda v, p: ""))


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


#: PNG resolution: 1.5 pixels per CSS pixel at the page's 100 CSS pixels per figure inch (sharp on HiDPI screens).
PNG_DPI = 150
#: Line plots need few colours; a 96-colour palette makes the PNG about 3x smaller, invisibly.
PNG_COLORS = 96


def render(build: Any, *args: Any, **kwargs: Any) -> tuple[bytes, bytes]:
    """Draw ``build(*args, **kwargs) -> Figure`` under the report's style; return ``(png, svg)`` bytes."""
    import matplotlib
    from PIL import Image  # a dependency of matplotlib

    with matplotlib.rc_context(_RC):
        fig = build(*args, **kwargs)
        png, svg = io.BytesIO(), io.BytesIO()
        fig.savefig(png, format="png", dpi=PNG_DPI, metadata={"Software": None})
        fig.savefig(svg, format="svg", metadata={"Date": None, "Creator": None})
    image = Image.open(io.BytesIO(png.getvalue())).convert("RGB")
    small = io.BytesIO()
    image.quantize(colors=PNG_COLORS, method=Image.Quantize.MEDIANCUT).save(small, format="png", optimize=True)
    return small.getvalue(), svg.getvalue()


def png_size(png: bytes) -> tuple[int, int]:
    """``(width, height)`` in pixels from the PNG header."""
    if png[:8] != b"\x89PNG\r\n\x1a\n" or png[12:16] != b"IHDR":
        raise ValueError("not a PNG")
    return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")


def taylor_figure(data: Any) -> Any:
    """Taylor remainders of ``data`` (:class:`verify.report._numerics.TaylorData`)."""
    fig = _figure(6.4, 4.0)
    ax = fig.add_subplot()
    names = ("no derivative", "with the gradient", "with the gradient and Hv")
    for order, (res, what) in enumerate(zip(data.results, names)):
        h = np.asarray(res.steps)
        r = np.asarray(res.remainders, dtype=float)
        used = np.asarray(res.used, dtype=bool)
        color = _COLORS[f"r{order}"]
        ok = np.isfinite(r) & (r > 0)
        slope = f"slope {res.slope:.2f}" if math.isfinite(res.slope) else "no slope fitted"
        ax.loglog(h[ok], r[ok], "-", color=color, lw=1.0, alpha=0.55)
        ax.loglog(h[ok & ~used], r[ok & ~used], "o", mfc="none", color=color, ms=4)
        ax.loglog(h[ok & used], r[ok & used], "o", color=color, ms=4.5,
                  label=f"r{str(order).translate(_SUB)} {what}: {slope} (expected {res.expected_rate}), {res.status}")
        fit = used & ok
        if fit.sum() >= 2 and math.isfinite(res.slope):
            # The expected-rate line C h^p through the geometric centre of the fitted window.
            hc = math.exp(np.mean(np.log(h[fit])))
            rc = math.exp(np.mean(np.log(r[fit])))
            p = res.expected_rate
            hh = np.array([h[fit].min() / 4, h[fit].max() * 2])
            ax.loglog(hh, rc * (hh / hc) ** p, "--", color=color, lw=1.2, alpha=0.9)
    floors = np.asarray(data.results[2].floors, dtype=float)
    fin = np.isfinite(floors)
    if fin.any():
        ax.loglog(np.asarray(data.results[2].steps)[fin], floors[fin], ":", color="#888888", lw=1.0,
                  label="round-off floor of r₂")
    _log_axes(ax)
    ax.set_xlabel("step h (displacement h·v, ‖v‖ = 1)")
    ax.set_ylabel("remainder rₖ(h)")
    ax.set_title(f"{data.algorithm}: Taylor remainders (dashed: slopes 1, 2, 3; filled: fitted)")
    ax.legend(loc="upper left", frameon=True)
    return fig


def fd_figure(curves: Any) -> Any:
    """Error against step size (:class:`verify.report._numerics.FDCurves`)."""
    fig = _figure(6.4, 4.0)
    ax = fig.add_subplot()
    labels = {"central": "central difference", "richardson": "Richardson extrapolation",
              "complex": "complex step"}
    # The complex step's truncation error (h^2 |f^(3)| / 6) equals the central difference's, so on the right
    # the two curves coincide: distinct line styles keep both visible.
    style = {"central": dict(ls="-", lw=2.4, alpha=0.75, zorder=3),
             "richardson": dict(ls="-", lw=1.1, marker=".", ms=4, zorder=4),
             "complex": dict(ls="--", lw=1.4, zorder=5)}
    for method in ("central", "richardson", "complex"):
        steps = np.asarray(curves.complex_steps if method == "complex" else curves.steps)
        err = np.asarray(getattr(curves, method), dtype=float)
        ok = np.isfinite(err)
        if not ok.any():
            continue
        ax.loglog(steps[ok], err[ok], color=_COLORS[method], label=labels[method], **style[method])
        d = curves.defaults.get(method)
        if d and math.isfinite(d["error"]):
            ax.loglog([d["step"]], [d["error"]], marker="*", ms=13, color=_COLORS[method], mec="black", mew=0.6,
                      ls="none", zorder=6, label=f"default step ({labels[method]}): error {d['error']:.1e}")
    eps = float(np.finfo(np.float64).eps)
    ax.axhline(eps, color="#888888", ls=":", lw=1.0, label="float64 machine epsilon")
    _log_axes(ax)
    ax.set_xlabel("step t (displacement t·v, ‖v‖ = 1)")
    ax.set_ylabel("relative error of the directional derivative")
    ax.set_title(f"{curves.algorithm}: directional derivative error against step size")
    ax.set_ylim(bottom=5e-18, top=10.0)
    ax.legend(loc="center left", ncol=1, frameon=True)  # the region left of the V is empty
    return fig


def heatmap_figure(result: Any) -> Any:
    """Worst error / tolerance per algorithm x (backend, dtype) of a :class:`verify.matrix.MatrixResult`."""
    from matplotlib.colors import LinearSegmentedColormap

    from verify.report._content import cell_error

    cells = result.cells
    algorithms = list(dict.fromkeys(c.algorithm for c in cells))
    columns = list(dict.fromkeys((c.backend, c.dtype) for c in cells))
    lo, hi = -8.0, 2.0
    grid = np.full((len(algorithms), len(columns)), np.nan)
    text: dict[tuple[int, int], str] = {}
    for c in cells:
        i, j = algorithms.index(c.algorithm), columns.index((c.backend, c.dtype))
        if c.status == "unsupported" or not c.cases:
            text[i, j] = "n/a"
            continue
        err, tol = cell_error(c)
        if math.isnan(err):
            text[i, j] = "n/a"
            continue
        if not math.isfinite(err):
            ratio = hi
        elif tol > 0:
            ratio = math.log10(err / tol) if err > 0 else lo
        else:
            ratio = lo if err == 0 else hi
        grid[i, j] = min(max(ratio, lo), hi)
        mark = {"pass": "", "fail": "\nFAIL", "inconclusive": "\n?"}.get(c.status, "")
        text[i, j] = ("exact" if err == 0 else f"{err:.0e}" if math.isfinite(err) else "inf") + mark

    def at(log_ratio: float) -> float:
        return (log_ratio - lo) / (hi - lo)

    # Green up to a tenth of the tolerance, yellow to orange up to the tolerance, red above.
    cmap = LinearSegmentedColormap.from_list("verdict", [
        (0.0, "#1a7f37"), (at(-1.0), "#c7e9b4"), (at(-0.3), "#fff3b0"), (at(0.0), "#f4a582"),
        (1.0, "#c62828")]).with_extremes(bad="#eeeeee")
    width = min(max(2.6 + 1.05 * len(columns), 5.2), 10.0)
    fig = _figure(width, 1.5 + 0.36 * len(algorithms))
    ax = fig.add_subplot()
    im = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=lo, vmax=hi, aspect="auto")
    for (i, j), t in text.items():
        ax.text(j, i, t, ha="center", va="center", fontsize=7.5, color="#111111")
    ax.set_xticks(range(len(columns)), [f"{b}\n{d}" for b, d in columns])
    ax.set_yticks(range(len(algorithms)), algorithms)
    ax.tick_params(length=0)
    ax.grid(False)
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set_title("worst relative error per cell (text)\ncolour: error / tolerance", fontsize=10)
    bar = fig.colorbar(im, ax=ax, shrink=0.9, pad=0.02)
    bar.set_label("log10(error / tolerance)")
    return fig


def audit_figure(result: Any, claimed: Sequence[np.ndarray] | None = None,
                 reference: Sequence[np.ndarray] | None = None) -> Any:
    """Claimed against reference gradient per tensor of an audit.

    With the full arrays, one scatter panel per tensor (claimed entries against
    reference entries, the diagonal is agreement); otherwise the per-tensor
    worst relative error against the tolerance.
    """
    tensors = list(result.tensors)
    if claimed is not None and reference is not None and len(claimed) == len(tensors):
        n = len(tensors)
        cols = min(n, 4)
        rows = math.ceil(n / cols)
        fig = _figure(1.9 * cols + 0.6, 1.9 * rows + 0.5)
        for k, (t, g, r) in enumerate(zip(tensors, claimed, reference)):
            ax = fig.add_subplot(rows, cols, k + 1)
            g, r = np.ravel(np.asarray(g, dtype=float)), np.ravel(np.asarray(r, dtype=float))
            span = float(max(np.max(np.abs(r), initial=0.0), np.max(np.abs(g), initial=0.0), 1e-300))
            ax.plot([-span, span], [-span, span], "-", color="#888888", lw=0.8)
            ax.plot(r, g, "o", ms=3.5, color="#1a7f37" if t.status == "pass" else "#c62828")
            ax.set_title(f"{t.name}: rel {t.error:.0e}", fontsize=8.5)
            ax.tick_params(labelsize=7)
            if k % cols == 0:
                ax.set_ylabel("claimed", fontsize=8)
            if k >= n - cols:
                ax.set_xlabel("reference", fontsize=8)
        fig.suptitle(f"{result.algorithm} ({result.backend}): claimed against reference gradient", fontsize=10)
        return fig
    fig = _figure(6.0, 1.3 + 0.3 * len(tensors))
    ax = fig.add_subplot()
    errs = np.array([max(float(t.error), 1e-18) if math.isfinite(float(t.error)) else 1e3 for t in tensors])
    colors = ["#1a7f37" if t.status == "pass" else "#c62828" for t in tensors]
    ax.barh(range(len(tensors)), errs, color=colors)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(_formatter())
    ax.axvline(float(result.tolerance), color="#222222", ls="--", lw=1.0, label=f"tolerance {result.tolerance:.1e}")
    ax.set_yticks(range(len(tensors)), [t.name for t in tensors])
    ax.invert_yaxis()
    ax.set_xlabel("worst |claimed - reference| / max |reference|")
    ax.set_title(f"{result.algorithm} ({result.backend}): claimed against reference gradient, per tensor")
    ax.legend(loc="lower right")
    return fig
