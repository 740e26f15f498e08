"""TF32: the CPU emulation of TensorFloat-32 matrix products and the matrix's tf32 cells.

The emulation is checked against an independent rounding (NumPy ``frexp`` to
11 significant bits, round half to even), against the TF32 error bound of a
matrix product, and end to end: a MAML meta-gradient computed with TF32 matrix
products (double backward included) lands between float32's accuracy and
TF32's tolerance, and the iMAML inner solve still converges under TF32.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from hypothesis import given, strategies as st  # noqa: E402

from reference.models import flatten  # noqa: E402
from verify.algorithms import build_case, evaluate  # noqa: E402
from verify.backends import load_backend  # noqa: E402
from verify.backends.torch import emulate_tf32, round_to_tf32  # noqa: E402
from verify.backends.torch._model import tf32_active, working_eps  # noqa: E402
from verify.cli import main  # noqa: E402
from verify.matrix import check_case, relative  # noqa: E402
from verify.tolerance import TF32_EPS, tolerance  # noqa: E402


def _tf32_numpy(x: np.ndarray) -> np.ndarray:
    """Independent rounding: mantissa m in [0.5, 1) kept to 11 significant bits (1 implicit + 10), half to even."""
    m, e = np.frexp(x.astype(np.float64))
    return (np.round(m * 2.0**11) / 2.0**11 * 2.0**e).astype(np.float32)


_F32 = st.floats(width=32, allow_nan=False, allow_infinity=False, allow_subnormal=False).filter(
    lambda v: abs(v) < 3e38)  # rounding up at float32's top binade overflows; not a case TF32 data meets


@given(st.lists(_F32, min_size=1, max_size=64))
def test_round_to_tf32_matches_an_independent_rounding(values):
    x = np.array(values, dtype=np.float32)
    got = round_to_tf32(torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(got, _tf32_numpy(x))


def test_round_to_tf32_leaves_float64_alone_and_ties_go_to_even():
    x64 = torch.tensor([1.0 + 2.0**-20], dtype=torch.float64)
    assert round_to_tf32(x64) is x64
    one_ulp = 2.0**-10
    ties = torch.tensor([1 + one_ulp / 2, 1 + 3 * one_ulp / 2], dtype=torch.float32)  # exactly halfway
    assert round_to_tf32(ties).tolist() == [1.0, 1 + 2 * one_ulp]


def test_emulated_matmul_has_tf32_error_and_is_restored():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, 48, generator=g), torch.randn(48, 32, generator=g)
    exact = a.double() @ b.double()
    bound = 2 * TF32_EPS * (a.double().abs() @ b.double().abs())  # |fl(a)fl(b) - ab| <= (2u + u^2)|a||b|, u = eps/2
    assert not tf32_active("cpu")
    with emulate_tf32():
        assert tf32_active("cpu") and working_eps(torch.float32) == TF32_EPS
        c = a @ b
        addmm = torch.addmm(torch.zeros(32), a, b)
    assert not tf32_active("cpu") and working_eps(torch.float32) == np.finfo(np.float32).eps
    err = (c.double() - exact).abs()
    assert bool((err <= bound).all())
    # TF32 is visibly coarser than float32 (>= 100x on this product), and addmm rounds the same way
    err32 = ((a @ b).double() - exact).abs().max()
    assert err.max() > 100 * err32
    torch.testing.assert_close(addmm, c, rtol=0, atol=0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tf32_maml_meta_gradient_sits_between_float32_and_tf32_tolerances(seed):
    torch_backend = load_backend("torch")
    case = build_case("maml", seed=seed)
    _, g_ref = evaluate(case)
    g_ref = flatten(g_ref)

    def rel(grads):
        g = flatten([np.asarray(x, dtype=np.float64) for x in grads])
        return relative(g, g_ref)[0]

    _, g32 = evaluate(case, torch_backend, dtype="float32")
    with emulate_tf32():
        _, gtf = evaluate(case, torch_backend, dtype="float32")
    e32, etf = rel(g32), rel(gtf)
    assert etf > 30 * e32  # the emulation reached the double-backward products too
    assert etf <= tolerance("tf32", "reference_match")


@pytest.mark.parametrize("algorithm", ["maml", "imaml", "newton", "r2d2"])
def test_tf32_cells_pass_and_report_the_cost_in_float32_units(algorithm):
    result = check_case(build_case(algorithm, seed=1), "torch", "tf32", module=load_backend("torch"))
    assert result.status == "pass", result.checks
    check = next(c for c in result.checks if c["check"] == "meta-gradient vs reference")
    assert "TF32 emulated on the CPU" in check["detail"] and "x float32's tolerance" in check["detail"]
    # no directional-derivative check at TF32 (it would repeat the reference comparison, looser)
    assert not any("finite" in c["check"] or "complex" in c["check"] for c in result.checks)


def test_cli_tf32_on_cpu_emulates_torch_and_marks_jax_unsupported(capsys):
    pytest.importorskip("jax")
    code = main(["check", "--backend", "torch", "--backend", "jax", "--algorithm", "maml", "--dtype", "tf32"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "maml         torch    tf32" in out or ("torch" in out and "tf32" in out)
    assert "JAX has no TF32 on the CPU" in out and "1 passed" in out and "1 unsupported" in out


def test_cli_all_dtypes_on_cpu_has_no_tf32_cells(capsys):
    assert main(["check", "--backend", "torch", "--algorithm", "reptile"]) == 0
    out = capsys.readouterr().out
    assert "tf32" not in out and "float32" in out
