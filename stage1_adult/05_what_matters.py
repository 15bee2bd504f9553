"""Stage 1, step 5: what each choice is worth - numeric encoding, leakage, and the DataLoader.

What you learn here, with numbers measured on this machine:
  1. numeric encodings: the same MLP with numerics standardized, quantile-binned, piecewise-linear
     (PLE) and PLE + exact-value tokens for capital-gain/loss ("embedding 的真实用法");
  2. leakage: with marital-status and relationship as inputs (02 --keep-leaky) task B's AUC is
     ~1.0 and means nothing; income on all 14 columns is the standard Adult benchmark;
  3. the loader: TensorDataset + DataLoader (per-sample indexing + collate) vs slicing batches
     from preloaded tensors - same model, same data, samples/s of one training epoch.

Run:    python stage1_adult/05_what_matters.py [--seeds 0,1,2] [--threads 2]
Reads:  stage1_adult/adult_stage1.npz and adult_stage1_leaky.npz (02, with and without
        --keep-leaky)
Writes: results/stage1_encodings.md, runs/stage1_what_matters/metrics.json
Time:   ~8 min on 2 CPU cores.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from adult_data import load_numbered_script  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--npz", default=str(HERE / "adult_stage1.npz"), help="leak-free npz (02)")
    p.add_argument("--leaky-npz", default=str(HERE / "adult_stage1_leaky.npz"),
                   help="npz from 02 --keep-leaky")
    p.add_argument("--seeds", default="0,1,2", help="seeds per configuration")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--loader-repeats", type=int, default=3,
                   help="timed one-epoch runs per loader (the median is reported)")
    p.add_argument("--epochs", type=int, default=30, help="max epochs per training")
    p.add_argument("--runs-dir", default=str(ROOT / "runs"), help="where metrics.json goes")
    p.add_argument("--out-dir", default=str(ROOT / "results"), help="where the table goes")
    args = p.parse_args(argv)
    try:
        args.seed_list = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        p.error("--seeds is a comma-separated list of integers")
    return args


def mean_std(values):
    if not values:
        return "-"
    sd = statistics.pstdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {sd:.4f}"


def auc_cells(runs, split="test"):
    return {t: [r["splits"][split][t]["auc"] for r in runs if t in r["tasks"]]
            for t in ["income", "married"]}


def main(argv=None):
    args = parse_args(argv)
    trainer = load_numbered_script("03_train_mtml.py")
    t0 = time.perf_counter()
    common = ["--threads", str(args.threads), "--epochs", str(args.epochs)]
    results = {"encodings": [], "leakage": [], "loader": []}

    # 1. numeric encodings, multi-task, leak-free ------------------------------------------------
    for enc in trainer.ENCODINGS:
        runs = trainer.run_seeds(common + ["--npz", args.npz, "--num-encoding", enc],
                                 args.seed_list)
        row = {"encoding": enc, "test": auc_cells(runs), "val": auc_cells(runs, "val"),
               "parameters": runs[0]["parameters"]}
        results["encodings"].append(row)
        print(f"encoding {enc:<12} val income {mean_std(row['val']['income'])}  test income "
              f"{mean_std(row['test']['income'])} married {mean_std(row['test']['married'])}",
              flush=True)

    # 2. leakage: all 14 columns -------------------------------------------------------------
    for label, extra in [("all 14 columns, income only (standard benchmark)",
                          ["--tasks", "income"]),
                         ("all 14 columns, multi-task (task B leaked)", ["--tasks", "both"])]:
        runs = trainer.run_seeds(common + ["--npz", args.leaky_npz] + extra, args.seed_list)
        row = {"config": label, "test": auc_cells(runs)}
        results["leakage"].append(row)
        print(f"{label:<52} income {mean_std(row['test']['income'])} "
              f"married {mean_std(row['test']['married'])}", flush=True)

    # 3. the loader: samples/s of one training epoch, median of repeats ----------------------
    for loader in ["dataloader", "slice"]:
        speeds = [trainer.run(common[:2] + ["--npz", args.npz, "--loader", loader, "--epochs",
                                           "1", "--no-save", "--quiet", "--seed", str(i)]
                              )["train_samples_per_s"] for i in range(args.loader_repeats)]
        results["loader"].append({"loader": loader, "samples_per_s": speeds,
                                  "median": statistics.median(speeds)})
        print(f"loader {loader:<10} {statistics.median(speeds):,.0f} samples/s (median of "
              f"{len(speeds)})", flush=True)

    # report -----------------------------------------------------------------------------------
    seeds = f"{len(args.seed_list)} seeds"
    lines = ["# Stage 1: what each choice is worth", "",
             f"Adult, shared-bottom MLP, test AUC on adult.test (mean ± std over {seeds}); "
             "every choice was made on the validation split.", "",
             "## Numeric encodings (leak-free, multi-task)", "",
             "| numerics enter as | val income AUC | test income AUC | test married AUC | "
             "parameters |", "|---|---|---|---|---|"]
    lines += [f"| `{r['encoding']}` | {mean_std(r['val']['income'])} | "
              f"{mean_std(r['test']['income'])} | {mean_std(r['test']['married'])} | "
              f"{r['parameters']:,} |" for r in results["encodings"]]
    lines += ["", "## Leakage (02 --keep-leaky, numerics `ple+tokens`)", "",
              "| inputs and tasks | income AUC | married AUC |", "|---|---|---|"]
    lines += [f"| {r['config']} | {mean_std(r['test']['income'])} | "
              f"{mean_std(r['test']['married'])} |" for r in results["leakage"]]
    base = results["loader"][0]["median"]
    lines += ["", f"## Loader (one training epoch, {args.threads} threads, batch 256, median of "
              f"{args.loader_repeats})", "", "| loader | train samples/s | vs DataLoader |",
              "|---|---|---|"]
    lines += [f"| `{r['loader']}` | {r['median']:,.0f} | {r['median'] / base:.2f}× |"
              for r in results["loader"]]
    lines += ["", f"Written by `python stage1_adult/05_what_matters.py --seeds {args.seeds} "
              f"--threads {args.threads}` in {time.perf_counter() - t0:.0f} s."]
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    trainer.atomic_write(out_dir / "stage1_encodings.md",
                         lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"))
    run_dir = Path(args.runs_dir) / "stage1_what_matters"
    run_dir.mkdir(parents=True, exist_ok=True)
    summary = {"script": "stage1_adult/05_what_matters.py", "model": "shared_bottom_mlp",
               "dataset": "adult", "device": "cpu", "seed": args.seed_list, "config": vars(args),
               "results": results, "wall_s": time.perf_counter() - t0}
    trainer.atomic_write(run_dir / "metrics.json",
                         lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=1)))
    print(f"wrote {out_dir / 'stage1_encodings.md'}")


if __name__ == "__main__":
    main()
