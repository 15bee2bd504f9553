"""Stage 3, step 2: the MMoE paper's synthetic experiment - does task correlation hurt a shared
bottom more than a mixture of experts?

What you learn here: how to make two tasks whose relatedness you control exactly (the cosine p
between their weight vectors), and what that does to each architecture. Ma et al. (KDD 2018,
section 4) generate, for a d = 100 input x ~ N(0, I):
    u1, u2 orthonormal;  w1 = c u1;  w2 = c (p u1 + sqrt(1 - p^2) u2)   -> cos(w1, w2) = p
    y_k = w_k^T x + sum_{i=1..m} sin(alpha_i w_k^T x + beta_i) + eps,   eps ~ N(0, 0.01^2)
(m = 10; the paper does not give alpha_i, beta_i - here they are drawn once per seed,
alpha_i ~ U(0.5, 2), beta_i ~ N(0, 1), shared by both tasks, so p = 1 means the same task.)
Models at the paper's sizes: shared-bottom (one 113-unit layer), OMoE and MMoE (8 experts of 16
units; one gate for all tasks vs one per task), PLE/CGC (2 shared + 3 per-task experts of 16),
towers of 8 units, MSE per task. The paper's finding: the shared bottom's loss grows as p drops,
MMoE's much less. The table and plot say whether this run reproduces it.

Run:    python stage3_advanced/02_task_correlation.py               # 3 seeds, ~8 min
        python stage3_advanced/02_task_correlation.py --quick       # 2 seeds, ~20 s
Writes: results/stage3_task_correlation.md + .png (only the default run: --quick writes to
        runs/quick/, other flags to runs/partial/, CUDA to *_cuda.md),
        runs/stage3_task_correlation.json
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: plain imports
import common  # noqa: E402
from common import (checked, correlation, mean_std, non_negative_float,  # noqa: E402
                    non_negative_int, positive_float, positive_int, pyplot, save_figure,
                    write_json, write_text)
from stage2_ctr.models.mtl import build_mtl, n_params  # noqa: E402
from stage3_advanced.stage3_common import setup  # noqa: E402

MODELS = {  # name -> build_mtl keyword arguments (the paper's sizes)
    "shared_bottom": dict(width=113),
    "omoe": dict(width=16, n_experts=8),
    "mmoe": dict(width=16, n_experts=8),
    "ple": dict(width=16, n_shared=2, n_specific=3),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corrs", type=correlation, nargs="+", default=[0.5, 0.9, 1.0],
                   help="task correlations p = cos(w1, w2), each in [-1, 1]")
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    p.add_argument("--seeds", type=common.seed_list, default=[0, 1, 2])
    p.add_argument("--dim", type=checked(int, lambda v: v >= 2, "an integer >= 2 (two "
                                         "orthogonal directions)"), default=100,
                   help="input dimension d")
    p.add_argument("--m", type=non_negative_int, default=10, help="number of sine terms")
    p.add_argument("--c", type=positive_float, default=1.0, help="scale of the weight vectors")
    p.add_argument("--alpha-max", type=checked(float, lambda v: 0.5 < v < 1e6, "a number > 0.5"),
                   default=2.0, help="alpha_i ~ U(0.5, alpha_max): larger = wigglier, harder")
    p.add_argument("--noise", type=non_negative_float, default=0.01, help="label noise std")
    p.add_argument("--train-rows", type=positive_int, default=20000)
    p.add_argument("--test-rows", type=checked(int, lambda v: v >= 2, "an integer >= 2 (a "
                                               "variance needs two rows)"), default=5000)
    p.add_argument("--epochs", type=positive_int, default=30)
    p.add_argument("--batch-size", type=positive_int, default=256)
    p.add_argument("--lr", type=positive_float, default=1e-3)
    p.add_argument("--device", type=common.device_arg, default="auto",
                   help="auto | cpu | cuda | cuda:N")
    p.add_argument("--threads", type=positive_int, default=2, help="torch CPU threads")
    p.add_argument("--quick", action="store_true",
                   help="defaults 2 seeds, 3k rows, 8 epochs: ~20 s")
    p.add_argument("--out", default=None,
                   help="default results/stage3_task_correlation.md for the default run; "
                        "--quick: runs/quick/, other flags: runs/partial/")
    p.add_argument("--runs-dir", default=str(common.RUNS), help="where the JSON goes")
    args = common.parse_with_quick(p, argv, dict(seeds=[0, 1], train_rows=3000, epochs=8))
    args.device = common.resolve_device(args.device)
    args.out = str(args.out or common.results_file(argv, args.quick, "stage3_task_correlation",
                                                   args.device))
    args.seed_list = args.seeds
    return args


# -------------------------------------------------------------------------------------- data
def task_weights(p, dim, c, rng):
    """w1 = c u1, w2 = c (p u1 + sqrt(1-p^2) u2) with u1 ⟂ u2 unit vectors: cos(w1, w2) = p."""
    q, _ = np.linalg.qr(rng.standard_normal((dim, 2)))
    u1, u2 = q[:, 0], q[:, 1]
    return c * u1, c * (p * u1 + np.sqrt(1 - p ** 2) * u2)


def make_tasks(p, args, seed, n, part):
    """x (n, d) and y (n, 2) as float32 tensors. The seed fixes the tasks (u1, u2, alpha, beta)
    and, with part (0 train, 1 test), the rows: every p sees the same inputs, so the models
    differ only in how related the labels are."""
    rng = np.random.default_rng([seed, 7])
    w1, w2 = task_weights(p, args.dim, args.c, rng)
    alpha, beta = rng.uniform(0.5, args.alpha_max, args.m), rng.standard_normal(args.m)
    data_rng = np.random.default_rng([seed, 8, part])
    x = data_rng.standard_normal((n, args.dim))
    ys = []
    for w in (w1, w2):
        s = x @ w
        ys.append(s + np.sin(np.outer(s, alpha) + beta).sum(1)
                  + args.noise * data_rng.standard_normal(n))
    return torch.from_numpy(x).float(), torch.from_numpy(np.stack(ys, 1)).float()


# ---------------------------------------------------------------------------------- training
def train_one(name, x, y, x_test, y_test, args, seed):
    """Adam on the sum of the two tasks' MSE; normalized test MSE per task after each epoch.
    x, y, x_test, y_test are on args.device already (moved once, not per batch)."""
    setup(args.threads, seed)
    model = build_mtl(name, args.dim, 2, **MODELS[name]).to(args.device)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(seed)
    curve = []
    for _ in range(args.epochs):
        order = torch.randperm(len(y), generator=gen).to(args.device)
        for start in range(0, len(y), args.batch_size):
            idx = order[start:start + args.batch_size]
            loss = ((model(x[idx]) - y[idx]) ** 2).mean(0).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():  # MSE / Var(y): 1 - R^2, comparable across seeds and tasks
            curve.append((((model(x_test) - y_test) ** 2).mean(0) / y_test.var(0)).tolist())
    return curve, n_params(model)


# ------------------------------------------------------------------------------------ report
def report(args, argv, results, params, wall_s):
    lo, hi = min(args.corrs), max(args.corrs)
    lines = [
        "# Stage 3: task correlation vs architecture (the MMoE paper's synthetic experiment)",
        "", f"Normalized test MSE x 1000 (1000 * MSE / Var(y) = 1000 * (1 - R²), mean of the "
        f"two tasks) after {args.epochs} epochs, mean ± std over "
        f"seeds {','.join(map(str, args.seed_list))}; {args.train_rows:,} training rows, "
        f"d = {args.dim}, m = {args.m}. Lower is better. Label correlation = Pearson "
        "corr(y1, y2) on test rows.", "",
        "| model | params | " + " | ".join(f"p = {p:g}" for p in args.corrs)
        + f" | loss(p={lo:g}) / loss(p={hi:g}) | seeds beating shared-bottom at p={lo:g} |",
        "|---|---|" + "---|" * len(args.corrs) + "---|---|"]

    def finals(name, p):
        return np.array([1000 * np.mean(c[-1]) for c in results[name][p]])
    for name in args.models:
        ratio = finals(name, lo).mean() / finals(name, hi).mean()
        wins = ("-" if name == "shared_bottom" or "shared_bottom" not in args.models else
                f"{int(np.sum(finals(name, lo) < finals('shared_bottom', lo)))} of "
                f"{len(args.seed_list)}")
        lines.append(f"| {name} | {params[name]:,} | "
                     + " | ".join(mean_std(finals(name, p), 2) for p in args.corrs)
                     + f" | {ratio:.2f}× | {wins} |")
    corr = " | ".join(f"{np.mean(results['label_corr'][p]):.3f}" for p in args.corrs)
    lines.append(f"| label correlation | | {corr} | | |")
    lines += ["", f"Command: `{common.command_line(__file__, argv)}` ({wall_s / 60:.1f} min, "
              f"device {args.device}).", common.machine_line(args.device, args.threads)]
    return "\n".join(lines) + "\n"


def plot(args, results, path):
    plt = pyplot()
    fig, axes = plt.subplots(1, len(args.corrs), figsize=(4 * len(args.corrs), 3.5),
                             sharey=True, squeeze=False)
    for ax, p in zip(axes[0], args.corrs):
        for name in args.models:
            curves = np.array([[np.mean(e) for e in c] for c in results[name][p]])
            ax.plot(range(1, args.epochs + 1), curves.mean(0), label=name)
        ax.set(title=f"p = {p:g}", xlabel="epoch", yscale="log")
    axes[0][0].set_ylabel("test MSE / Var(y), mean of 2 tasks")
    axes[0][-1].legend()
    fig.tight_layout()
    save_figure(fig, path)


@common.one_line_errors()
def main(argv=None):
    args = parse_args(argv)
    for folder, flag in [(Path(args.out).parent, "--out"), (args.runs_dir, "--runs-dir")]:
        common.check_writable(folder, flag)
    t0 = time.perf_counter()
    results = {name: {p: [] for p in args.corrs} for name in args.models}
    results["label_corr"] = {p: [] for p in args.corrs}
    params = {}
    jobs = [(p, s) for p in args.corrs for s in args.seed_list]
    for p, seed in tqdm(jobs, desc="correlation x seed"):
        x, y = (t.to(args.device) for t in make_tasks(p, args, seed, args.train_rows, 0))
        x_test, y_test = make_tasks(p, args, seed, args.test_rows, 1)
        results["label_corr"][p].append(float(np.corrcoef(y_test.T.numpy())[0, 1]))
        x_test, y_test = x_test.to(args.device), y_test.to(args.device)
        for name in args.models:
            curve, params[name] = train_one(name, x, y, x_test, y_test, args, seed)
            results[name][p].append(curve)
    wall = time.perf_counter() - t0
    common.require_finite({f"{name} at p = {p:g}": [c[-1] for c in results[name][p]]
                           for name in args.models for p in args.corrs}, "the test MSE")
    table = report(args, argv, results, params, wall)
    out = Path(args.out)
    write_text(out, table)
    plot(args, results, out.with_suffix(".png"))
    write_json(Path(args.runs_dir) / (out.stem + ".json"),
               {"script": "stage3_advanced/02_task_correlation.py",
                "command": common.command_line(__file__, argv), "device": str(args.device),
                "config": {k: str(v) if k == "device" else v for k, v in vars(args).items()},
                "params": params, "wall_s": wall,
                "test_mse_curves": {n: {str(p): c for p, c in r.items()}
                                    for n, r in results.items()}})
    print(table)
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
