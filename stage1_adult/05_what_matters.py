"""Stage 1, step 5: what each choice is worth - numeric encoding, leakage, and the DataLoader.

What you learn here, with numbers measured on this machine:
  1. numeric encodings: the same MLP with numerics standardized, quantile-binned, piecewise-linear
     (PLE) and PLE + exact-value tokens for capital-gain/loss ("embedding 的真实用法");
  2. leakage: with marital-status and relationship as inputs (02 --keep-leaky) task B's AUC is
     ~1.0 and means nothing; income on all 14 columns is the standard Adult benchmark;
  3. the loader: TensorDataset + DataLoader (per-sample indexing + collate) vs slicing batches
     from preloaded tensors - same model, same data, samples/s of one training epoch.

Read with it: stage1_adult/mtml.py (every training here is one mtml.run(config)).
Run:    python stage1_adult/05_what_matters.py [--seeds 0,1,2] [--threads 2]
Reads:  stage1_adult/adult_stage1.npz and adult_stage1_leaky.npz (02, with and without
        --keep-leaky)
Writes: results/stage1_encodings.md (only the default run: other flags write to runs/partial/),
        runs/stage1_what_matters/metrics.json
Time:   ~8 min on 2 CPU cores.
"""
import argparse
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: plain imports
import common  # noqa: E402
from stage1_adult import mtml  # noqa: E402

HERE = Path(__file__).resolve().parent


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--npz", default=str(HERE / "adult_stage1.npz"), help="leak-free npz (02)")
    p.add_argument("--leaky-npz", default=str(HERE / "adult_stage1_leaky.npz"),
                   help="npz from 02 --keep-leaky")
    p.add_argument("--seeds", type=common.seed_list, default=[0, 1, 2],
                   help="seeds per configuration")
    p.add_argument("--threads", type=common.positive_int, default=2, help="torch CPU threads")
    p.add_argument("--device", type=common.device_arg, default="cpu",
                   help="cpu (the committed tables) | cuda | cuda:N | auto; any other than cpu "
                        "is a non-default run: its table goes to runs/partial/")
    p.add_argument("--loader-repeats", type=common.positive_int, default=3,
                   help="timed one-epoch runs per loader (the median is reported)")
    p.add_argument("--epochs", type=common.positive_int, default=30,
                   help="max epochs per training")
    p.add_argument("--runs-dir", default=str(common.RUNS), help="where metrics.json goes")
    p.add_argument("--out-dir", default=None,
                   help="where the table goes (default results/ for the default run, "
                        "runs/partial/ with other flags)")
    args = p.parse_args(argv)
    args.seed_list = args.seeds
    args.out_dir = Path(args.out_dir or common.results_folder(argv))
    return args


def auc_cells(runs, split="test"):
    return {t: [r["splits"][split][t]["auc"] for r in runs if t in r["tasks"]]
            for t in ["income", "married"]}


@common.one_line_errors(mtml.NpzError)
def main(argv=None):
    args = parse_args(argv)
    for folder, flag in [(args.out_dir, "--out-dir"), (args.runs_dir, "--runs-dir")]:
        common.check_writable(folder, flag)
    t0 = time.perf_counter()
    base = mtml.MTMLConfig(npz=args.npz, threads=args.threads, epochs=args.epochs,
                           device=args.device)
    device = common.resolve_device(base.device)
    results = {"encodings": [], "leakage": [], "loader": []}

    # 1. numeric encodings, multi-task, leak-free ------------------------------------------------
    for enc in mtml.ENCODINGS:
        runs = mtml.run_seeds(replace(base, num_encoding=enc), args.seed_list)
        row = {"encoding": enc, "test": auc_cells(runs), "val": auc_cells(runs, "val"),
               "parameters": runs[0]["parameters"]}
        results["encodings"].append(row)
        print(f"encoding {enc:<12} val income {common.mean_std(row['val']['income'])}  test income "
              f"{common.mean_std(row['test']['income'])} married "
              f"{common.mean_std(row['test']['married'])}",
              flush=True)

    # 2. leakage: all 14 columns -------------------------------------------------------------
    for label, tasks in [("all 14 columns, income only (standard benchmark)", "income"),
                         ("all 14 columns, multi-task (task B leaked)", "both")]:
        runs = mtml.run_seeds(replace(base, npz=args.leaky_npz, tasks=tasks), args.seed_list)
        row = {"config": label, "test": auc_cells(runs)}
        results["leakage"].append(row)
        print(f"{label:<52} income {common.mean_std(row['test']['income'])} "
              f"married {common.mean_std(row['test']['married'])}", flush=True)

    # 3. the loader: samples/s of one training epoch, median of repeats ----------------------
    for loader in ["dataloader", "slice"]:
        speeds = [mtml.run(replace(base, loader=loader, epochs=1, seed=i), quiet=True)
                  ["train_samples_per_s"] for i in range(args.loader_repeats)]
        results["loader"].append({"loader": loader, "samples_per_s": speeds,
                                  "median": statistics.median(speeds)})
        print(f"loader {loader:<10} {statistics.median(speeds):,.0f} samples/s (median of "
              f"{len(speeds)})", flush=True)

    # report -----------------------------------------------------------------------------------
    seconds = time.perf_counter() - t0
    out_dir = args.out_dir
    common.write_text(out_dir / "stage1_encodings.md",
                      "\n".join(report(args, argv, results, seconds, device)) + "\n")
    summary = {"script": "stage1_adult/05_what_matters.py", "model": "shared_bottom_mlp",
               "dataset": "adult", "device": str(device), "seed": args.seed_list,
               "command": common.command_line(__file__, argv),
               "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
               "results": results, "wall_s": seconds}
    common.write_json(Path(args.runs_dir) / "stage1_what_matters" / "metrics.json", summary)
    print(f"wrote {out_dir / 'stage1_encodings.md'}")


def report(args, argv, results, seconds, device):
    """The markdown lines of results/stage1_encodings.md."""
    lines = ["# Stage 1: what each choice is worth", "",
             f"Adult, shared-bottom MLP, test AUC on adult.test (mean ± std over "
             f"{len(args.seed_list)} seeds); every choice was made on the validation split.", "",
             "## Numeric encodings (leak-free, multi-task)", "",
             "| numerics enter as | val income AUC | test income AUC | test married AUC | "
             "parameters |", "|---|---|---|---|---|"]
    lines += [f"| `{r['encoding']}` | {common.mean_std(r['val']['income'])} | "
              f"{common.mean_std(r['test']['income'])} | {common.mean_std(r['test']['married'])} | "
              f"{r['parameters']:,} |" for r in results["encodings"]]
    lines += ["", "## Leakage (02 --keep-leaky, numerics `ple+tokens`)", "",
              "| inputs and tasks | income AUC | married AUC |", "|---|---|---|"]
    lines += [f"| {r['config']} | {common.mean_std(r['test']['income'])} | "
              f"{common.mean_std(r['test']['married'])} |" for r in results["leakage"]]
    base = results["loader"][0]["median"]
    lines += ["", f"## Loader (one training epoch, {args.threads} threads, batch 256, median of "
              f"{args.loader_repeats})", "", "| loader | train samples/s | vs DataLoader |",
              "|---|---|---|"]
    lines += [f"| `{r['loader']}` | {r['median']:,.0f} | {r['median'] / base:.2f}× |"
              for r in results["loader"]]
    lines += ["", f"Command: `{common.command_line(__file__, argv)}` ({seconds:.0f} s, device "
              f"{device}).", common.machine_line(device, args.threads)]
    return lines


if __name__ == "__main__":
    main()
