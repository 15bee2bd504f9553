"""Stage 2, step 5: real CTR data - MovieLens-100k as a click task, the six models against tuned
gradient boosting.

What you learn here: the same hand-written models on real data with another field layout (no
dense fields, 7 id fields, a bag of genres: models/layers.py's FieldSchema), what real data
needs that synthetic data did not (a fixed vocabulary from train, OOV ids, a time split), and
what the synthetic regimes of 03/04 predict: MovieLens is collaborative filtering - its main
signal is a dot product of a user and an item - so the FM family should beat a plain DNN, and
an embedding model should beat gradient boosting, which sees user and item ids only as
categories to split on. Learning rate, weight decay (on the embeddings too) and dropout are
chosen on validation; the table reports the test split of 5 seeds.

Read with it: stage2_ctr/movielens.py (files, task, arrays), stage2_ctr/training.py (fit),
stage2_ctr/gbdt.py (the LightGBM baseline).
Run:    python stage2_ctr/05_movielens.py            # fetches the data once; ~11 min on 2 cores
        python stage2_ctr/05_movielens.py --quick    # DeepFM, 1 seed, random split: < 1 min
        python stage2_ctr/05_movielens.py --fetch    # only fetch (pip download of a 2 MB wheel)
        python stage2_ctr/05_movielens.py --hashing  # what the hash trick costs here: ~10 min
Writes: results/stage2_movielens.md + .png (only the default run: --quick writes to runs/quick/,
        other flags to runs/partial/, CUDA to *_cuda.md), runs/stage2_movielens.json;
        --hashing: results/stage2_movielens_hashing.md (FM and DNN, random split, 3 seeds);
        the data in stage2_ctr/data/ml-100k/ (git-ignored)
"""
import argparse
import contextlib
import itertools
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: plain imports
import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import common  # noqa: E402
from stage2_ctr import gbdt, movielens  # noqa: E402
from stage2_ctr.models import MODELS, build_model  # noqa: E402
from stage2_ctr.training import (CTRInputs, FitError, bce, fit,  # noqa: E402
                                 predict_in_memory)

MLP_MODELS = {"dnn", "deepfm", "dcn", "dcnv2"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=str(movielens.DATA_DIR),
                   help="the ml-100k files (recbole's or GroupLens's layout)")
    p.add_argument("--fetch", action="store_true", help="fetch the files and stop")
    p.add_argument("--models", default=",".join(MODELS), help=f"from {','.join(MODELS)}")
    p.add_argument("--seeds", type=common.seed_list, default=[0, 1, 2, 3, 4])
    p.add_argument("--splits", default="random,time", help="random (8:1:1) and/or time")
    p.add_argument("--lrs", type=common.positive_float_list, default=[1e-3, 3e-3])
    p.add_argument("--weight-decays", type=common.non_negative_float_list,
                   default=[0.0, 0.3, 1.0], help="AdamW weight decay, embeddings included")
    p.add_argument("--dropouts", type=common.probability_list, default=[0.0, 0.3],
                   help="dropout of the MLP models")
    p.add_argument("--emb-dim", type=common.positive_int, default=16)
    p.add_argument("--mlp", type=common.layer_list, default=(256, 128))
    p.add_argument("--batch-size", type=common.positive_int, default=1024)
    p.add_argument("--epochs", type=common.positive_int, default=30)
    p.add_argument("--patience", type=common.positive_int, default=3)
    p.add_argument("--skip-gbdt", action="store_true", help="no LightGBM baseline")
    p.add_argument("--hashing", action="store_true", help="the picked FM, DNN on hashed ids")
    p.add_argument("--hash-bits-list", type=common.int_list, default=[8, 10, 12, 14])
    p.add_argument("--device", type=common.device_arg, default="auto",
                   help="auto | cpu | cuda | cuda:N (on CUDA one training at a time)")
    p.add_argument("--threads", type=common.positive_int, default=2,
                   help="torch CPU threads (of the one process with --jobs 1; and LightGBM's)")
    p.add_argument("--jobs", type=common.positive_int, default=2,
                   help="trainings at a time, each in a process with 1 torch thread")
    p.add_argument("--quick", action="store_true",
                   help="defaults DeepFM, seed 0, random split, no grid, no boosting")
    p.add_argument("--out", default=None, help="default results/stage2_movielens.md")
    p.add_argument("--runs-dir", default=str(common.RUNS))
    args = common.parse_with_quick(p, argv, dict(
        models="deepfm", seeds=[0], splits="random", skip_gbdt=True, jobs=1, lrs=[3e-3],
        weight_decays=[0.0], dropouts=[0.0]))
    if args.hashing:  # the mode's own defaults, for the flags not given (as --quick's)
        p.set_defaults(models="fm,dnn", splits="random", seeds=[0] if args.quick else [0, 1, 2],
                       skip_gbdt=True, hash_bits_list=[8, 12] if args.quick else [8, 10, 12, 14])
        args = p.parse_args(argv)
        if any(not 1 <= b <= 20 for b in args.hash_bits_list):
            p.error("--hash-bits-list: integers in [1, 20]")
    args.model_list = [m for m in args.models.split(",") if m]
    args.split_list = [s for s in args.splits.split(",") if s]
    if (not args.model_list or set(args.model_list) - set(MODELS) or not args.split_list
            or set(args.split_list) - {"random", "time"}):
        p.error(f"--models from {','.join(MODELS)}, --splits from random,time (at least one)")
    args.device = common.resolve_device(args.device)
    if args.device.type == "cuda":
        args.jobs = 1  # one process owns the GPU (a CUDA context does not survive fork)
    args.out = Path(args.out or common.results_file(
        argv, args.quick, "stage2_movielens_hashing" if args.hashing else "stage2_movielens",
        args.device, harmless=common.HARMLESS_FLAGS | {"--hashing"}))
    return args


# -------------------------------------------------------------------------------------- data
def load(args):
    """{split kind: ({train/val/test: (inputs, y (N, 1))}, schema, field sizes)} + the frame."""
    folder = Path(args.data_dir)
    try:
        movielens.layout(folder)
    except movielens.MovieLensError:
        if folder.resolve() != movielens.DATA_DIR.resolve() or folder.is_file():
            raise
        print(f"{folder}: no MovieLens files yet; fetching them once (not committed: the "
              "licence of the data does not allow redistribution)")
        movielens.fetch(folder)
    for warning in movielens.md5_warnings(folder):
        print(warning)
    task = movielens.click_task(movielens.read_frame(folder))
    out = {}
    for kind in args.split_list:
        idx = movielens.split(task, kind, seed=0)
        for part, i in idx.items():  # AUC needs both labels in every part
            labels = task["label"].to_numpy()[i]
            if len(i) == 0 or labels.min() == labels.max():
                raise movielens.MovieLensError(
                    f"the {kind} split's {part} part has {len(i)} rows, {int(labels.sum())} of "
                    f"them positive: AUC needs both labels; {len(task):,} ratings are too few "
                    "for an 8:1:1 split")
        sparse, y, schema, sizes = movielens.encode(task, idx)
        sparse, y = torch.from_numpy(sparse.copy()), torch.from_numpy(y.copy())[:, None]
        out[kind] = ({s: ({"dense": torch.zeros(len(i), 0), "sparse": sparse[i]}, y[i])
                      for s, i in idx.items()}, schema, sizes)
    return out, task


# ---------------------------------------------------------------------------- hand-written
def train_one(args, name, schema, data, lr, wd, dropout, seed):
    """One model on one split: validation and test AUC / log loss of the best epoch."""
    torch.manual_seed(seed)
    model = CTRInputs(build_model(name, schema, emb_dim=args.emb_dim, mlp=args.mlp,
                                  dropout=dropout, cross_layers=2))
    info = fit(model, data["train"], data["val"], bce, lr=lr, weight_decay=wd,
               batch_size=args.batch_size, epochs=args.epochs, patience=args.patience,
               seed=seed, quiet=True, device=args.device)
    out = {"best_epoch": info["best_epoch"]}
    for split in ("val", "test"):
        p = torch.sigmoid(predict_in_memory(model, data[split][0]))[:, 0].numpy()
        if not np.isfinite(p).all():
            raise FitError(f"{name} (lr {lr:g}, wd {wd:g}) predicts NaN on {split}: no table "
                             "written; lower --lrs")
        out[split] = common.auc_logloss(data[split][1][:, 0].numpy(), p)
    return out


def grid(args, name):
    dropouts = args.dropouts if name in MLP_MODELS else [0.0]
    return list(itertools.product(args.lrs, args.weight_decays, dropouts))


_SHARED = {}  # what the worker processes read: the args and the arrays (inherited by fork)


def _run_task(task):
    """One (model, split kind, (lr, wd, dropout), seed) run, in a worker with 1 torch thread."""
    name, kind, cfg, seed = task
    if _SHARED["jobs"] > 1:
        torch.set_num_threads(1)  # small matmuls: 2 runs x 1 thread beat 1 run x 2 threads
    data, schema, _ = _SHARED["splits"][kind]
    return train_one(_SHARED["args"], name, schema, data, *cfg, seed)


def run_tasks(pool, tasks, desc):
    runs = pool.map(_run_task, tasks) if pool else map(_run_task, tasks)
    return list(tqdm(runs, total=len(tasks), desc=desc, leave=False))


def tune_and_run(args, splits, pool):
    """Per model: the config picked on validation (seed 0, the first split asked for), then
    every seed on every split with it. Returns {model: (the grid's runs, the pick, the seeds'
    runs per split)}. All models' grids run first, then all seeds: `--jobs` runs at a time."""
    first, seed0 = args.split_list[0], args.seeds[0]
    grid_tasks = [(m, first, c, seed0) for m in args.model_list for c in grid(args, m)]
    tried = {}
    for (m, _, c, _), r in zip(grid_tasks, run_tasks(pool, grid_tasks, "grid (seed 0)")):
        tried.setdefault(m, {})[c] = r
    best = {m: max(tried[m], key=lambda c: tried[m][c]["val"]["auc"]) for m in args.model_list}
    seed_tasks = [(m, kind, best[m], s) for m in args.model_list for kind in args.split_list
                  for s in args.seeds if (kind, s) != (first, seed0)]
    done = dict(zip(seed_tasks, run_tasks(pool, seed_tasks, "seeds")))
    results = {}
    for m in args.model_list:
        runs = {kind: [tried[m][best[m]] if (kind, s) == (first, seed0) else
                       done[(m, kind, best[m], s)] for s in args.seeds]
                for kind in args.split_list}
        results[m] = (tried[m], best[m], runs)
        tqdm.write(f"{m:<7} picked lr {best[m][0]:g} wd {best[m][1]:g} dropout {best[m][2]:g}: "
                   + ", ".join(f"{k} test AUC {summary(r)['auc']}" for k, r in runs.items()))
    return results


def hashed_splits(args, splits):
    """The random split per --hash-bits-list size, made before the workers fork (they inherit
    it): {bits: the share of train values sharing a bucket}."""
    shares = {}
    for bits in args.hash_bits_list:
        parts, schema, shares[bits] = movielens.hashed_split(*splits["random"][:2], bits)
        splits[f"random@{bits}"] = (parts, schema, None)
    return shares


def hashing_runs(args, results, shares, pool):
    """Each model's pick (tuned on the exact ids) on every hashed split: the table's rows."""
    tasks = [(m, f"random@{bits}", results[m][1], s) for bits in shares
             for m in args.model_list for s in args.seeds]
    runs = {}
    for (m, kind, _, _), run in zip(tasks, run_tasks(pool, tasks, "hashed ids")):
        runs.setdefault((kind, m), []).append(run)
    return ([[bits, 2 ** bits, share] + [summary(runs[(f"random@{bits}", m)])["auc"]
                                         for m in args.model_list] for bits, share in shares.items()],
            [summary(results[m][2]["random"])["auc"] for m in args.model_list])


# -------------------------------------------------------------------------- the baseline
# LightGBM (stage2_ctr/gbdt.py: installed for this run only, tuned on validation) sees the 7
# ids as categorical codes and the genres as 0/1 flags.
def gbdt_features(data, sizes):
    """The 7 ids as categorical codes (each field's offset in the shared table removed) and one
    0/1 column per genre."""
    offsets = np.cumsum([0] + [sizes[f] for f in movielens.ID_FIELDS])
    n_ids = len(movielens.ID_FIELDS)
    out = {}
    for split, (inputs, y) in data.items():
        sparse = inputs["sparse"].numpy()
        codes = sparse[:, :n_ids] - offsets[:-1]
        genres = sparse[:, n_ids:]
        flags = np.zeros((len(sparse), sizes["genres"]), np.float32)
        rows, slots = np.nonzero(genres >= 0)
        flags[rows, genres[rows, slots] - offsets[-1]] = 1
        out[split] = (np.concatenate([codes.astype(np.float32), flags], 1), y[:, 0].numpy())
    return out


# ------------------------------------------------------------------------------------ report
def summary(runs):
    """mean ± std of test AUC and log loss, and the mean best epoch, over the seeds."""
    return {"auc": common.mean_std([r["test"]["auc"] for r in runs]),
            "logloss": common.mean_std([r["test"]["logloss"] for r in runs]),
            "auc_mean": float(np.mean([r["test"]["auc"] for r in runs])),
            "logloss_mean": float(np.mean([r["test"]["logloss"] for r in runs])),
            "epoch": float(np.mean([r["best_epoch"] for r in runs]))}


def report(args, argv, results, gbdt_result, task, seconds):
    lines = ["# Stage 2: MovieLens-100k as a click task", "",
             f"{len(task):,} ratings (rating 3 dropped), label = rating >= 4 "
             f"({task['label'].mean():.1%} positive); fields user, item, age, gender, "
             "occupation, zip, release year + the genre bag. Test split, mean ± std over seeds "
             f"{', '.join(map(str, args.seeds))}. Hand-written models: emb {args.emb_dim}, MLP "
             f"{'-'.join(map(str, args.mlp))}, batch {args.batch_size}, AdamW, early stopping "
             f"on val AUC (patience {args.patience}); learning rate, weight decay and dropout "
             f"picked on validation (seed {args.seeds[0]}, {args.split_list[0]} split) from "
             f"lr {args.lrs}, wd {args.weight_decays}, dropout {args.dropouts}."]
    if gbdt_result:
        best, _ = gbdt_result
        lines += ["LightGBM 4.7.0 (installed for the run only): ids as categoricals, genres as "
                  f"flags, picked on validation: num_leaves {best['num_leaves']}, "
                  f"min_data_in_leaf {best['min_data_in_leaf']}; early stopping on val AUC."]
    for kind in args.split_list:
        rows = []
        for name, (_, cfg, runs) in results.items():
            s = summary(runs[kind])
            rows.append([name, f"lr {cfg[0]:g}, wd {cfg[1]:g}, dropout {cfg[2]:g}", s["auc"],
                         s["logloss"], f"{s['epoch']:.1f}"])
        if gbdt_result:
            s = summary(gbdt_result[1][kind])
            rows.append(["lightgbm", "see above", s["auc"], s["logloss"],
                         f"{s['epoch']:.0f} trees"])
        lines += ["", f"## {kind} split", ""]
        lines += common.markdown_table(["model", "picked on val", "test AUC", "test logloss",
                                        "best epoch"], rows)
        lines += verdict(results, gbdt_result, kind)
    lines += ["", "## What regularization does (validation AUC, seed 0, "
              f"{args.split_list[0]} split)", ""]
    lines += common.markdown_table(["model", "lr", "weight decay", "dropout", "val AUC",
                                    "best epoch"],
                                   [[name, f"{c[0]:g}", f"{c[1]:g}", f"{c[2]:g}",
                                     f"{r['val']['auc']:.4f}", r["best_epoch"]]
                                    for name, (tried, _, _) in results.items()
                                    for c, r in tried.items()])
    lines += ["", f"Command: `{common.command_line(__file__, argv)}` ({seconds / 60:.1f} min, "
              f"{args.jobs} runs at a time, device {args.device}).",
              common.machine_line(args.device, args.threads)]
    return "\n".join(lines) + "\n"


def verdict(results, gbdt_result, kind):
    """The best hand-written model against the baseline, as measured."""
    if not gbdt_result or not results:
        return []
    means = {n: summary(runs[kind]) for n, (_, _, runs) in results.items()}
    best = max(means, key=lambda n: means[n]["auc_mean"])
    g = summary(gbdt_result[1][kind])
    auc = {n: m["auc_mean"] for n, m in means.items()} | {"lightgbm": g["auc_mean"]}
    return ["", f"Best hand-written model: {best}, test AUC "
            f"{means[best]['auc_mean'] - g['auc_mean']:+.4f} and log loss "
            f"{means[best]['logloss_mean'] - g['logloss_mean']:+.4f} against LightGBM (means "
            "over the seeds). Order by test AUC: " + " > ".join(sorted(auc, key=lambda n: -auc[n]))]


def plot(args, results, gbdt_result, path):
    plt = common.pyplot()
    fig, axes = plt.subplots(len(args.split_list), 2, figsize=(10, 3.2 * len(args.split_list)),
                             squeeze=False)
    for row, kind in zip(axes, args.split_list):
        names = list(results) + (["lightgbm"] if gbdt_result else [])
        runs = [results[n][2][kind] for n in results] + (
            [gbdt_result[1][kind]] if gbdt_result else [])
        for ax, metric in zip(row, ["auc", "logloss"]):
            vals = [[r["test"][metric] for r in rs] for rs in runs]
            ax.bar(names, [np.mean(v) for v in vals], yerr=[np.std(v) for v in vals], capsize=3,
                   color=["C0"] * len(results) + (["C3"] if gbdt_result else []))
            lo, hi = min(min(v) for v in vals), max(max(v) for v in vals)
            ax.set_ylim(lo - (hi - lo) * 0.5 - 1e-3, hi + (hi - lo) * 0.5 + 1e-3)
            ax.set(title=f"{kind} split: test {metric}")
            ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    common.save_figure(fig, path)


@common.one_line_errors(movielens.MovieLensError, gbdt.BaselineError, FitError)
def main(argv=None):
    args = parse_args(argv)
    common.set_threads(args.threads)
    t0 = time.perf_counter()
    if args.fetch:
        return movielens.fetch(args.data_dir)
    for folder, flag in [(args.out.parent, "--out"), (args.runs_dir, "--runs-dir")]:
        common.check_writable(folder, flag)  # before an hour of training, not after
    splits, task = load(args)
    print(f"MovieLens-100k click task: {len(task):,} rows, {task['label'].mean():.1%} positive; "
          + ", ".join(f"{k} split: {len(d['train'][1]):,} train" for k, (d, _, _) in
                      splits.items()) + f"; device {args.device}")
    shares = hashed_splits(args, splits) if args.hashing else None
    _SHARED.update(args=args, splits=splits, jobs=args.jobs)
    gbdt_result = None
    # LightGBM is installed first: without network that is one line now, not after training
    with contextlib.nullcontext() if args.skip_gbdt else gbdt.lightgbm() as lgb:
        with (ProcessPoolExecutor(args.jobs, mp_context=get_context("fork"))
              if args.jobs > 1 else contextlib.nullcontext()) as pool:
            results = tune_and_run(args, splits, pool)
            hashed = hashing_runs(args, results, shares, pool) if args.hashing else None
        if lgb is not None:
            feats = {kind: gbdt_features(d, sizes) for kind, (d, _, sizes) in splits.items()}
            gbdt_result = gbdt.tune_and_run(lgb, feats, len(movielens.ID_FIELDS), args.seeds,
                                            args.split_list[0], args.threads)
    seconds = time.perf_counter() - t0
    if hashed is not None:
        text = movielens.hashing_report(
            args.model_list, args.seeds, splits["random"][1].n_buckets, *hashed,
            f"Command: `{common.command_line(__file__, argv)}` ({seconds / 60:.1f} min, "
            f"device {args.device}).", common.machine_line(args.device, args.threads))
        common.write_text(args.out, text)
        print(text + f"wrote {args.out}")
        return hashed
    text = report(args, argv, results, gbdt_result, task, seconds)
    common.write_text(args.out, text)
    plot(args, results, gbdt_result, args.out.with_suffix(".png"))
    common.write_json(Path(args.runs_dir) / (args.out.stem + ".json"), {
        "script": "stage2_ctr/05_movielens.py", "dataset": "ml-100k", "seed": args.seeds,
        "command": common.command_line(__file__, argv), "device": str(args.device),
        "config": {k: str(v) if isinstance(v, (Path, torch.device)) else v
                   for k, v in vars(args).items()},
        "results": {n: {"picked": list(c), "runs": r} for n, (_, c, r) in results.items()},
        "gbdt": gbdt_result and {"picked": gbdt_result[0], "runs": gbdt_result[1]},
        "wall_s": seconds})
    print(text)
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return results


if __name__ == "__main__":
    main()
