"""Reference MAML meta-gradient on convolutional backbones against PyTorch autograd, CPU, float64.

Run from the repository root::

    /work/main/.venv/bin/python benchmarks/bench_conv.py            # both problems (about 2 min)
    /work/main/.venv/bin/python benchmarks/bench_conv.py --quick    # Conv4 only, fewer repeats
    /work/main/.venv/bin/python benchmarks/bench_conv.py --json out.json

Problems (issue #14's bars):

* **Conv4** (``reference.nets.conv4``, hidden 32) on 1x28x28 images (Omniglot
  shape), 5-way 1-shot with 5 queries per class, 4 tasks, K = 5 inner steps,
  inner_lr = 0.1, batch norm in train mode (transductive: support and query
  batches normalised separately). Bars: reference vs torch relative error
  ``max|g_ref - g_torch| / max|g_torch|`` <= 1e-12, reference time <= 1.5x
  torch's, side by side (alternating rounds) at the default thread settings.
* **ResNet-12** (``reference.nets.resnet12``, widths 64-160-320-640, no
  average pool: 16,000 features) on 3x84x84 (miniImageNet shape), 5-way
  1-shot, 5 queries per class, 1 task, K = 1. Bars: it runs, relative error
  <= 1e-10; peak memory reported next to torch's.

Torch: the functional MAML loop a practitioner writes, on ``to_torch(net)``
(the same ``nn.Sequential``/residual modules, float64): per task ``K`` steps
``p <- p - lr * autograd.grad(L_s(p), p, create_graph=True)`` through
``torch.func.functional_call``, then ``autograd.grad(L_q(p_K) / T, theta)``
accumulated; one task's graph alive at a time, as in the reference. The
reference: ``reference.maml.meta_loss_and_grad`` (reverse accumulation with
exact Hessian-vector products by hand-written R-operators; no autodiff).

Time: median (min-max) over rounds; the ratio is the median of per-round
ratios (same round, same load). Memory: peak resident-set increase of one call
in a fresh subprocess (``benchmarks._common.rss_probe``), the like-for-like
figure for NumPy and torch. ResNet-12 (minutes per call) runs once each, every
call in its own fresh process measuring its time and peak RSS together.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import _common as C  # noqa: E402

CONV4 = {"net": "conv4", "in_shape": [1, 28, 28], "hidden": 32, "n_way": 5, "k_shot": 1, "k_query": 5,
         "n_tasks": 4, "steps": 5, "lr": 0.1}
RESNET12 = {"net": "resnet12", "in_shape": [3, 84, 84], "widths": [64, 160, 320, 640], "n_way": 5, "k_shot": 1,
            "k_query": 5, "n_tasks": 1, "steps": 1, "lr": 0.1}


def _problem(cfg: dict[str, Any]):
    import numpy as np

    from reference.nets import conv4, resnet12
    from reference.tasks import Task

    shape = tuple(cfg["in_shape"])
    if cfg["net"] == "conv4":
        net = conv4(shape, cfg["n_way"], hidden=cfg["hidden"])
    else:
        net = resnet12(shape, cfg["n_way"], widths=tuple(cfg["widths"]))
    params = net.init(0)
    rng = np.random.default_rng(1)
    tasks = []
    for _ in range(cfg["n_tasks"]):
        def draw(k: int):
            y = rng.permutation(np.repeat(np.arange(cfg["n_way"]), k))
            return rng.normal(size=(y.size, *shape)), y
        xs, ys = draw(cfg["k_shot"])
        xq, yq = draw(cfg["k_query"])
        tasks.append(Task(xs, ys, xq, yq))
    return net, params, tasks


def reference_fn(**cfg: Any):
    """Zero-argument callable: the reference meta-gradient (also an ``rss_probe`` factory)."""
    from reference import maml

    net, params, tasks = _problem(cfg)
    return lambda: maml.meta_loss_and_grad(net, params, tasks, cfg["lr"], cfg["steps"])


def torch_fn(**cfg: Any):
    """Zero-argument callable: torch create_graph=True MAML on the twin module (an ``rss_probe`` factory)."""
    import torch
    import torch.nn.functional as F
    from torch.func import functional_call

    from reference.nets import to_torch

    net, params, tasks = _problem(cfg)
    module = to_torch(net, params)
    names = [n for n, _ in module.named_parameters()]
    theta = [p.detach().clone().requires_grad_(True) for p in module.parameters()]
    tt = [tuple(torch.as_tensor(a) for a in t) for t in tasks]
    lr, steps = cfg["lr"], cfg["steps"]

    def loss(p, x, y):
        return F.cross_entropy(functional_call(module, dict(zip(names, p)), (x,)), y)

    def run():
        total, grad = 0.0, [torch.zeros_like(t) for t in theta]
        for xs, ys, xq, yq in tt:
            p = theta
            for _ in range(steps):
                g = torch.autograd.grad(loss(p, xs, ys), p, create_graph=True)
                p = [a - lr * b for a, b in zip(p, g)]
            lq = loss(p, xq, yq) / len(tt)
            for acc, gi in zip(grad, torch.autograd.grad(lq, theta)):
                acc += gi
            total += lq.item()
        return total, [g.numpy() for g in grad]

    return run


def compare(cfg: dict[str, Any], repeats: int, memory: bool) -> dict[str, Any]:
    import numpy as np

    from reference.models import flatten

    ref, tor = reference_fn(**cfg), torch_fn(**cfg)
    times, outs, _ = C.alternate({"reference": ref, "torch": tor}, repeats, warmup=1)
    g_ref, g_tor = flatten(outs["reference"][1]), flatten(outs["torch"][1])
    rel = float(np.max(np.abs(g_ref - g_tor)) / np.max(np.abs(g_tor)))
    loss_rel = abs(outs["reference"][0] - outs["torch"][0]) / abs(outs["torch"][0])
    ratio = C.pairwise(times, "reference", "torch")
    row: dict[str, Any] = {"problem": cfg, "n_params": int(g_ref.size), "rel_error": rel, "loss_rel_error": loss_rel,
                           "time_reference": times["reference"].to_dict(), "time_torch": times["torch"].to_dict(),
                           "ratio": ratio.to_dict(), "ratio_fmt": C.fmt_ratio(ratio),
                           "time_reference_fmt": times["reference"].fmt(), "time_torch_fmt": times["torch"].fmt()}
    if memory:
        row["rss_reference"] = C.rss_probe("benchmarks.bench_conv", "reference_fn", cfg)
        row["rss_torch"] = C.rss_probe("benchmarks.bench_conv", "torch_fn", cfg)
        row["tracemalloc_reference"] = C.tracemalloc_peak(ref)[1]
    return row


def _probe(which: str, config: str, out: str) -> None:
    """Child process: one timed call with its peak-RSS increase; the gradient saved for the parent."""
    import json

    import numpy as np

    from reference.models import flatten

    cfg = {"conv4": CONV4, "resnet12": RESNET12}[config]
    fn = (reference_fn if which == "reference" else torch_fn)(**cfg)
    (t, (loss, grad)), rss = C.measure_rss(lambda: C.timed(fn))
    np.save(out, flatten(grad))
    print(json.dumps({"time": t, "rss": rss, "loss": loss}))


def compare_in_subprocesses(name: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """One call each of reference and torch, each in a fresh process (time, peak RSS, gradient)."""
    import json
    import subprocess
    import tempfile

    import numpy as np

    res: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for which in ("reference", "torch"):
            out = os.path.join(tmp, f"{which}.npy")
            cmd = [sys.executable, os.path.abspath(__file__), "--probe", which, "--config", name, "--out", out]
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **C.PROBE_ENV})
            if proc.returncode != 0:
                raise RuntimeError(f"{which} probe failed:\n{proc.stderr[-3000:]}")
            res[which] = json.loads(proc.stdout.strip().splitlines()[-1])
            res[which]["grad"] = np.load(out)
    g_ref, g_tor = res["reference"]["grad"], res["torch"]["grad"]
    t_ref, t_tor = res["reference"]["time"], res["torch"]["time"]
    return {"problem": cfg, "n_params": int(g_ref.size),
            "rel_error": float(np.max(np.abs(g_ref - g_tor)) / np.max(np.abs(g_tor))),
            "loss_rel_error": abs(res["reference"]["loss"] - res["torch"]["loss"]) / abs(res["torch"]["loss"]),
            "time_reference_fmt": C.fmt_seconds(t_ref), "time_torch_fmt": C.fmt_seconds(t_tor),
            "time_reference": t_ref, "time_torch": t_tor, "ratio_fmt": f"{t_ref / t_tor:.3g}x (one run each)",
            "rss_reference": res["reference"]["rss"], "rss_torch": res["torch"]["rss"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="Conv4 only, 3 rounds, no memory probes")
    ap.add_argument("--repeats", type=int, default=7, help="timed rounds for Conv4 (default 7)")
    ap.add_argument("--threads", type=int, default=None, help="fix BLAS/torch threads (default: library defaults)")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--probe", choices=["reference", "torch"], help=argparse.SUPPRESS)
    ap.add_argument("--config", choices=["conv4", "resnet12"], help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.probe:
        _probe(args.probe, args.config, args.out)
        return 0
    C.set_thread_env(args.threads)
    C.set_torch_threads(args.threads)
    env = C.environment(args.threads)
    C.log(f"load before: {C.load()}")
    rows = []
    rows.append(compare(CONV4, 3 if args.quick else args.repeats, memory=not args.quick))
    if not args.quick:
        rows.append(compare_in_subprocesses("resnet12", RESNET12))
    C.log(f"load after: {C.load()}")
    headers = ["problem", "params", "rel. error", "reference", "torch", "ratio ref/torch", "peak RSS ref", "peak RSS torch"]
    table = []
    for r in rows:
        p = r["problem"]
        label = (f"{p['net']} {'x'.join(map(str, p['in_shape']))}, {p['n_way']}-way {p['k_shot']}-shot, "
                 f"{p['n_tasks']} task(s), K={p['steps']}")
        table.append([label, r["n_params"], f"{r['rel_error']:.1e}", r["time_reference_fmt"], r["time_torch_fmt"],
                      r["ratio_fmt"], C.fmt_mb(r.get("rss_reference")), C.fmt_mb(r.get("rss_torch"))])
    print(C.environment_markdown(env))
    print(C.md_table(headers, table))
    if args.json:
        C.write_json(args.json, {"environment": env, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
