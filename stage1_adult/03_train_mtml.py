"""Stage 1, step 3: a shared-bottom multi-task MLP on Adult (task A income >50K, task B married).

What you learn here: embeddings for categoricals *and* for numerics (a plain standardized number is
the weakest way to feed a net: bins, piecewise-linear encodings and exact-value tokens are what let
an MLP match gradient boosting on tabular data); one shared backbone with two heads trained on
L = wA*LA + wB*LB (BCEWithLogits); early stopping on validation AUC; and why a DataLoader that
indexes one sample at a time is slow (--loader dataloader vs slice).

Read with it: stage1_adult/mtml.py (the encodings, SharedBottomMTL, the loop, run()).
Run:    python stage1_adult/03_train_mtml.py                       # both tasks, defaults
        python stage1_adult/03_train_mtml.py --tasks income        # single-task baseline
        python stage1_adult/03_train_mtml.py --num-encoding standardize
        python stage1_adult/03_train_mtml.py --npz stage1_adult/adult_stage1_leaky.npz --tasks income
Reads:  stage1_adult/adult_stage1.npz + _meta.json (from 02_preprocess.py)
Writes: runs/<name>/metrics.json, runs/<name>/curves.png, runs/<name>/model.pt
Time:   ~10-20 s on 2 CPU cores.
"""
import argparse
import sys
from dataclasses import fields
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: plain imports
import common  # noqa: E402
from stage1_adult import mtml  # noqa: E402


def parse_args(argv=None):
    """The command line -> (MTMLConfig, run options). Defaults come from the dataclass."""
    d = mtml.MTMLConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--npz", default=d.npz, help="output of 02")
    p.add_argument("--tasks", choices=list(mtml.TASKS), default=d.tasks,
                   help="both = multi-task; income / married = single-task baselines")
    p.add_argument("--wA", type=float, default=d.wA, help="weight of the income loss")
    p.add_argument("--wB", type=float, default=d.wB, help="weight of the married loss")
    p.add_argument("--num-encoding", choices=mtml.ENCODINGS, default=d.num_encoding,
                   help="how numerics enter the net: standardized value, quantile-bin embedding, "
                        "piecewise-linear encoding (PLE), or PLE + exact-value capital tokens")
    p.add_argument("--num-dim", type=common.positive_int, default=d.num_dim,
                   help="embedding size of each numeric field")
    p.add_argument("--max-cat-dim", type=common.positive_int, default=d.max_cat_dim,
                   help="cap of the categorical embedding size min(cap, round(1.6*card^0.56))")
    p.add_argument("--hidden", type=common.layer_list, default=d.hidden,
                   help="shared backbone layer sizes, e.g. 256,128")
    p.add_argument("--dropout", type=common.probability, default=d.dropout)
    p.add_argument("--lr", type=common.positive_float, default=d.lr)
    p.add_argument("--weight-decay", type=common.non_negative_float, default=d.weight_decay,
                   help="AdamW weight decay")
    p.add_argument("--batch-size", type=common.positive_int, default=d.batch_size)
    p.add_argument("--epochs", type=common.positive_int, default=d.epochs)
    p.add_argument("--patience", type=common.positive_int, default=d.patience,
                   help="epochs without val AUC gain to stop")
    p.add_argument("--loader", choices=list(mtml.LOADERS), default=d.loader,
                   help="slice = batches cut from preloaded tensors; dataloader = TensorDataset "
                        "+ DataLoader (per-sample indexing and collate); batch-sampler = the "
                        "DataLoader indexing whole batches; device = slices of tensors already "
                        "on the device (06_dataloader_tuning.py measures all four)")
    p.add_argument("--device", type=common.device_arg, default=d.device,
                   help="auto | cpu | cuda | cuda:N")
    p.add_argument("--threads", type=common.non_negative_int, default=d.threads,
                   help="torch CPU threads")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--run-name", default=None, help="runs/<run-name>/ (default from the config)")
    p.add_argument("--runs-dir", default=str(common.RUNS), help="parent folder of run folders")
    p.add_argument("--no-save", action="store_true", help="write no run folder (sweeps)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or table")
    args = p.parse_args(argv)
    cfg = mtml.MTMLConfig(**{f.name: getattr(args, f.name) for f in fields(mtml.MTMLConfig)})
    error = mtml.config_error(cfg)
    if error:
        p.error(error)
    name = args.run_name or (f"stage1_{cfg.tasks}_{cfg.num_encoding.replace('+', '_')}"
                             f"_wA{cfg.wA:g}_wB{cfg.wB:g}_s{cfg.seed}")
    run_dir = None if args.no_save else Path(args.runs_dir) / name
    return cfg, run_dir, args.quiet


def report(metrics, cfg):
    print(f"best epoch {metrics['best_epoch']} of {len(metrics['history'])} | "
          f"{metrics['train_samples_per_s']:,.0f} train samples/s ({cfg.loader} loader) | "
          f"{metrics['wall_s']:.1f} s")
    print(f"{'task':<9}{'split':<6}{'AUC':>8}{'logloss':>9}{'acc':>8}")
    for split, per_task in metrics["splits"].items():
        for t, m in per_task.items():
            print(f"{t:<9}{split:<6}{m['auc']:>8.4f}{m['logloss']:>9.4f}{m['accuracy']:>8.4f}")
    if "run_dir" in metrics:
        print(f"wrote {metrics['run_dir']}/{{metrics.json, curves.png, model.pt}}")


@common.one_line_errors(mtml.NpzError)
def main(argv=None):
    cfg, run_dir, quiet = parse_args(argv)
    if run_dir is not None:  # a read-only or misplaced run folder: one line before training
        common.check_writable(run_dir, "--runs-dir / --run-name")
    metrics = mtml.run(cfg, run_dir, quiet)  # a full disk at the end: one line too (OutputError)
    if not quiet:
        report(metrics, cfg)
    return metrics


if __name__ == "__main__":
    main()
