"""Stage 2, step 3: every CTR model on the same data and budget - what do explicit crosses buy?

What you learn here: on data with planted pairwise and third-order crosses (01 --synthetic), LR
can only learn the first-order part, FM adds the pairwise part, and the deep models add what is
left; the oracle line shows how far each stays from the best possible. The learning curve shows
the gap shrinking as training rows grow. Same seeds, same data, same epochs for every model.
The report checks the order the planted structure suggests (LR < FM, DNN < DeepFM, DCN) on the
3-seed means and on every curve row, and names the pairs that fail.

Read with it: stage2_ctr/train_ctr.py (every run here is one train_ctr.train(config) call).
Run:    python stage2_ctr/03_compare_models.py                  # ~55 min of training, 2 cores
        python stage2_ctr/03_compare_models.py --curve-rows ''  # the 3-seed table only, ~25 min
        python stage2_ctr/03_compare_models.py --quick          # ~2 min, a smoke test
        A finished run (runs/cmp_*/metrics.json whose recorded config equals the one asked
        for, all of it) is read back, not retrained: a killed comparison picks up where it
        stopped (--fresh retrains all).
Reads:  stage2_ctr/data/compare_<rows>/ (made here with the generator of 01 when missing)
Writes: results/stage2_models.md, results/stage2_models.png, results/stage2_learning_curve.png,
        runs/cmp_*/metrics.json
"""
import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: plain imports
import common  # noqa: E402
from stage2_ctr import synthetic  # noqa: E402
from stage2_ctr.train_ctr import TrainConfig, train  # noqa: E402

HERE = Path(__file__).resolve().parent


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="lr,fm,dnn,deepfm,dcn,dcnv2")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--rows", type=int, default=None,
                   help="synthetic rows, split 8:1:1 (default 1,000,000; --quick: 60,000)")
    p.add_argument("--curve-rows", default="500000,2000000,8000000",
                   help="training-set sizes of the learning curve ('' to skip)")
    p.add_argument("--curve-models", default="lr,fm,dnn,deepfm,dcn",
                   help="models on the learning curve")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--lrs", default="0.002,0.01",
                   help="learning rates tried per model on seed 0; the best on val is kept")
    p.add_argument("--emb-dim", type=int, default=16)
    p.add_argument("--mlp", default="256,128")
    p.add_argument("--threads", type=int, default=1, help="torch threads per training")
    p.add_argument("--num-workers", type=int, default=1, help="loader workers per training")
    p.add_argument("--quick", action="store_true", help="60k rows, 1 seed, no curve")
    p.add_argument("--fresh", action="store_true",
                   help="retrain every run (default: reuse finished runs with the same settings)")
    p.add_argument("--out-dir", default=str(common.RESULTS))
    p.add_argument("--data-dir", default=str(HERE / "data"), help="where compare_<rows>/ goes")
    p.add_argument("--runs-dir", default=str(common.RUNS))
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.curve_rows = "0", ""
    args.rows = args.rows or (60_000 if args.quick else 1_000_000)
    args.model_list = [m for m in args.models.split(",") if m]
    args.seed_list = [int(s) for s in args.seeds.split(",") if s]
    args.curve_list = [int(r) for r in args.curve_rows.split(",") if r]
    args.lr_list = [float(x) for x in args.lrs.split(",") if x]
    args.reused, args.run_seconds = [], []
    return args


def dataset(total_rows, data_dir):
    """<data-dir>/compare_<rows>: made once with the default generator settings."""
    folder = Path(data_dir) / f"compare_{total_rows}"
    if not (folder / "meta.json").exists():
        synthetic.make_synthetic(synthetic.SyntheticConfig(rows=total_rows), folder)
    return folder


def run_config(folder, model, seed, args, tag, lr):
    """The TrainConfig of one comparison run: the same budget for every model."""
    return TrainConfig(model=model, seed=seed, train=[str(folder / "train.txt")],
                       val=[str(folder / "val.txt")], test=[str(folder / "test.txt")],
                       epochs=args.epochs, batch_size=args.batch_size, lr=lr,
                       emb_dim=args.emb_dim, mlp=common.layer_list(args.mlp),
                       threads=args.threads, num_workers=args.num_workers, eval_every=0,
                       runs_dir=args.runs_dir, run_name=f"cmp_{tag}_{model}_lr{lr:g}_s{seed}")


def finished_run(cfg):
    """The metrics of a finished run whose recorded config equals cfg (all of it), else None.
    An unreadable or foreign metrics.json is not a finished run: it is trained again."""
    done = Path(cfg.runs_dir) / cfg.run_name / "metrics.json"
    if not done.exists():
        return None
    try:
        metrics = json.loads(done.read_text())
        same = metrics["config"] == json.loads(json.dumps(asdict(cfg)))
    except (ValueError, KeyError, TypeError):
        print(f"{done}: unreadable, training the run again", flush=True)
        return None
    return metrics if same else None


def train_one(folder, model, seed, args, tag, lr):
    """One train_ctr run, or its metrics read back when it finished before (--fresh: retrain),
    so an interrupted comparison resumes."""
    cfg = run_config(folder, model, seed, args, tag, lr)
    metrics = None if args.fresh else finished_run(cfg)
    if metrics is not None:
        args.reused.append(cfg.run_name)
    else:
        metrics = train(cfg, quiet=True)
    args.run_seconds.append(metrics.get("wall_s", 0.0))
    return metrics


# The order the planted structure suggests: LR sees only first-order terms; FM adds the
# pairwise ones, the DNN learns crosses implicitly; DeepFM and DCN add explicit crosses to it.
EXPECTED_ORDER = [("lr", "fm"), ("lr", "dnn"), ("fm", "deepfm"), ("fm", "dcn"),
                  ("dnn", "deepfm"), ("dnn", "dcn")]


def order_check(auc):
    """auc: {model: test AUC} -> 'holds' or the expected pairs that fail, with their AUCs."""
    pairs = [(a, b) for a, b in EXPECTED_ORDER if a in auc and b in auc]
    failed = [f"{a} {auc[a]:.4f} >= {b} {auc[b]:.4f}" for a, b in pairs if auc[a] >= auc[b]]
    if not pairs:
        return "-"
    return "holds" if not failed else "fails: " + "; ".join(failed)


def main(argv=None):
    args = parse_args(argv)
    t0 = time.perf_counter()
    folder = dataset(args.rows, args.data_dir)
    rows = []
    best_lr = {}
    for model in args.model_list:
        # the learning rate is chosen on validation (seed 0), never on test
        tries = {lr: train_one(folder, model, args.seed_list[0], args, "main", lr)
                 for lr in args.lr_list}
        best_lr[model] = max(tries, key=lambda lr: tries[lr]["splits"]["val"]["auc"])
        runs = [tries[best_lr[model]]] + [train_one(folder, model, s, args, "main",
                                                    best_lr[model]) for s in args.seed_list[1:]]
        test = [r["splits"]["test"] for r in runs]
        rows.append({"model": model, "lr": best_lr[model], "auc": [t["auc"] for t in test],
                     "logloss": [t["logloss"] for t in test],
                     "gap": [t.get("auc_gap_to_oracle", float("nan")) for t in test],
                     "samples_per_s": [r["train_samples_per_s"] for r in runs],
                     "parameters": runs[0]["parameters"], "oracle": test[0].get("oracle")})
        print(f"{model:<7} test AUC {common.mean_std(rows[-1]['auc'])}  logloss "
              f"{common.mean_std(rows[-1]['logloss'])}  gap {common.mean_std(rows[-1]['gap'])}",
              flush=True)

    curve = {}
    for n in args.curve_list:
        cfolder = dataset(int(n / 0.8), args.data_dir)  # n training rows after the 8:1:1 split
        for model in args.curve_models.split(","):
            r = train_one(cfolder, model, args.seed_list[0], args, f"curve{n}",
                          best_lr.get(model, args.lr_list[0]))
            curve.setdefault(model, []).append((n, r["splits"]["test"]["auc"]))
            curve.setdefault("oracle", [])
            if len(curve["oracle"]) < len(curve[model]):
                curve["oracle"].append((n, r["splits"]["test"]["oracle"]["auc"]))
            print(f"curve {n:>9,} rows {model:<7} test AUC {r['splits']['test']['auc']:.4f}",
                  flush=True)
    write_report(args, rows, curve, folder, time.perf_counter() - t0)


def write_report(args, rows, curve, folder, seconds):
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = json.loads((folder / "meta.json").read_text())
    oracle = rows[0]["oracle"] or {}
    lines = ["# Stage 2: CTR models on synthetic Criteo-format data", "",
             f"{args.rows:,} synthetic rows (default generator: planted first-order, pairwise and "
             f"third-order terms), split 8:1:1; {args.epochs} epoch(s), batch {args.batch_size}, "
             f"learning rate per model picked on val from {args.lrs}, emb {args.emb_dim}, "
             f"MLP {args.mlp}, hash 2^20, "
             f"seeds {args.seeds}, CPU, {args.threads} thread(s). Test split: "
             f"{meta['splits']['test']['rows']:,} rows.", "",
             f"Oracle (the true click probability) on the test split: AUC "
             f"{oracle.get('auc', float('nan')):.4f}, logloss "
             f"{oracle.get('logloss', float('nan')):.4f}; its first-order part alone reaches AUC "
             f"{meta['splits']['test'].get('oracle_auc_first_order_only', float('nan')):.4f}.",
             "", "| model | lr | test AUC | test logloss | AUC gap to oracle | train samples/s | "
             "parameters |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['lr']:g} | {common.mean_std(r['auc'])} | "
                     f"{common.mean_std(r['logloss'])} | "
                     f"{common.mean_std(r['gap'])} | "
                     f"{statistics.median(r['samples_per_s']):,.0f} | "
                     f"{r['parameters']:,} |")
    mean_auc = {r["model"]: statistics.mean(r["auc"]) for r in rows}
    lines += ["", "Expected order (LR < FM, DNN < DeepFM, DCN) on the mean test AUC: "
              f"{order_check(mean_auc)}."]
    if curve:
        lines += ["", "## Learning curve (seed 0): test AUC vs training rows", "",
                  "| training rows | " + " | ".join(curve) + " | expected order |",
                  "|---" * (len(curve) + 2) + "|"]
        for i, (n, _) in enumerate(curve["oracle"]):
            lines.append(f"| {n:,} | " + " | ".join(f"{curve[m][i][1]:.4f}" for m in curve)
                         + f" | {order_check({m: curve[m][i][1] for m in curve})} |")
    if args.reused:
        lines += ["", f"{len(args.reused)} of the {len(args.run_seconds)} runs were read back from "
                  f"{Path(args.runs_dir).name}/cmp_*/metrics.json (finished earlier by this script "
                  "with the same settings; --fresh retrains)."]
    flags = " --quick" if args.quick else (f" --seeds {args.seeds} --curve-rows "
                                           f"{args.curve_rows} --curve-models {args.curve_models}")
    lines += ["", f"Written by `python stage2_ctr/03_compare_models.py{flags} --threads "
              f"{args.threads}` in {seconds:.0f} s; the {len(args.run_seconds)} training runs "
              f"behind this table took {sum(args.run_seconds) / 60:.0f} min in all (data "
              "generation not included)."]
    common.write_text(out / "stage2_models.md", "\n".join(lines) + "\n")

    import matplotlib.ticker
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = [r["model"] for r in rows]
    ax.bar(names, [statistics.mean(r["auc"]) for r in rows],
           yerr=[statistics.pstdev(r["auc"]) if len(r["auc"]) > 1 else 0 for r in rows],
           capsize=3)
    if oracle:
        ax.axhline(oracle["auc"], color="k", ls="--", label="oracle")
        ax.legend()
    lo = min(statistics.mean(r["auc"]) for r in rows)
    ax.set(ylim=(lo - 0.02, (oracle.get("auc") or 1) + 0.01), ylabel="test AUC",
           title="CTR models, same data and budget")
    fig.tight_layout()
    common.save_figure(fig, out / "stage2_models.png")
    if curve:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for m, pts in curve.items():
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m,
                    ls="--" if m == "oracle" else "-")
        ax.set(xscale="log", xlabel="training rows", ylabel="test AUC", title="learning curve")
        sizes = [n for n, _ in curve["oracle"]]
        ax.set_xticks(sizes, [f"{n / 1e6:g}M" for n in sizes])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.legend()
        fig.tight_layout()
        common.save_figure(fig, out / "stage2_learning_curve.png")
    print(f"wrote {out / 'stage2_models.md'} (+ PNGs)")


if __name__ == "__main__":
    main()
