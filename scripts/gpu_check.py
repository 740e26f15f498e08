"""The GPU checks of metaverify, as one script: the check matrix on CUDA and what TF32 does.

Run on a machine with an NVIDIA GPU (Ampere or later for TF32), from the
repository root::

    python scripts/gpu_check.py --out gpu-results [--examples 2]

It writes to ``--out``:

* ``check_cuda.json`` / ``check_cuda.txt``: ``metaverify check --device cuda``
  (every backend, float64, float32 with TF32 off, and ``tf32`` cells);
* ``tf32.json``: (1) TF32 matrix products on the GPU against the CPU emulation
  (:func:`verify.backends.torch.emulate_tf32`) and float32, relative to
  ``|A||B|``; (2) MAML meta-gradients in float32 on the GPU with TF32 off/on
  and emulated on the CPU, against the float64 reference; (3) which precision
  JAX's *default* float32 matmul uses on this GPU.

Exit status: that of ``metaverify check`` (0 all passed, 1 something failed).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _versions() -> dict:
    info = {"python": platform.python_version(), "numpy": np.__version__}
    for name in ("torch", "jax", "scipy"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            info[name] = None
    try:
        import torch

        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
        info["torch_cuda"] = torch.version.cuda
    except ImportError:
        pass
    return info


def _rel(got: np.ndarray, exact: np.ndarray, scale: np.ndarray) -> float:
    return float(np.max(np.abs(got.astype(np.float64) - exact) / scale))


def tf32_matmul() -> list[dict]:
    import torch

    from verify.backends.torch import emulate_tf32, tf32

    rows = []
    g = torch.Generator().manual_seed(0)
    for m, k, n in [(64, 64, 64), (256, 512, 128), (1024, 1024, 1024)]:
        a, b = torch.randn(m, k, generator=g), torch.randn(k, n, generator=g)
        exact = (a.double() @ b.double()).numpy()
        scale = (a.double().abs() @ b.double().abs()).numpy()  # |A||B|: the scale of a product's rounding
        with emulate_tf32():
            emu = (a @ b).numpy()
        ac, bc = a.cuda(), b.cuda()
        with tf32(True):
            real = (ac @ bc).cpu().numpy()
        with tf32(False):
            f32 = (ac @ bc).cpu().numpy()
        rows.append({"shape": [m, k, n], "gpu_tf32": _rel(real, exact, scale), "cpu_emulated_tf32": _rel(emu, exact, scale),
                     "gpu_float32": _rel(f32, exact, scale), "gpu_tf32_vs_emulated": _rel(real, emu.astype(np.float64), scale)})
    return rows


def tf32_meta_gradients(seeds: int = 10) -> list[dict]:
    from reference.models import flatten
    from verify.algorithms import build_case, evaluate
    from verify.backends import load_backend
    from verify.backends.torch import emulate_tf32
    from verify.matrix import relative

    tb = load_backend("torch")
    rows = []
    for seed in range(seeds):
        case = build_case("maml", seed=seed)
        _, g = evaluate(case)
        g = flatten(g)

        def rel(grads):
            x = flatten([np.asarray(v, dtype=np.float64) for v in grads])
            return relative(x, g)[0]

        row = {"seed": seed}
        row["gpu_float32"] = rel(evaluate(case, tb, dtype="float32", device="cuda", allow_tf32=False)[1])
        row["gpu_tf32"] = rel(evaluate(case, tb, dtype="float32", device="cuda", allow_tf32=True)[1])
        with emulate_tf32():
            row["cpu_emulated_tf32"] = rel(evaluate(case, tb, dtype="float32")[1])
        rows.append(row)
    return rows


def jax_default_precision() -> dict:
    import jax
    import jax.numpy as jnp

    gpu = jax.devices("gpu")[0]
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((512, 512)).astype(np.float32), rng.standard_normal((512, 512)).astype(np.float32)
    exact = a.astype(np.float64) @ b.astype(np.float64)
    scale = np.abs(a.astype(np.float64)) @ np.abs(b.astype(np.float64))
    out = {"device": str(gpu)}
    for prec in (None, "highest", "float32", "tensorfloat32", "bfloat16"):
        ctx = jax.default_matmul_precision(prec) if prec else contextlib.nullcontext()
        with ctx, jax.default_device(gpu):
            got = np.asarray(jax.jit(jnp.matmul)(jnp.asarray(a), jnp.asarray(b)))
        out["default" if prec is None else prec] = _rel(got, exact, scale)
    # a float32 MAML meta-gradient on the GPU at JAX's default precision, against the float64 reference
    from reference.models import flatten
    from verify.algorithms import build_case, evaluate
    from verify.backends import load_backend
    from verify.matrix import relative

    jb = load_backend("jax")
    errs = {}
    for label, prec in (("default", None), ("highest", "highest"), ("tensorfloat32", "tensorfloat32")):
        worst = 0.0
        for seed in range(5):
            case = build_case("maml", seed=seed)
            g = flatten(evaluate(case)[1])
            ctx = jax.default_matmul_precision(prec) if prec else contextlib.nullcontext()
            with ctx, jax.default_device(gpu):
                gj = flatten([np.asarray(v, dtype=np.float64) for v in evaluate(case, jb, dtype="float32", jit=True)[1]])
            worst = max(worst, relative(gj, g)[0])
        errs[label] = worst
    out["maml_float32_meta_gradient_worst_rel_error_seeds_0_4"] = errs
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--examples", type=int, default=2, help="examples per cell of the CUDA check matrix")
    p.add_argument("--skip-matrix", action="store_true")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    report: dict = {"versions": _versions()}
    print(json.dumps(report["versions"]), flush=True)
    for name, fn in (("tf32_matmul", tf32_matmul), ("tf32_meta_gradients", tf32_meta_gradients),
                     ("jax_default_precision", jax_default_precision)):
        t0 = time.perf_counter()
        try:
            report[name] = fn()
        except Exception as exc:  # report and go on: one missing piece must not lose the others
            report[name] = {"error": f"{type(exc).__name__}: {exc}"}
        print(f"{name} ({time.perf_counter() - t0:.1f}s): {json.dumps(report[name])}", flush=True)
        (out / "tf32.json").write_text(json.dumps(report, indent=2))
    code = 0
    if not args.skip_matrix:
        cmd = [sys.executable, "-m", "verify", "check", "--device", "cuda", "--examples", str(args.examples),
               "--json", str(out / "check_cuda.json"), "--junit", str(out / "check_cuda.xml"), "--verbose"]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        text = proc.stdout + proc.stderr
        (out / "check_cuda.txt").write_text(text)
        print(text, flush=True)
        print(f"metaverify check --device cuda: exit {proc.returncode} in {time.perf_counter() - t0:.1f}s", flush=True)
        code = proc.returncode
    return code


if __name__ == "__main__":
    sys.exit(main())
