"""Stage 3, step 3: multi-task CTR - click and conversion from one model, at two task correlations.

What you learn here: the recommender version of step 1. The two-label synthetic Criteo-format
data of stage2_ctr/01_make_subset.py (--tasks 2: label = click, second column = conversion,
whose logit is task_corr * click signal + sqrt(1 - task_corr^2) * its own signal) lets us set how
related the tasks are and know each task's best possible AUC (the oracle). Shared-bottom, MMoE and
PLE share Stage 2's field embedding (one hashed table, sparse gradients + RowSparseAdam) and an
equal parameter budget in the multi-task part; the table shows each task's AUC and its gap to the
oracle at a high and a low task correlation.

Run:    python stage3_advanced/03_mtl_ctr.py --make-data       # 400k rows per corr, ~6 min
        python stage3_advanced/03_mtl_ctr.py --quick --make-data   # 40k rows, ~1 min
Reads:  stage3_advanced/data/mtl_ctr_corr{r}/{train,val,test}.txt + meta.json, made by
        python stage2_ctr/01_make_subset.py --synthetic N --tasks 2 --task-corr r --out-dir ...
        (--make-data runs that command when the folder is missing)
Writes: results/stage3_mtl_ctr.md + .png (only the default run: --quick writes to runs/quick/,
        other flags to runs/partial/, CUDA to *_cuda.md), runs/stage3_mtl_ctr.json
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: plain imports
import common  # noqa: E402
from common import (checked, correlation, mean_std, non_negative_int,  # noqa: E402
                    positive_int, pyplot, save_figure, write_json, write_text)
from stage2_ctr import synthetic, train_stats  # noqa: E402
from stage2_ctr.models import criteo_schema  # noqa: E402
from stage2_ctr.models.mtl import CTRMultiTask, build_mtl, n_params, width_for_budget  # noqa: E402
from stage2_ctr.training import CTRInputs, FitError, auc_per_task, bce, fit  # noqa: E402
from stage3_advanced.stage3_common import HERE, load_criteo, setup  # noqa: E402

ARCHS = ["shared_bottom", "mmoe", "ple", "single_task"]  # single_task: one model per task
TASKS = ["click", "conversion"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corrs", type=correlation, nargs="+", default=[0.9, 0.2],
                   help="--task-corr of the generator, one data set each")
    p.add_argument("--rows", type=checked(int, lambda v: v >= 100, "an integer >= 100"),
                   default=400_000, help="rows per data set (8:1:1 split)")
    p.add_argument("--data-root", default=str(HERE / "data"))
    p.add_argument("--make-data", action="store_true",
                   help="generate a missing data set with stage2_ctr/01_make_subset.py")
    p.add_argument("--seeds", type=common.seed_list, default=[0, 1])
    p.add_argument("--hash-bits", type=common.hash_bits, default=18)
    p.add_argument("--emb-dim", type=positive_int, default=8)
    p.add_argument("--bottom-width", type=checked(int, lambda v: v >= 2, "an integer >= 2"),
                   default=256, help="shared-bottom MLP [w, w/2]: its parameter count is the "
                                     "budget")
    p.add_argument("--experts", type=positive_int, default=4,
                   help="MMoE experts")
    p.add_argument("--ple-shared", type=non_negative_int, default=2)
    p.add_argument("--ple-specific", type=positive_int, default=1)
    p.add_argument("--lr", type=common.positive_float, default=2e-3)
    p.add_argument("--batch-size", type=positive_int, default=2048)
    p.add_argument("--epochs", type=positive_int, default=3)
    p.add_argument("--patience", type=positive_int, default=1)
    p.add_argument("--device", type=common.device_arg, default="auto",
                   help="auto | cpu | cuda | cuda:N")
    p.add_argument("--threads", type=positive_int, default=2, help="torch CPU threads")
    p.add_argument("--quick", action="store_true", help="defaults 40k rows, 1 seed, 2 epochs")
    p.add_argument("--out", default=None,
                   help="default results/stage3_mtl_ctr.md for the default run; --quick: "
                        "runs/quick/, other flags: runs/partial/")
    p.add_argument("--runs-dir", default=str(common.RUNS), help="where the JSON goes")
    args = common.parse_with_quick(p, argv, dict(rows=40_000, seeds=[0], epochs=2))
    args.device = common.resolve_device(args.device)
    args.out = str(args.out or common.results_file(argv, args.quick, "stage3_mtl_ctr",
                                                   args.device))
    args.seed_list = args.seeds
    return args


# -------------------------------------------------------------------------------------- data
def data_dir(args, corr):
    return Path(args.data_root) / f"mtl_ctr_{args.rows}_corr{corr:g}"


def ensure_data(args, corr):
    folder = data_dir(args, corr)
    if not (folder / "meta.json").exists():
        if not args.make_data:
            sys.exit(f"error: {folder}/meta.json not found: run `python stage2_ctr/"
                     f"01_make_subset.py --synthetic {args.rows} --tasks 2 --task-corr {corr} "
                     f"--out-dir {folder}` first (or add --make-data)")
        synthetic.make_synthetic(synthetic.SyntheticConfig(rows=args.rows, tasks=2,
                                                           task_corr=corr), folder)
    return folder


def load_split_set(args, folder):
    stats = train_stats.fit_stats([folder / "train.txt"], n_labels=2)
    data = {s: load_criteo(folder / f"{s}.txt", 2, args.hash_bits, stats)
            for s in ["train", "val", "test"]}
    meta = json.loads((folder / "meta.json").read_text())
    return data, meta["splits"]["test"]


# ------------------------------------------------------------------------------------- model
def block_kwargs(args, arch):
    kw = dict(depth=2, tower=(32,), n_experts=args.experts, n_shared=args.ple_shared,
              n_specific=args.ple_specific, batch_norm=True)
    in_dim = criteo_schema().n_fields * args.emb_dim
    if arch in ("shared_bottom", "single_task"):
        return dict(kw, width=args.bottom_width)
    budget = n_params(build_mtl("shared_bottom", in_dim, 2, width=args.bottom_width, **kw))
    return dict(kw, width=width_for_budget(arch, in_dim, 2, budget, **kw))


def train_eval(args, data, arch, n_tasks, seed):
    setup(args.threads, seed)
    kw = block_kwargs(args, arch)
    block = "shared_bottom" if arch == "single_task" else arch
    model = CTRInputs(CTRMultiTask(criteo_schema(args.hash_bits), block, n_tasks, args.emb_dim,
                                   sparse=True, **kw))
    info = fit(model, data["train"], data["val"], bce, lr=args.lr,
               batch_size=args.batch_size, epochs=args.epochs, patience=args.patience,
               seed=seed, desc=f"{arch} s{seed}", device=args.device)
    return {"arch": arch, "seed": seed, "width": kw["width"],
            "block_params": n_params(model.model.block),
            "test_auc": auc_per_task(model, data["test"]), "best_epoch": info["best_epoch"],
            "train_samples_per_s": info["train_samples_per_s"]}


def run_one(args, data, arch, seed):
    """One multi-task model, or (single_task) one shared-bottom model per task, its AUCs
    put side by side."""
    if arch != "single_task":
        return train_eval(args, data, arch, 2, seed)
    per_task = [train_eval(args, {s: (x, y[:, [t]]) for s, (x, y) in data.items()}, arch, 1,
                           seed) for t in range(2)]
    return dict(per_task[0], test_auc=[r["test_auc"][0] for r in per_task],
                train_samples_per_s=float(np.mean([r["train_samples_per_s"]
                                                   for r in per_task])))


# ------------------------------------------------------------------------------------ report
def report(args, argv, results, wall_s):
    lines = ["# Stage 3: multi-task CTR (click + conversion) on synthetic Criteo-format data",
             "", f"{args.rows:,} rows per data set (8:1:1), test AUC mean ± std over seeds "
             f"{','.join(map(str, args.seed_list))}; gap = oracle AUC - model AUC on the same "
             "test rows (smaller is better). Multi-task part at the shared-bottom's budget "
             f"(MLP [{args.bottom_width}, {args.bottom_width // 2}], towers [32]); embedding "
             f"{args.emb_dim}-d over "
             f"2^{args.hash_bits} buckets. single_task = one shared-bottom model per task "
             "(params per model). The click labels and features are the same in every data "
             "set (same seed); only the conversion label changes with the task correlation.",
             "",
             "| task corr | label corr | model | width | params | click AUC | click gap | "
             "conversion AUC | conversion gap |", "|---|---|---|---|---|---|---|---|---|"]
    for corr, r in results.items():
        oracle = r["oracle_auc"]
        for arch in ARCHS:
            runs = [x for x in r["runs"] if x["arch"] == arch]
            auc = np.array([x["test_auc"] for x in runs])
            lines.append(
                f"| {corr:g} | {r['label_corr']:.3f} | {arch} | {runs[0]['width']} | "
                f"{runs[0]['block_params']:,} | {mean_std(auc[:, 0])} | "
                f"{oracle[0] - auc[:, 0].mean():.4f} | {mean_std(auc[:, 1])} | "
                f"{oracle[1] - auc[:, 1].mean():.4f} |")
        lines.append(f"| {corr:g} | | oracle | | | {oracle[0]:.4f} | 0 | {oracle[1]:.4f} | 0 |")
    lines += ["", f"Command: `{common.command_line(__file__, argv)}` ({wall_s / 60:.1f} min, "
              f"device {args.device}).", common.machine_line(args.device, args.threads)]
    return "\n".join(lines) + "\n"


def plot(results, path):
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5), sharey=True)
    width = 0.8 / len(ARCHS)
    for ax, t in zip(axes, range(2)):
        for i, arch in enumerate(ARCHS):
            gaps = [r["oracle_auc"][t] - np.mean([x["test_auc"][t] for x in r["runs"]
                                                  if x["arch"] == arch])
                    for r in results.values()]
            ax.bar(np.arange(len(results)) + i * width, gaps, width, label=arch)
        ax.set_xticks(np.arange(len(results)) + width, [f"corr {c:g}" for c in results])
        ax.set(title=f"{TASKS[t]}: AUC gap to the oracle", ylabel="oracle AUC - model AUC")
    axes[0].legend()
    fig.tight_layout()
    save_figure(fig, path)


@common.one_line_errors(FitError)
def main(argv=None):
    args = parse_args(argv)
    for folder, flag in [(Path(args.out).parent, "--out"), (args.runs_dir, "--runs-dir")]:
        common.check_writable(folder, flag)
    t0 = time.perf_counter()
    results = {}
    for corr in args.corrs:
        folder = ensure_data(args, corr)
        data, test_meta = load_split_set(args, folder)
        y = data["test"][1].numpy()
        results[corr] = {"oracle_auc": test_meta["oracle_auc"],
                         "label_corr": float(np.corrcoef(y.T)[0, 1]), "runs": []}
        print(f"task corr {corr:g}: {len(data['train'][1]):,} train rows, positive rates "
              f"{y.mean(0).round(3).tolist()}, oracle test AUC "
              f"{[round(a, 4) for a in test_meta['oracle_auc']]}")
        for seed in args.seed_list:
            for arch in ARCHS:
                r = run_one(args, data, arch, seed)
                results[corr]["runs"].append(r)
                print(f"  seed {seed} {arch:<13} click {r['test_auc'][0]:.4f} conversion "
                      f"{r['test_auc'][1]:.4f} ({r['train_samples_per_s']:,.0f} samples/s)")
    wall = time.perf_counter() - t0
    common.require_finite({f"{r['arch']} at task corr {c:g} seed {r['seed']}": r["test_auc"]
                           for c, res in results.items() for r in res["runs"]}, "the test AUC")
    table = report(args, argv, results, wall)
    out = Path(args.out)
    write_text(out, table)
    plot(results, out.with_suffix(".png"))
    write_json(Path(args.runs_dir) / (out.stem + ".json"),
               {"script": "stage3_advanced/03_mtl_ctr.py",
                "command": common.command_line(__file__, argv), "device": str(args.device),
                "config": {k: str(v) if k == "device" else v for k, v in vars(args).items()},
                "results": {str(c): r for c, r in results.items()}, "wall_s": wall})
    print(table)
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
