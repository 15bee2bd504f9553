"""Stage 2, step 9: sparse rows + RowSparseAdam or a dense table + AdamW - does the choice move AUC?

What you learn here: `train_ctr.py --sparse-emb auto` picks the embedding optimizer by device -
sparse gradients and RowSparseAdam (lazy Adam: only the rows of the batch move) on the CPU,
a dense table with fused AdamW (every row's moments decay and every row moves each step) on
CUDA. They are two optimizers, not one optimizer on two devices. This chapter trains the same
runs both ways on the SAME device (the CPU), over training seeds and generated data sets, so
the difference is the optimizer's alone; and whether a GPU run of `make stage2` reproduces the
committed AUCs follows from it.

Read with it: stage2_ctr/training.py (make_optimizers), models/optim.py (RowSparseAdam).
Run:    python stage2_ctr/09_sparse_or_dense.py            # ~10 min on one core
        python stage2_ctr/09_sparse_or_dense.py --quick    # 20k rows, one seed: the code path
Writes: results/stage2_sparse_dense.md (only the default run; --quick: runs/quick/, other
        flags runs/partial/), runs/stage2_sparse_dense/metrics.json
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: plain imports
import common  # noqa: E402
from stage2_ctr import compare  # noqa: E402
from stage2_ctr.train_ctr import TrainConfig  # noqa: E402

HERE = Path(__file__).resolve().parent
LR = {"fm": 0.002, "deepfm": 0.002}  # the lowrank regime's picks (results/stage2_models.md)
VARIANTS = {"on": "sparse rows + RowSparseAdam (auto on CPU)",
            "off": "dense table + AdamW (auto on CUDA)"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", type=common.checked(str, lambda v: v in LR, f"one of {list(LR)}",
                                                   many=True), default=list(LR))
    p.add_argument("--rows", type=common.positive_int, default=300_000,
                   help="rows per generated data set (lowrank regime, 8:1:1)")
    p.add_argument("--seeds", type=common.seed_list, default=[0, 1, 2], help="training seeds")
    p.add_argument("--data-seeds", type=common.seed_list, default=[0, 1],
                   help="generator seeds: one data set each")
    p.add_argument("--epochs", type=common.positive_int, default=1)
    p.add_argument("--threads", type=common.positive_int, default=1)
    p.add_argument("--quick", action="store_true", help="20k rows, FM, one seed per kind")
    p.add_argument("--data-dir", default=str(HERE / "data"))
    p.add_argument("--runs-dir", default=str(common.RUNS))
    p.add_argument("--out-dir", default=None, help="where the table goes (default results/ for "
                   "the default run, runs/quick/ or runs/partial/ otherwise)")
    args = common.parse_with_quick(p, argv, dict(rows=20_000, models=["fm"], seeds=[0],
                                                 data_seeds=[0]))
    args.out = common.results_file(argv, args.quick, "stage2_sparse_dense")
    args.out = Path(args.out_dir) / args.out.name if args.out_dir else args.out
    return args


def config(args, model, sparse, seed, data_seed):
    folder = compare.dataset("lowrank", args.rows, args.data_dir, data_seed)
    return TrainConfig(model=model, seed=seed, train=[str(folder / "train.txt")],
                       val=[str(folder / "val.txt")], test=[str(folder / "test.txt")],
                       epochs=args.epochs, patience=1, lr=LR[model], sparse_emb=sparse,
                       device="cpu", threads=args.threads, num_workers=0, amp="off",
                       runs_dir=args.runs_dir,
                       run_name=f"sparse_dense_{model}_{sparse}_r{args.rows}_d{data_seed}_s{seed}")


def main(argv=None):
    args = parse_args(argv)
    for folder, flag in [(args.out.parent, "results folder"), (args.runs_dir, "--runs-dir")]:
        common.check_writable(folder, flag)
    t0 = time.perf_counter()
    results = {}
    for model in args.models:
        for sparse in VARIANTS:
            runs = [compare.train_quiet(config(args, model, sparse, s, d))
                    for d in args.data_seeds for s in args.seeds]
            results[f"{model}|{sparse}"] = {
                "test_auc": [r["splits"]["test"]["auc"] for r in runs],
                "val_auc": [r["splits"]["val"]["auc"] for r in runs],
                "samples_per_s": statistics.median(r["train_samples_per_s"] for r in runs)}
            print(f"{model:<7} sparse-emb {sparse:<3} test AUC "
                  f"{common.mean_std(results[f'{model}|{sparse}']['test_auc'])}", flush=True)
    seconds = time.perf_counter() - t0
    lines = report(args, argv, results, seconds)
    common.require_finite({k: v["test_auc"] for k, v in results.items()}, "a test AUC")
    common.write_text(args.out, "\n".join(lines) + "\n")
    common.write_json(Path(args.runs_dir) / "stage2_sparse_dense" / "metrics.json", {
        "script": "stage2_ctr/09_sparse_or_dense.py", "command": common.command_line(
            __file__, argv), "results": results, "wall_s": seconds})
    print("\n".join(lines))
    print(f"wrote {args.out}")
    return results


def report(args, argv, results, seconds):
    n = len(args.seeds) * len(args.data_seeds)
    lines = ["# Stage 2: sparse rows + RowSparseAdam vs a dense table + AdamW, same device (CPU)",
             "", f"lowrank regime, {args.rows:,} rows per data set (8:1:1), {args.epochs} "
             f"epoch(s), batch 4096, fp32, {args.threads} thread(s); {len(args.seeds)} training "
             f"seeds x {len(args.data_seeds)} data sets = {n} runs per cell (mean ± std over "
             "all of them). The difference of a pair is taken per (data set, seed) pair.", "",
             "| model | embedding optimizer | val AUC | test AUC | samples/s |",
             "|---|---|---|---|---|"]
    verdicts = []
    for model in args.models:
        for sparse, name in VARIANTS.items():
            r = results[f"{model}|{sparse}"]
            lines.append(f"| {model} | {name} | {common.mean_std(r['val_auc'])} | "
                         f"{common.mean_std(r['test_auc'])} | {r['samples_per_s']:,.0f} |")
        on, off = results[f"{model}|on"]["test_auc"], results[f"{model}|off"]["test_auc"]
        diffs = [a - b for a, b in zip(on, off)]
        k = len(args.seeds)  # runs are ordered data set by data set, seeds inside
        noise = statistics.mean(statistics.pstdev(cell[i:i + k]) for cell in (on, off)
                                for i in range(0, len(on), k))
        mean = statistics.mean(diffs)
        verdicts.append(f"- {model}: sparse - dense test AUC {mean:+.4f} (per pair "
                        f"{', '.join(f'{d:+.4f}' for d in diffs)}); training-seed std within "
                        f"a data set {noise:.4f}: " + ("within the seed noise" if abs(mean) <=
                                                       noise else "larger than the seed noise"))
    lines += ["", *verdicts, "",
              f"Command: `{common.command_line(__file__, argv)}` ({seconds / 60:.1f} min).",
              common.machine_line("cpu", args.threads)]
    return lines


if __name__ == "__main__":
    main()
