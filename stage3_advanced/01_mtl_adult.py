"""Stage 3, step 1: shared-bottom vs MMoE vs PLE on Adult (income + married), equal budget.

What you learn here: the three classic multi-task architectures as short compositions of the
same blocks (experts, softmax gates, towers); how to compare them fairly (the same inputs, the
same number of parameters in the multi-task part, several seeds, single-task baselines next to
them); and what the gates actually do (which experts each task leans on). On two related tasks
with ~28k rows the honest answer may well be "no difference": the table says what it says.

Run:    python stage3_advanced/01_mtl_adult.py                 # 5 seeds, ~5 min on 2 CPU cores
        python stage3_advanced/01_mtl_adult.py --quick         # 2 seeds, 6 epochs, ~1 min
Reads:  stage1_adult/adult_stage1.npz (+ _meta.json) from stage1_adult/02_preprocess.py
Writes: results/stage3_mtl_adult.md + .png (only the default run: --quick writes to runs/quick/,
        other flags to runs/partial/, CUDA to *_cuda.md), runs/stage3_mtl_adult.json
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: plain imports
import common  # noqa: E402
from common import (mean_std, non_negative_int, positive_int, pyplot,  # noqa: E402
                    save_figure, write_json, write_text)
from stage2_ctr.models.mtl import build_mtl, n_params, width_for_budget  # noqa: E402
from stage2_ctr.training import (FitError, auc_per_task, bce, fit,  # noqa: E402
                                 predict_in_memory)
from stage3_advanced.stage3_common import (ADULT_NPZ, ADULT_TASKS, AdultMultiTask,  # noqa: E402
                                           load_adult, setup)

ARCHS = ["shared_bottom", "mmoe", "ple"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--npz", default=str(ADULT_NPZ), help="leak-free npz of stage1 02")
    p.add_argument("--seeds", type=common.seed_list, default=[0, 1, 2, 3, 4])
    p.add_argument("--bottom-width", type=common.checked(int, lambda v: v >= 2, "an integer >= 2"),
                   default=256, help="shared-bottom MLP: [w, w/2]; its parameter count is the "
                                     "budget")
    p.add_argument("--tower", type=common.layer_list, default=(32,),
                   help="hidden sizes of each task tower")
    p.add_argument("--experts", type=positive_int, default=4, help="MMoE experts")
    p.add_argument("--ple-shared", type=non_negative_int, default=2,
                   help="PLE shared experts")
    p.add_argument("--ple-specific", type=positive_int, default=1, help="PLE experts per task")
    p.add_argument("--emb-dim", type=positive_int, default=8)
    p.add_argument("--dropout", type=common.probability, default=0.2)
    p.add_argument("--lr", type=common.positive_float, default=2e-3)
    p.add_argument("--weight-decay", type=common.non_negative_float, default=1e-4)
    p.add_argument("--batch-size", type=positive_int, default=512)
    p.add_argument("--epochs", type=positive_int, default=25)
    p.add_argument("--patience", type=positive_int, default=4)
    p.add_argument("--device", type=common.device_arg, default="auto",
                   help="auto | cpu | cuda | cuda:N")
    p.add_argument("--threads", type=positive_int, default=2, help="torch CPU threads")
    p.add_argument("--quick", action="store_true",
                   help="defaults 2 seeds, 6 epochs: a ~1 minute look")
    p.add_argument("--out", default=None,
                   help="default results/stage3_mtl_adult.md for the default run; --quick: "
                        "runs/quick/, other flags: runs/partial/ (the committed table stays)")
    p.add_argument("--runs-dir", default=str(common.RUNS), help="where the JSON goes")
    args = common.parse_with_quick(p, argv, dict(seeds=[0, 1], epochs=6))
    args.device = common.resolve_device(args.device)
    args.out = str(args.out or common.results_file(argv, args.quick, "stage3_mtl_adult",
                                                   args.device))
    args.seed_list, args.tower_sizes = args.seeds, tuple(args.tower)
    return args


def block_kwargs(args, arch, n_tasks, in_dim):
    """Equal budget: the shared-bottom's MLP sets the parameter count; MMoE / PLE get the
    widest experts (two layers, [w, w/2]) that fit in it."""
    kw = dict(depth=2, tower=args.tower_sizes, dropout=args.dropout, n_experts=args.experts,
              n_shared=args.ple_shared, n_specific=args.ple_specific)
    if arch == "shared_bottom":
        return dict(kw, width=args.bottom_width)
    budget = n_params(build_mtl("shared_bottom", in_dim, 2, width=args.bottom_width, **kw))
    return dict(kw, width=width_for_budget(arch, in_dim, n_tasks, budget, **kw))


def gate_usage(model, test_inputs, rows=4096):
    """Mean gate weight per expert for each task on test rows (MMoE / PLE): do the tasks lean
    on different experts, or has every gate collapsed onto the same one?"""
    gates = getattr(model.block, "gates", None) or model.block.levels[-1].task_gates
    seen = {}  # gate -> its weights on the rows, computed from the gate's input by a hook

    def keep_weights(gate, args):  # a forward pre-hook: returns None, the call goes on unchanged
        seen[gate] = gate.weights(args[0])
    hooks = [g.register_forward_pre_hook(keep_weights) for g in gates]
    predict_in_memory(model, {k: v[:rows] for k, v in test_inputs.items()}, batch_size=rows)
    for h in hooks:
        h.remove()
    return [seen[g].mean(0).tolist() for g in gates]


def run_config(args, data, meta, arch, tasks, seed):
    setup(args.threads, seed)
    task_idx = [ADULT_TASKS.index(t) for t in tasks]
    split = {s: (x, y[:, task_idx]) for s, (x, y) in data.items()}
    probe = AdultMultiTask(meta, "shared_bottom", len(tasks), args.emb_dim, width=4)
    kw = block_kwargs(args, arch, len(tasks), probe.encoder.out_dim)
    setup(args.threads, seed)
    model = AdultMultiTask(meta, arch, len(tasks), args.emb_dim, **kw)
    info = fit(model, split["train"], split["val"], bce, lr=args.lr,
               weight_decay=args.weight_decay, batch_size=args.batch_size, epochs=args.epochs,
               patience=args.patience, seed=seed, desc=f"{arch} {'+'.join(tasks)} s{seed}",
               device=args.device)
    test_auc = auc_per_task(model, split["test"])
    out = {"arch": arch, "tasks": tasks, "seed": seed, "width": kw["width"],
           "block_params": n_params(model.block), "params": n_params(model),
           "test_auc": dict(zip(tasks, test_auc)), **info}
    if arch != "shared_bottom":
        out["gate_usage"] = gate_usage(model, split["test"][0])
    return out


def report(args, argv, runs, wall_s):
    def aucs(arch, tasks, task):
        return [r["test_auc"][task] for r in runs if r["arch"] == arch and r["tasks"] == tasks]

    single = {t: aucs("shared_bottom", [t], t) for t in ADULT_TASKS}
    lines = [
        "# Stage 3: multi-task architectures on Adult (income + married)", "",
        f"Test AUC, mean ± std over seeds {','.join(map(str, args.seed_list))}; leak-free "
        "inputs (Stage 1 npz without "
        "marital-status/relationship); early stopping on the mean validation AUC.",
        f"Multi-task part sized to the shared-bottom's budget (MLP [{args.bottom_width}, "
        f"{args.bottom_width // 2}], towers {list(args.tower_sizes)}).", "",
        "| model | experts (width) | multi-task params | income AUC | married AUC | "
        "Δ income vs single | Δ married vs single |", "|---|---|---|---|---|---|---|"]
    for arch in ARCHS:
        r0 = next(r for r in runs if r["arch"] == arch and len(r["tasks"]) == 2)
        experts = {"shared_bottom": "1 shared MLP", "mmoe": f"{args.experts} shared",
                   "ple": f"{args.ple_shared} shared + {args.ple_specific}/task"}[arch]
        inc, mar = aucs(arch, ADULT_TASKS, "income"), aucs(arch, ADULT_TASKS, "married")
        lines.append(f"| {arch} | {experts} ({r0['width']}) | {r0['block_params']:,} | "
                     f"{mean_std(inc)} | {mean_std(mar)} | "
                     f"{np.mean(inc) - np.mean(single['income']):+.4f} | "
                     f"{np.mean(mar) - np.mean(single['married']):+.4f} |")
    for t in ADULT_TASKS:
        r0 = next(r for r in runs if r["tasks"] == [t])
        cells = [mean_std(single[t]) if t == u else "-" for u in ADULT_TASKS]
        lines.append(f"| single-task {t} | 1 MLP ({r0['width']}) | {r0['block_params']:,} | "
                     f"{cells[0]} | {cells[1]} | | |")
    lines += ["", "Gate usage on 4096 test rows (mean softmax weight per expert, seed "
              f"{args.seed_list[0]}; rows = tasks income, married):", ""]
    for arch in ["mmoe", "ple"]:
        r0 = next(r for r in runs if r["arch"] == arch and len(r["tasks"]) == 2)
        usage = "; ".join(" ".join(f"{w:.2f}" for w in g) for g in r0["gate_usage"])
        lines.append(f"- {arch}: {usage}" + (" (PLE: own experts first, then shared)"
                                              if arch == "ple" else ""))
    lines += ["", f"Command: `{common.command_line(__file__, argv)}` ({wall_s / 60:.1f} min, "
              f"device {args.device}).", common.machine_line(args.device, args.threads)]
    return "\n".join(lines) + "\n"


def plot(runs, path):
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, task in zip(axes, ADULT_TASKS):
        names = ARCHS + ["single-task"]
        vals = [[r["test_auc"][task] for r in runs if r["arch"] == a and len(r["tasks"]) == 2]
                for a in ARCHS] + [[r["test_auc"][task] for r in runs if r["tasks"] == [task]]]
        ax.bar(names, [np.mean(v) for v in vals], yerr=[np.std(v) for v in vals], capsize=4,
               color=["#888", "#4c72b0", "#dd8452", "#55a868"])
        lo = min(min(v) for v in vals)
        ax.set_ylim(lo - 0.01, max(max(v) for v in vals) + 0.004)
        ax.set(title=f"{task}: test AUC", ylabel="AUC")
    fig.tight_layout()
    save_figure(fig, path)


@common.one_line_errors(FitError)
def main(argv=None):
    args = parse_args(argv)
    for folder, flag in [(Path(args.out).parent, "--out"), (args.runs_dir, "--runs-dir")]:
        common.check_writable(folder, flag)
    t0 = time.perf_counter()
    data, meta = load_adult(args.npz)
    print(f"Adult: {len(data['train'][1]):,} train / {len(data['val'][1]):,} val / "
          f"{len(data['test'][1]):,} test rows | seeds {args.seed_list} | device {args.device}, "
          f"{args.threads} threads")
    configs = [(a, ADULT_TASKS) for a in ARCHS] + [("shared_bottom", [t]) for t in ADULT_TASKS]
    runs = []
    for seed in args.seed_list:
        for arch, tasks in configs:
            runs.append(run_config(args, data, meta, arch, tasks, seed))
            r = runs[-1]
            print(f"seed {seed} {arch:<13} {'+'.join(tasks):<15} "
                  + " ".join(f"{t} {a:.4f}" for t, a in r["test_auc"].items())
                  + f"  (epoch {r['best_epoch']}, {r['block_params']:,} block params)")
    wall = time.perf_counter() - t0
    common.require_finite({f"{r['arch']} {'+'.join(r['tasks'])} seed {r['seed']}":
                           list(r["test_auc"].values()) for r in runs}, "the test AUC")
    table = report(args, argv, runs, wall)
    out = Path(args.out)
    write_text(out, table)
    plot(runs, out.with_suffix(".png"))
    write_json(Path(args.runs_dir) / (out.stem + ".json"),
               {"script": "stage3_advanced/01_mtl_adult.py",
                "command": common.command_line(__file__, argv), "device": str(args.device),
                "config": {k: str(v) if k == "device" else v for k, v in vars(args).items()
                           if k != "tower_sizes"},
                "runs": [{k: v for k, v in r.items() if k != "history"} for r in runs],
                "wall_s": wall})
    print(table)
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
