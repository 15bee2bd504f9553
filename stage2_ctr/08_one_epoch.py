"""Stage 2, step 8: the one-epoch phenomenon - why the MLP models get worse in their second epoch.

What you learn here: `make demo` keeps DeepFM's first epoch because its validation AUC falls at
the start of the second. Measured here over 3 epochs with 4 evaluations per epoch: which models
drop (the Embedding + MLP ones) and which do not (LR, FM), on 3 generated data sets, one more
interaction regime and MovieLens; what makes the drop larger or smaller (optimizer, learning
rate, rare-id filtering, hash size, embedding size, dropout, weight decay: Zhang et al., CIKM
2022); where it comes from (a probe across the epoch boundary: the MLP's change fits rows seen
before and hurts unseen rows); and whether re-drawing the embedding tables at every epoch start
(Liu et al. 2023, MEDA; train_ctr --reinit-emb) lets more epochs beat one.

Read with it: stage2_ctr/one_epoch.py (reading curves, the in-memory loop, the probe, the
report), train_ctr.py (--evals-per-epoch, --optimizer, --reinit-emb), training.py
(make_optimizers, reset_embeddings), stage2_ctr/README.md (what it means).
Run:    python stage2_ctr/08_one_epoch.py            # ~30 min on one core (fetches MovieLens once)
        python stage2_ctr/08_one_epoch.py --quick    # a smoke test, < 1 min
        python stage2_ctr/08_one_epoch.py --parts curves,fix --models deepfm
        A finished trainer run (runs/oe_*/metrics.json with the same config and data
        fingerprints) is read back, not retrained (--fresh retrains).
Reads:  stage2_ctr/data/compare_<regime>_<rows>_seed<d>/ (made here with the generator; the
        lowrank 200k sets are the demo's data, seed 0 = `01_make_subset.py --synthetic 200000`),
        stage2_ctr/data/ml-100k/ (05_movielens.py's files)
Writes: results/stage2_one_epoch.md + .png (a default run; --quick: runs/quick/, other flags:
        runs/partial/), runs/oe_*/metrics.json
"""
import argparse
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: plain imports
import numpy as np  # noqa: E402
import torch  # noqa: E402

import common  # noqa: E402
from stage2_ctr import movielens, one_epoch, synthetic  # noqa: E402
from stage2_ctr.compare import dataset, run_all  # noqa: E402
from stage2_ctr.models import MODELS, build_model, criteo_schema  # noqa: E402
from stage2_ctr.train_ctr import TrainConfig, dense_stats  # noqa: E402

HERE = Path(__file__).resolve().parent
PARTS = ["curves", "regime", "movielens", "factors", "probe", "fix"]
FACTORS = ["optimizer", "lr", "min_count", "hash_bits", "emb_dim", "dropout", "weight_decay"]
# what --quick changes, for the flags the command line does not set itself
QUICK = dict(rows=5000, regime_rows=4000, data_seeds=[0, 1], models="fm,deepfm", epochs=2,
             evals_per_epoch=2, hash_bits=12, mlp=(32,), emb_dim=4, batch_size=1000,
             adagrad_lrs=[0.05], sgd_lrs=[0.3],
             factors="min_count", probe_models="deepfm", fix_models="deepfm",
             movielens_rows=0)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default=",".join(PARTS), help=f"any of {','.join(PARTS)}")
    p.add_argument("--models", default=",".join(MODELS), help="models of curves/regime/movielens")
    p.add_argument("--data-seeds", type=common.seed_list, default=[0, 1, 2],
                   help="generator seeds (one data set each); MovieLens: its split seeds")
    p.add_argument("--rows", type=common.positive_int, default=200_000,
                   help="rows of the demo's (lowrank) data sets, split 8:1:1")
    p.add_argument("--regime", choices=synthetic.REGIMES, default="dot",
                   help="the second interaction regime (synthetic.py)")
    p.add_argument("--regime-rows", type=common.positive_int, default=100_000)
    p.add_argument("--epochs", type=common.checked(int, lambda v: v >= 2, ">= 2"), default=3)
    p.add_argument("--evals-per-epoch", type=common.positive_int, default=4)
    p.add_argument("--batch-size", type=common.positive_int, default=2048)
    p.add_argument("--lr", type=common.positive_float, default=0.002, help="Adam, as the demo")
    p.add_argument("--emb-dim", type=common.positive_int, default=16)
    p.add_argument("--mlp", type=common.layer_list, default=(256, 128))
    p.add_argument("--cross-layers", type=common.positive_int, default=2)
    p.add_argument("--hash-bits", type=common.checked(int, lambda v: 8 <= v <= 24, "in [8, 24]"),
                   default=20)
    p.add_argument("--factors", default=",".join(FACTORS),
                   help="the factor table's rows (DeepFM, first data seed)")
    p.add_argument("--adagrad-lrs", type=common.positive_float_list, default=[0.02, 0.05, 0.1])
    p.add_argument("--sgd-lrs", type=common.positive_float_list, default=[0.1, 0.2, 0.5],
                   help="SGD with momentum 0.9")
    p.add_argument("--probe-models", default="deepfm,fm")
    p.add_argument("--fix-models", default="dnn,deepfm,dcn,dcnv2",
                   help="trained with --reinit-emb and for one epoch")
    p.add_argument("--movielens-dir", default=str(movielens.DATA_DIR))
    p.add_argument("--movielens-rows", type=common.non_negative_int, default=0,
                   help="(tests) 0: all")
    p.add_argument("--jobs", type=common.positive_int, default=1,
                   help="trainer runs at a time (each 1 torch thread)")
    p.add_argument("--quick", action="store_true", help="tiny data, 2 models, 2 epochs")
    p.add_argument("--fresh", action="store_true", help="retrain every run")
    p.add_argument("--data-dir", default=str(HERE / "data"), help="where compare_*/ go")
    p.add_argument("--runs-dir", default=str(common.RUNS))
    args = common.parse_with_quick(p, argv, QUICK)
    args.part_list = [x for x in args.parts.split(",") if x]
    args.model_list = [m for m in args.models.split(",") if m]
    lists = [args.model_list, args.probe_models.split(","), args.fix_models.split(",")]
    factors = set(x for x in args.factors.split(",") if x)
    if set(args.part_list) - set(PARTS) or any(set(x) - set(MODELS) for x in lists) or \
            factors - set(FACTORS):
        p.error(f"--parts from {','.join(PARTS)}; models from {','.join(MODELS)}; --factors "
                f"from {','.join(FACTORS)}")
    argv = sys.argv[1:] if argv is None else argv
    args.command = common.command_line(__file__, argv)
    args.out_dir = Path(common.results_folder(argv, args.quick))
    common.check_writable(args.out_dir, "the results folder")
    return args


# ------------------------------------------------------------------ trainer runs (files)
def config(args, folder, model, tag="base", **changes):
    """One trainer run: the demo's budget, `evals_per_epoch` validations per epoch, no early
    stop (every epoch is run; best.pt still keeps the best validation step)."""
    cfg = TrainConfig(model=model, train=[str(folder / "train.txt")],
                      val=[str(folder / "val.txt")], test=[str(folder / "test.txt")],
                      epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                      emb_dim=args.emb_dim, mlp=tuple(args.mlp), cross_layers=args.cross_layers,
                      hash_bits=args.hash_bits, evals_per_epoch=args.evals_per_epoch,
                      patience=args.epochs * args.evals_per_epoch + 1, threads=1,
                      num_workers=0, amp="off", runs_dir=args.runs_dir)
    for key, value in changes.items():
        setattr(cfg, key, value)
    cfg.run_name = f"oe_{folder.name}_{model}_{tag}"
    return cfg


def data_sets(args, regime, rows):
    return [dataset(regime, rows, args.data_dir, d) for d in args.data_seeds]


def curves_part(args, regime, rows, pool, log):
    """{model: [metrics per data set]}: every model, every data set, `epochs` epochs."""
    folders = data_sets(args, regime, rows)
    cfgs = {(m, i): config(args, f, m) for m in args.model_list for i, f in enumerate(folders)}
    done = run_all(list(cfgs.values()), pool, log, args.fresh)
    return {m: [done[cfgs[(m, i)].run_name] for i in range(len(folders))]
            for m in args.model_list}


def rare_of(args, regime, rows):
    """one_epoch.rare_share of the first data set's training split (table rows as the model
    sees them: hashed, 2^hash_bits)."""
    train = data_sets(args, regime, rows)[0] / "train.txt"
    stats = dense_stats(None, [str(train)], 0, print)
    return one_epoch.rare_share(one_epoch.read_split([train], args.hash_bits, stats)[1])


def factor_settings(args):
    """(factor, setting, TrainConfig changes): Zhang et al.'s list, one change at a time."""
    table = {"optimizer": [("adagrad", f"Adagrad lr {x:g}", {"optimizer": "adagrad", "lr": x})
                           for x in args.adagrad_lrs]
             + [("sgd", f"SGD+momentum lr {x:g}", {"optimizer": "sgd", "lr": x})
                for x in args.sgd_lrs],
             "lr": [(None, f"Adam lr {x:g}", {"lr": x}) for x in (args.lr / 4, args.lr * 2.5)],
             "min_count": [(None, f"--min-count {x}", {"min_count": x}) for x in (10, 100)],
             "hash_bits": [(None, f"--hash-bits {x}", {"hash_bits": x}) for x in (14, 16)
                           if x < args.hash_bits],
             "emb_dim": [(None, f"--emb-dim {x}", {"emb_dim": x}) for x in (4, 64)],
             "dropout": [(None, f"--dropout {x:g}", {"dropout": x}) for x in (0.2, 0.5)],
             "weight_decay": [(None, f"--weight-decay {x:g}", {"weight_decay": x})
                              for x in (1e-4, 1e-2)]}
    return [(factor, family, label, changes) for factor in args.factors.split(",") if factor
            for family, label, changes in table[factor]]


def factors_part(args, base, pool, log):
    """[(factor, setting, family, metrics)] for DeepFM on the first demo data set; base: that
    data set's plain DeepFM run (Adam, the demo's lr)."""
    folder = data_sets(args, "lowrank", args.rows)[0]
    settings = factor_settings(args)
    cfgs = [config(args, folder, "deepfm", "f_" + "_".join(f"{k}{v:g}" if not isinstance(v, str)
                                                           else v for k, v in ch.items()), **ch)
            for _, _, _, ch in settings]
    done = run_all(cfgs, pool, log, args.fresh)
    return [("baseline", f"Adam lr {args.lr:g} (the demo)", "adam", base)] + [
        (factor, label, family, done[c.run_name])
        for (factor, family, label, _), c in zip(settings, cfgs)]


def fix_part(args, base, pool, log):
    """{model: {"one": [...], "reinit": [...], "plain": [...]}} metrics per data set: one epoch,
    `epochs` epochs with --reinit-emb, and the curves part's plain runs."""
    folders = data_sets(args, "lowrank", args.rows)
    models = [m for m in args.fix_models.split(",") if m]
    cfgs = {(m, i, kind): config(args, f, m, kind, **ch) for m in models
            for i, f in enumerate(folders)
            for kind, ch in [("one", {"epochs": 1}), ("reinit", {"reinit_emb": True})]}
    done = run_all(list(cfgs.values()), pool, log, args.fresh)
    plain = base if set(models) <= set(base) else curves_part(
        argparse.Namespace(**{**vars(args), "model_list": models}), "lowrank", args.rows,
        pool, log)
    return {m: {"one": [done[cfgs[(m, i, "one")].run_name] for i in range(len(folders))],
                "reinit": [done[cfgs[(m, i, "reinit")].run_name] for i in range(len(folders))],
                "plain": plain[m]} for m in models}


# ------------------------------------------------------------------- in memory: MovieLens
def movielens_part(args):
    """({model: [{"history": ...} per split seed]}, rare_share of the first split's training
    ids): MovieLens-100k as a click task (05's
    protocol), random 8:1:1 split per seed, Adam, a fresh order every epoch."""
    folder = Path(args.movielens_dir)
    try:
        movielens.layout(folder)
    except movielens.MovieLensError:
        if folder.resolve() != movielens.DATA_DIR.resolve():
            raise
        movielens.fetch(folder)
    task = movielens.click_task(movielens.read_frame(folder, say=lambda *a: None))
    if args.movielens_rows:
        task = task.iloc[:args.movielens_rows].reset_index(drop=True)
    out, rare = {m: [] for m in args.model_list}, None
    for seed in args.data_seeds:
        idx = movielens.split(task, "random", seed=seed)
        sparse, y, schema, _ = movielens.encode(task, idx)
        sparse, y = torch.from_numpy(sparse.copy()), torch.from_numpy(y.copy())
        train, val = ((torch.zeros(len(idx[s]), 0), sparse[idx[s]], y[idx[s]])
                      for s in ("train", "val"))
        rare = rare if rare is not None else one_epoch.rare_share(train[1][:, :schema.n_sparse])
        for m in args.model_list:
            torch.manual_seed(seed)
            model = build_model(m, schema, emb_dim=args.emb_dim, mlp=tuple(args.mlp),
                                cross_layers=args.cross_layers, sparse=True)
            history, _ = one_epoch.train_in_memory(model, train, val, args.lr, args.epochs,
                                                   args.evals_per_epoch, 1024, seed,
                                                   shuffle=True)
            out[m].append({"history": history, "splits": {}})
        print(f"  MovieLens split seed {seed}: " + ", ".join(
            f"{m} drop {one_epoch.shape_of(out[m][-1]['history'])['drop']:+.4f}"
            for m in args.model_list), flush=True)
    return out, rare


# ------------------------------------------------------------------- in memory: the probe
def probe_part(args):
    """{model: [probe dict per data set]} on the demo's data sets (one_epoch.boundary_probe)."""
    out = {}
    for folder in data_sets(args, "lowrank", args.rows):
        train_file = folder / "train.txt"
        stats = dense_stats(None, [str(train_file)], 0, print)
        train = one_epoch.read_split([train_file], args.hash_bits, stats)
        val = one_epoch.read_split([folder / "val.txt"], args.hash_bits, stats)
        for m in [x for x in args.probe_models.split(",") if x]:
            def make(m=m):
                return build_model(m, criteo_schema(args.hash_bits), emb_dim=args.emb_dim,
                                   mlp=tuple(args.mlp), cross_layers=args.cross_layers,
                                   sparse=True)
            r = one_epoch.boundary_probe(make, train, val, args.lr, args.batch_size, seed=0)
            out.setdefault(m, []).append(r)
            print(f"  probe {folder.name} {m}: seen {r[('seen', 'all of B')]:+.4f}, unseen "
                  f"{r[('unseen', 'all of B')]:+.4f} logloss", flush=True)
    return out


class InProcess:
    """A pool of one: --jobs 1 trains in this process (no fork, one torch thread)."""

    def map(self, fn, items):
        return map(fn, items)


@common.one_line_errors(movielens.MovieLensError)
def main(argv=None):
    args = parse_args(argv)
    t0 = time.perf_counter()
    common.set_threads(1)
    log = {"runs": 0, "reused": 0, "train_s": 0.0, "seen": {}}
    parts = {"rare": {}}
    pool = (ProcessPoolExecutor(args.jobs, mp_context=get_context("fork")) if args.jobs > 1
            else InProcess())
    want = set(args.part_list)
    if want & {"curves", "factors", "fix"}:
        print("curves: the demo's data (lowrank), every model", flush=True)
        parts["curves"] = curves_part(args, "lowrank", args.rows, pool, log)
        parts["rare"]["curves"] = rare_of(args, "lowrank", args.rows)
    if "regime" in want:
        print(f"curves: the {args.regime} regime", flush=True)
        parts["regime"] = curves_part(args, args.regime, args.regime_rows, pool, log)
        parts["rare"]["regime"] = rare_of(args, args.regime, args.regime_rows)
    if "movielens" in want:
        print("curves: MovieLens-100k", flush=True)
        parts["movielens"], parts["rare"]["movielens"] = movielens_part(args)
    if "factors" in want and "deepfm" in args.model_list:
        print("factors: DeepFM, first data set", flush=True)
        parts["factors"] = factors_part(args, parts["curves"]["deepfm"][0], pool, log)
    if "probe" in want:
        print("probe: across the epoch boundary", flush=True)
        parts["probe"] = probe_part(args)
    if "fix" in want:
        print("fix: --reinit-emb against one epoch", flush=True)
        parts["fix"] = fix_part(args, parts["curves"], pool, log)
    if args.jobs > 1:
        pool.shutdown()
    one_epoch.write_report(args, parts, log, time.perf_counter() - t0)
    return parts


if __name__ == "__main__":
    main()
