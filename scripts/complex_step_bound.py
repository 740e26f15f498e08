"""Issue 19: how often the complex step's error estimate fails to bound its true error (k19a's table).

Adversarial directions: two dominant terms that cancel, magnitudes 1e-3..1e3; the truth in exact
Fraction arithmetic. Compares the rounding-scale probe with random +-1 signs (the old code), all plus
(the mutant USub_UAdd#5), one Gaussian probe (the code now) and two Gaussian probes.

Usage: python scripts/complex_step_bound.py SEED N     (the note used: 1 20000)
"""
import numpy as np, math, sys
from fractions import Fraction
sys.path.insert(0, '.')
import verify._numdiff as nd
from verify._numdiff import Problem, COMPLEX_NOISE_FACTOR, FLOOR_ULPS, _pow2, COMPLEX_STEP

def variant(kind):
    def cs(p, v, step):
        h = _pow2(COMPLEX_STEP * p.nominal(v))
        base = p.x.astype(np.complex128)
        def q(point, hh, d=v):
            return p.complex(point + 1j * hh * d).imag / hh
        d1 = q(base, h)
        rng = np.random.default_rng(0xC0DE)
        samples = [q(base, 3.0 * h), q(base, 5.0 * h)]
        for _ in range(2):
            shifted = p.x + rng.choice([-1.0, 1.0], size=p.x.shape) * p.eps * np.abs(p.x)
            samples.append(q(shifted.astype(np.complex128), h))
        if kind == "orig":
            terms = abs(q(base, h, rng.choice([-1.0, 1.0], size=p.x.shape) * v))
        elif kind == "mutant":
            terms = abs(q(base, h, rng.choice([1.0, 1.0], size=p.x.shape) * v))
        elif kind == "gauss":
            terms = abs(q(base, h, rng.standard_normal(p.x.shape) * v))
        elif kind == "gauss2":
            w = rng.standard_normal((2,) + p.x.shape)
            terms = math.sqrt(0.5 * (q(base, h, w[0] * v) ** 2 + q(base, h, w[1] * v) ** 2))
        spread = max(abs(d - d1) for d in samples)
        return d1, COMPLEX_NOISE_FACTOR * spread, FLOOR_ULPS * p.eps * (abs(d1) + terms)
    return cs

rng = np.random.default_rng(int(sys.argv[1]))
kinds = ["orig", "mutant", "gauss", "gauss2"]
fails = {k: 0 for k in kinds}; worst = {k: 0 for k in kinds}; tot = 0
spread_only = 0
for trial in range(int(sys.argv[2])):
    n = int(rng.integers(2, 13))
    a = rng.choice([-1, 1], n) * 10.0 ** rng.uniform(-3, 3, n)
    x = rng.standard_normal(n)
    v = rng.standard_normal(n) * 10.0 ** rng.uniform(-3, 3, n) * 1e-3
    i, j = rng.choice(n, 2, replace=False)
    v[i] = 1e3 / a[i] * rng.choice([-1, 1]); v[j] = -a[i] * v[i] / a[j] * (1 + rng.uniform(-1e-3, 1e-3))
    f = lambda y, a=a: np.sum(a * y)
    ex = float(sum(Fraction(float(ai)) * Fraction(float(vi)) for ai, vi in zip(a, v)))
    tot += 1
    for k in kinds:
        p = Problem(f, x)
        d1, sp, fl = variant(k)(p, v, None)
        err = abs(d1 - ex)
        worst[k] = max(worst[k], err / (sp + fl))
        if err > sp + fl:
            fails[k] += 1
print(tot, fails, {k: round(w, 2) for k, w in worst.items()})
