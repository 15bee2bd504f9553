"""Stage 1, step 4: the multi-task trade-off - how much should task B (married) weigh?

What you learn here: in L = wA*LA + wB*LB the auxiliary weight wB is a knob, not a constant.
We sweep wB in {0, 0.1, 0.3, 1, 3} with wA = 1, next to the two single-task baselines, 3 seeds
each, and read off whether sharing a backbone with task B helps, hurts or does nothing for income
(and vice versa). Whatever it shows is the result: auxiliary tasks do not help by default.

Run:    python stage1_adult/04_mtml_tradeoff.py [--seeds 0,1,2] [--threads 2]
Read with it: stage1_adult/mtml.py (every training here is one mtml.run(config)).
Reads:  stage1_adult/adult_stage1.npz (from 02_preprocess.py, leak-free)
Writes: results/stage1_tradeoff.md + .png (only the default run: other flags write to
        runs/partial/), runs/stage1_tradeoff/metrics.json
Time:   ~6-8 min on 2 CPU cores (21 trainings).
"""
import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: plain imports
import numpy as np  # noqa: E402

import common  # noqa: E402
from stage1_adult import mtml  # noqa: E402

HERE = Path(__file__).resolve().parent


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--npz", default=str(HERE / "adult_stage1.npz"), help="output of 02")
    p.add_argument("--wB", type=common.non_negative_float_list, default=[0, 0.1, 0.3, 1, 3],
                   help="auxiliary weights to sweep (wA = 1)")
    p.add_argument("--seeds", type=common.seed_list, default=[0, 1, 2],
                   help="seeds per configuration")
    p.add_argument("--threads", type=common.positive_int, default=2, help="torch CPU threads")
    p.add_argument("--device", type=common.device_arg, default="cpu",
                   help="cpu (the committed tables) | cuda | cuda:N | auto; any other than cpu "
                        "is a non-default run: its table goes to runs/partial/")
    p.add_argument("--epochs", type=common.positive_int, default=30,
                   help="max epochs per training")
    p.add_argument("--runs-dir", default=str(common.RUNS), help="where metrics.json goes")
    p.add_argument("--out-dir", default=None,
                   help="where the table/plot go (default results/ for the default run, "
                        "runs/partial/ with other flags)")
    args = p.parse_args(argv)
    args.wB_list, args.seed_list = args.wB, args.seeds
    args.out_dir = Path(args.out_dir or common.results_folder(argv))
    return args


@common.one_line_errors(mtml.NpzError)
def main(argv=None):
    args = parse_args(argv)
    for folder, flag in [(args.out_dir, "--out-dir"), (args.runs_dir, "--runs-dir")]:
        common.check_writable(folder, flag)
    t0 = time.perf_counter()
    base = mtml.MTMLConfig(npz=args.npz, threads=args.threads, epochs=args.epochs,
                           device=args.device)
    device = common.resolve_device(base.device)
    configs = [(f"multi-task wA=1 wB={w:g}", replace(base, tasks="both", wB=w))
               for w in args.wB_list]
    configs += [("single-task income", replace(base, tasks="income")),
                ("single-task married", replace(base, tasks="married"))]
    rows = []
    for label, cfg in configs:
        runs = mtml.run_seeds(cfg, args.seed_list)
        row = {"config": label, "tasks": cfg.tasks, "wB": cfg.wB, "runs": len(runs)}
        for task in ["income", "married"]:
            row[task] = [r["splits"]["test"][task]["auc"] for r in runs if task in r["tasks"]]
            row[task + "_val"] = [r["splits"]["val"][task]["auc"] for r in runs
                                  if task in r["tasks"]]
        rows.append(row)
        print(f"{label:<26} income {common.mean_std(row['income']):<17} "
              f"married {common.mean_std(row['married'])}", flush=True)

    out_dir = args.out_dir
    lines = ["# Stage 1: the multi-task trade-off on Adult (leak-free inputs)", "",
             f"Test AUC (adult.test, {len(args.seed_list)} seeds, mean ± std); early stopping on "
             "validation income AUC (married AUC for the married-only model). "
             "wB = 0 trains the married head not at all: its AUC there is that of an untrained "
             "head on the shared features.", "",
             "| configuration | income AUC | married AUC |", "|---|---|---|"]
    lines += [f"| {r['config']} | {common.mean_std(r['income'])} | "
              f"{common.mean_std(r['married'])} |"
              for r in rows]
    lines += ["", f"Command: `{common.command_line(__file__, argv)}` "
              f"({time.perf_counter() - t0:.0f} s, device {device}).",
              common.machine_line(device, args.threads)]
    common.write_text(out_dir / "stage1_tradeoff.md", "\n".join(lines) + "\n")

    plt = common.pyplot()
    multi = rows[:len(args.wB_list)]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, task, single in [(axes[0], "income", rows[-2]), (axes[1], "married", rows[-1])]:
        xs = [i for i, r in enumerate(multi) if r[task]]
        ax.errorbar(xs, [np.mean(multi[i][task]) for i in xs],
                    yerr=[np.std(multi[i][task]) for i in xs], marker="o", capsize=3,
                    label="multi-task")
        ax.axhline(np.mean(single[task]), color="gray", ls="--", label=f"single-task {task}")
        ax.set_xticks(range(len(multi)), [f"{w:g}" for w in args.wB_list])
        ax.set(xlabel="wB (wA = 1)", ylabel="test AUC", title=f"{task}")
        ax.legend(fontsize=8)
    fig.suptitle("Adult: task weight trade-off (mean ± std over seeds)")
    fig.tight_layout()
    common.save_figure(fig, out_dir / "stage1_tradeoff.png")

    run_dir = Path(args.runs_dir) / "stage1_tradeoff"
    summary = {"script": "stage1_adult/04_mtml_tradeoff.py", "model": "shared_bottom_mlp",
               "dataset": Path(args.npz).name, "device": str(device), "seed": args.seed_list,
               "command": common.command_line(__file__, argv),
               "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
               "rows": rows, "wall_s": time.perf_counter() - t0}
    common.write_json(run_dir / "metrics.json", summary)
    print(f"wrote {out_dir / 'stage1_tradeoff.md'} and stage1_tradeoff.png")


if __name__ == "__main__":
    main()
