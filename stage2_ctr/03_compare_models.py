"""Stage 2, step 3: explicit vs implicit crosses - every CTR model on three kinds of planted
interactions, against the oracle.

What you learn here: where FM / DeepFM / DCN have an advantage and where a plain DNN is enough.
The generator of 01 plants three regimes beside the same first-order weights (synthetic.py):
  lowrank    FM-like pairs of rank 4 over 14 small-vocabulary fields + three 3rd-order crosses:
             one low-rank quadratic that a ReLU MLP learns easily;
  dot        4 id fields (300 equally frequent values each, sparse side fields) whose every pair
             interacts through a 16-dim dot product: what an FM computes, and what an MLP over
             concatenated embeddings has to learn to multiply (see 04_can_an_mlp_multiply.py);
  fieldpair  a full-rank quadratic form, its own matrix per field pair (dense x dense and dense
             x categorical included): what a DCN-v2 cross layer can express and an FM cannot.
LR, FM, DNN, DeepFM, DCN and DCN-v2 get the same budget per regime; the learning rate is chosen
per model on validation (seed 0), then 3 seeds; test AUC, log loss and the gap to the oracle.
Plus a learning curve in the dot regime and what the frequency threshold (--min-count) is worth.

Read with it: stage2_ctr/synthetic.py (the regimes), stage2_ctr/train_ctr.py (one run each).
Run:    python stage2_ctr/03_compare_models.py                  # ~45 min, 2 runs at a time
        python stage2_ctr/03_compare_models.py --regimes dot --seeds 0
        python stage2_ctr/03_compare_models.py --quick          # ~1.5 min, a smoke test
        A finished run (runs/cmp_*/metrics.json whose recorded config equals the one asked
        for, all of it) is read back, not retrained: a killed comparison picks up where it
        stopped (--fresh retrains all).
Reads:  stage2_ctr/data/compare_<regime>_<rows>/ (made here with the generator when missing)
Writes: results/stage2_models.md, results/stage2_models.png, results/stage2_learning_curve.png
        (--quick: under runs/quick/), runs/cmp_*/metrics.json
"""
import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from multiprocessing import get_context
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: plain imports
import common  # noqa: E402
from stage2_ctr import synthetic  # noqa: E402
from stage2_ctr.models import MODELS  # noqa: E402
from stage2_ctr.train_ctr import TrainConfig, train  # noqa: E402

HERE = Path(__file__).resolve().parent
# per regime: rows (8:1:1), epochs (early stopping picks the best one), what each test expects
ROWS = {"lowrank": 1_000_000, "dot": 1_000_000, "fieldpair": 500_000}
EPOCHS = {"lowrank": 1, "dot": 4, "fieldpair": 2}
EXPECTED = {"lowrank": [("lr", "fm"), ("lr", "dnn")],
            "dot": [("dnn", "fm"), ("dnn", "deepfm")],
            "fieldpair": [("dnn", "dcnv2")]}
MARGIN = 0.003  # an expected win: by at least this much AUC and by more than 3x the seed std


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--regimes", default="lowrank,dot,fieldpair")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--seeds", type=common.int_list, default=[0, 1, 2])
    p.add_argument("--rows", type=common.positive_int, default=None,
                   help="synthetic rows of every regime, split 8:1:1 (default ROWS: 1M for "
                        "lowrank and dot, 0.5M for fieldpair; --quick 60k)")
    p.add_argument("--lrs", type=common.float_list, default=[0.002, 0.005],
                   help="learning rates tried per model on seed 0; the best on val is kept")
    p.add_argument("--min-count", type=common.non_negative_int, default=10,
                   help="values seen fewer times in train -> their field's rare bucket")
    p.add_argument("--curve-rows", type=common.int_list, default=[100_000, 200_000, 400_000],
                   help="dot regime: more training-set sizes for the learning curve")
    p.add_argument("--curve-models", default="fm,dnn,deepfm")
    p.add_argument("--ablation-models", default="fm,dnn",
                   help="trained once more without the frequency threshold (seed 0)")
    p.add_argument("--batch-size", type=common.positive_int, default=2048)
    p.add_argument("--emb-dim", type=common.positive_int, default=16)
    p.add_argument("--mlp", type=common.layer_list, default=(256, 128))
    p.add_argument("--cross-layers", type=common.positive_int, default=2,
                   help="DCN / DCN-v2 cross layers (2: crosses up to degree 3)")
    p.add_argument("--jobs", type=common.positive_int, default=2,
                   help="trainings at a time (each with 1 torch thread, parsing in-process)")
    p.add_argument("--quick", action="store_true", help="60k rows, 1 seed, dot + fieldpair")
    p.add_argument("--fresh", action="store_true", help="retrain every run")
    p.add_argument("--out-dir", default=None, help="default results/ (--quick: runs/quick/)")
    p.add_argument("--data-dir", default=str(HERE / "data"), help="where compare_*/ go")
    p.add_argument("--runs-dir", default=str(common.RUNS))
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.curve_rows, args.regimes = [0], [], "dot,fieldpair"
        args.ablation_models, args.lrs = "", [0.005]
    args.rows_of = {g: args.rows or (60_000 if args.quick else ROWS[g]) for g in ROWS}
    args.regime_list = [r for r in args.regimes.split(",") if r]
    args.model_list = [m for m in args.models.split(",") if m]
    if set(args.regime_list) - set(synthetic.REGIMES) or set(args.model_list) - set(MODELS):
        p.error(f"--regimes from {synthetic.REGIMES}, --models from {MODELS}")
    args.out_dir = Path(args.out_dir or common.quick_or_results(args.quick))
    return args


# -------------------------------------------------------------------------------- the runs
def dataset(regime, total_rows, data_dir):
    """<data-dir>/compare_<regime>_<rows>: made once with the generator's defaults."""
    folder = Path(data_dir) / f"compare_{regime}_{total_rows}"
    if not (folder / "meta.json").exists():
        synthetic.make_synthetic(synthetic.SyntheticConfig(rows=total_rows,
                                                           interactions=regime), folder)
    return folder


def run_config(args, folder, regime, model, lr, seed, tag="main", min_count=None):
    """The TrainConfig of one comparison run: the same budget for every model of a regime."""
    min_count = args.min_count if min_count is None else min_count
    return TrainConfig(model=model, seed=seed, train=[str(folder / "train.txt")],
                       val=[str(folder / "val.txt")], test=[str(folder / "test.txt")],
                       epochs=EPOCHS[regime], patience=1, batch_size=args.batch_size, lr=lr,
                       emb_dim=args.emb_dim, mlp=tuple(args.mlp), min_count=min_count,
                       cross_layers=args.cross_layers,
                       threads=1, num_workers=0, runs_dir=args.runs_dir,
                       run_name=f"cmp_{tag}_{regime}_{model}_lr{lr:g}_mc{min_count}_s{seed}")


def finished_run(cfg):
    """The metrics of a finished run whose recorded config equals cfg (all of it), else None.
    An unreadable or foreign metrics.json is not a finished run: it is trained again."""
    done = Path(cfg.runs_dir) / cfg.run_name / "metrics.json"
    if not done.exists():
        return None
    try:
        metrics = json.loads(done.read_text())
        # A field added to TrainConfig after a run was recorded is absent from its record; a
        # new field's default is the behaviour runs had before it (amp "off", preload "none").
        recorded = {**json.loads(json.dumps(asdict(TrainConfig()))), **metrics["config"]}
        same = recorded == json.loads(json.dumps(asdict(cfg)))
    except (ValueError, KeyError, TypeError):
        print(f"{done}: unreadable, training the run again", flush=True)
        return None
    return metrics if same else None


def train_quiet(cfg):
    return train(cfg, quiet=True)


def run_all(args, configs, pool, log):
    """{run name: metrics} for every config: finished runs read back, the rest trained,
    `--jobs` at a time."""
    seen = log["seen"]  # runs this invocation already has (the ablation repeats main runs)
    out, todo = {c.run_name: seen[c.run_name] for c in configs if c.run_name in seen}, []
    for cfg in (c for c in configs if c.run_name not in seen):
        metrics = None if args.fresh else finished_run(cfg)
        if metrics is None:
            todo.append(cfg)
        else:
            out[cfg.run_name] = seen[cfg.run_name] = metrics
            log["reused"] += 1
            log["runs"] += 1
            log["train_s"] += metrics.get("wall_s", 0.0)
    for cfg, metrics in zip(todo, pool.map(train_quiet, todo)):
        out[cfg.run_name] = seen[cfg.run_name] = metrics
        log["runs"] += 1
        log["train_s"] += metrics.get("wall_s", 0.0)
        print(f"  {cfg.run_name}: test AUC {metrics['splits']['test']['auc']:.4f}", flush=True)
    return out


def compare_regime(args, regime, pool, log):
    """Learning rates on seed 0 (best on val), then every seed at that rate."""
    folder = dataset(regime, args.rows_of[regime], args.data_dir)
    tries = run_all(args, [run_config(args, folder, regime, m, lr, args.seeds[0])
                           for m in args.model_list for lr in args.lrs], pool, log)
    best_lr = {m: max(args.lrs, key=lambda lr: tries[run_config(
        args, folder, regime, m, lr, args.seeds[0]).run_name]["splits"]["val"]["auc"])
        for m in args.model_list}
    runs = run_all(args, [run_config(args, folder, regime, m, best_lr[m], s)
                          for m in args.model_list for s in args.seeds], pool, log)
    rows = []
    for m in args.model_list:
        ms = [runs[run_config(args, folder, regime, m, best_lr[m], s).run_name]
              for s in args.seeds]
        test = [r["splits"]["test"] for r in ms]
        rows.append({"model": m, "lr": best_lr[m], "auc": [t["auc"] for t in test],
                     "logloss": [t["logloss"] for t in test],
                     "gap": [t["auc_gap_to_oracle"] for t in test],
                     "best_epoch": [r["best_step"] / max(r["steps"] / len(r["history"]), 1)
                                    for r in ms],
                     "samples_per_s": [r["train_samples_per_s"] for r in ms],
                     "parameters": ms[0]["parameters"], "oracle": test[0]["oracle"]})
        print(f"{regime:<9} {m:<7} lr {best_lr[m]:g}  test AUC {common.mean_std(rows[-1]['auc'])}"
              f"  gap {common.mean_std(rows[-1]['gap'])}", flush=True)
    return {"rows": rows, "best_lr": best_lr, "meta": json.loads((folder / "meta.json")
                                                                .read_text())}


def learning_curve(args, best_lr, pool, log):
    """Dot regime, seed 0: test AUC at more training-set sizes (the main size included)."""
    curve = {"oracle": []}
    sizes = sorted(set(args.curve_rows) | {int(args.rows_of["dot"] * 0.8)})
    for n in sizes:
        total = int(round(n / 0.8))
        folder = dataset("dot", total, args.data_dir)
        # the main size reuses the comparison's runs; other sizes get their own run folders
        tag = "main" if total == args.rows_of["dot"] else f"curve{total}"
        configs = [run_config(args, folder, "dot", m, best_lr[m], args.seeds[0], tag=tag)
                   for m in args.curve_models.split(",") if m]
        runs = run_all(args, configs, pool, log)
        for cfg in configs:
            test = runs[cfg.run_name]["splits"]["test"]
            curve.setdefault(cfg.model, []).append((n, test["auc"]))
        curve["oracle"].append((n, test["oracle"]["auc"]))
    return curve


def ablation(args, results, pool, log):
    """What the frequency threshold is worth: seed 0 again with --min-count 0."""
    out = {}
    for regime, r in results.items():
        folder = dataset(regime, args.rows_of[regime], args.data_dir)
        for m in [m for m in args.ablation_models.split(",") if m]:
            with_mc, without = (run_config(args, folder, regime, m, r["best_lr"][m],
                                           args.seeds[0], min_count=mc)
                                for mc in (args.min_count, 0))
            runs = run_all(args, [with_mc, without], pool, log)
            out[(regime, m)] = [runs[c.run_name]["splits"]["test"]["auc"]
                                for c in (without, with_mc)]
    return out


# ------------------------------------------------------------------------------------ report
def expected_wins(regime, rows):
    """Each expected (loser, winner) pair: holds when the winner's mean test AUC is higher by
    at least MARGIN and by more than 3x the larger seed std."""
    by = {r["model"]: r for r in rows}
    out = []
    for lo, hi in EXPECTED[regime]:
        if lo in by and hi in by:
            diff = statistics.mean(by[hi]["auc"]) - statistics.mean(by[lo]["auc"])
            sd = max(statistics.pstdev(by[hi]["auc"]), statistics.pstdev(by[lo]["auc"]))
            ok = diff >= MARGIN and diff > 3 * sd
            out.append(f"{hi} - {lo} = {diff:+.4f} (3 x std {3 * sd:.4f}): "
                       + ("holds" if ok else "does not hold"))
    return out


def regime_table(args, regime, r):
    meta = r["meta"]
    test = meta["splits"]["test"]
    lines = [f"## {regime}", "", f"{args.rows_of[regime]:,} rows (8:1:1), up to "
             f"{EPOCHS[regime]} epoch(s) "
             f"with early stopping on val AUC; oracle test AUC {test['oracle_auc'][0]:.4f} "
             f"(log loss {test['oracle_logloss'][0]:.4f}); the oracle with one planted part "
             "removed: " + ", ".join(f"{k} {v:.4f}" for k, v in test["oracle_auc_without"]
                                     .items()) + ".", ""]
    lines += common.markdown_table(
        ["model", "lr", "test AUC", "test logloss", "AUC gap to oracle", "best epoch",
         "samples/s", "parameters"],
        [[x["model"], f"{x['lr']:g}", common.mean_std(x["auc"]), common.mean_std(x["logloss"]),
          common.mean_std(x["gap"]), f"{statistics.mean(x['best_epoch']):.1f}",
          f"{statistics.median(x['samples_per_s']):,.0f}", f"{x['parameters']:,}"]
         for x in r["rows"]])
    lines += [""] + [f"- expected: {w}" for w in expected_wins(regime, r["rows"])]
    return lines + [""]


def write_report(args, results, curve, ablate, log, seconds):
    lines = ["# Stage 2: explicit vs implicit crosses - CTR models per planted regime", "",
             f"Same budget for every model: batch {args.batch_size}, emb {args.emb_dim}, MLP "
             f"{'-'.join(map(str, args.mlp))}, {args.cross_layers} cross layers (DCN, DCN-v2), "
             f"hash 2^20, values seen < {args.min_count} times -> their field's rare bucket, "
             "learning rate per model and regime picked on val from "
             f"{{{', '.join(f'{x:g}' for x in args.lrs)}}} (seed {args.seeds[0]}), seeds "
             f"{', '.join(map(str, args.seeds))}; CPU, {args.jobs} runs at a time with 1 thread "
             "each (samples/s are those of a shared machine).", ""]
    for regime, r in results.items():
        lines += regime_table(args, regime, r)
    if len(curve) > 1:
        models = [m for m in curve if m != "oracle"]
        lines += ["## Learning curve, dot regime (seed 0): test AUC vs training rows", ""]
        lines += common.markdown_table(["training rows"] + models + ["oracle"], [
            [f"{n:,}"] + [f"{curve[m][i][1]:.4f}" for m in models]
            + [f"{curve['oracle'][i][1]:.4f}"] for i, (n, _) in enumerate(curve["oracle"])])
        lines.append("")
    if ablate:
        lines += [f"## The frequency threshold (seed 0): test AUC without / with --min-count "
                  f"{args.min_count}", ""]
        lines += common.markdown_table(["regime", "model", "min count 0",
                                        f"min count {args.min_count}", "difference"],
                                       [[g, m, f"{a:.4f}", f"{b:.4f}", f"{b - a:+.4f}"]
                                        for (g, m), (a, b) in ablate.items()])
        lines.append("")
    if log["reused"]:
        lines.append(f"{log['reused']} of the {log['runs']} runs were read back from "
                     f"{Path(args.runs_dir).name}/cmp_*/metrics.json (finished earlier with the "
                     "same config; --fresh retrains).")
    lines += ["", f"Written by `python stage2_ctr/03_compare_models.py"
              f"{' --quick' if args.quick else ''}` in {seconds / 60:.0f} min; the runs behind "
              f"it took {log['train_s'] / 60:.0f} min of training in all."]
    common.write_text(args.out_dir / "stage2_models.md", "\n".join(lines) + "\n")
    plot(args, results, curve)
    print(f"wrote {args.out_dir / 'stage2_models.md'} (+ PNGs)")


def plot(args, results, curve):
    plt = common.pyplot()
    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 3.5), squeeze=False)
    for ax, (regime, r) in zip(axes[0], results.items()):
        gaps = [statistics.mean(x["gap"]) for x in r["rows"]]
        ax.bar([x["model"] for x in r["rows"]], gaps,
               yerr=[statistics.pstdev(x["gap"]) for x in r["rows"]], capsize=3)
        ax.set(title=f"{regime}", ylabel="test AUC gap to the oracle (lower is better)")
        ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    common.save_figure(fig, args.out_dir / "stage2_models.png")
    if len(curve) > 1:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for m, pts in curve.items():
            ax.plot(*zip(*pts), marker="o", label=m, ls="--" if m == "oracle" else "-")
        ax.set(xscale="log", xlabel="training rows", ylabel="test AUC",
               title="dot regime: learning curve")
        ax.legend()
        fig.tight_layout()
        common.save_figure(fig, args.out_dir / "stage2_learning_curve.png")


def main(argv=None):
    args = parse_args(argv)
    t0 = time.perf_counter()
    log = {"runs": 0, "reused": 0, "train_s": 0.0, "seen": {}}
    with ProcessPoolExecutor(args.jobs, mp_context=get_context("fork")) as pool:
        results = {g: compare_regime(args, g, pool, log) for g in args.regime_list}
        curve = (learning_curve(args, results["dot"]["best_lr"], pool, log)
                 if "dot" in results and args.curve_rows else {})
        ablate = ablation(args, results, pool, log)
    write_report(args, results, curve, ablate, log, time.perf_counter() - t0)
    return results


if __name__ == "__main__":
    main()
