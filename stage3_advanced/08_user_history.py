"""Stage 3, step 8: the user's behaviour history - pooling, DIN's target attention and a
transformer over the sequence, measured with AUC and gAUC.

What you learn here: every model so far saw an impression alone; industrial rankers read the
user's recent behaviours. Pooling (the mean of the past items' embeddings) turns the history
into one taste vector; DIN (Zhou et al. 2018) lets the CANDIDATE weigh each past behaviour
(w_j = MLP([h_j, t, h_j - t, h_j * t])), so a user with many interests is judged by the ones
that matter for this item; BST (Chen et al. 2019) adds the order. On generated users whose
true click probability is known (multi_interest.py) each idea has a regime where it must win
or must not; on MovieLens-100k's time order the history is real. gAUC (the AUC within each
user, averaged) says whether a gain ranks one user's items better or only tells users apart.
Read with it: stage2_ctr/models/layers.py (the sequence blocks, end of the file),
models/history.py (the four models), stage3_advanced/behaviour.py (the DIN/DIEN file format,
MovieLens histories, gAUC), multi_interest.py (the generator), user_history.py (the harness).
Run:    python stage3_advanced/08_user_history.py            # ~45 min on one core
        python stage3_advanced/08_user_history.py --quick    # small attention regime, < 20 s
        python stage3_advanced/08_user_history.py --train T --val V --test S --models base,din
                       # any files in the DIN/DIEN format (e.g. the Amazon Books release)
Writes: results/stage3_user_history.md + .png + .json (only the default run: --quick writes to
        runs/quick/, other flags to runs/partial/, CUDA to *_cuda.md); the generated and the
        MovieLens sequence files under runs/user_history/
"""
import argparse
import contextlib
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: plain imports
import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import common  # noqa: E402
from stage2_ctr import gbdt, movielens  # noqa: E402
from stage2_ctr.training import FitError  # noqa: E402
from stage3_advanced import behaviour, multi_interest  # noqa: E402
from stage3_advanced import user_history as uh  # noqa: E402

MODELS = ["base", "pool", "din", "bst"]  # din_prelu: DIN with PReLU instead of Dice
# The claim each synthetic regime tests: (the model that should lead, the one it is held to).
CLAIMS = {"attention": ("din", "pool"), "pooling": ("din", "pool"), "order": ("bst", "din")}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", help="a training file in the DIN/DIEN sequence format "
                   "(with --val and --test: train and score --models on these files only)")
    p.add_argument("--val")
    p.add_argument("--test")
    p.add_argument("--models", default=",".join(MODELS), help="from base,pool,din,din_prelu,bst")
    p.add_argument("--parts", default="synthetic,movielens", help="synthetic and/or movielens")
    p.add_argument("--regimes", default="attention,pooling,order")
    p.add_argument("--gen-seeds", type=common.seed_list, default=[0, 1, 2],
                   help="one generated data set per seed (trained with the same training seed)")
    p.add_argument("--train-seeds", type=common.seed_list, default=[0, 1],
                   help="training seeds on the first generated data set (the training spread)")
    p.add_argument("--users", type=common.positive_int_list, default=[6000, 1000, 2000],
                   help="generated users in train, val, test (8 impressions each)")
    p.add_argument("--seeds", type=common.seed_list, default=[0, 1, 2, 3, 4],
                   help="training seeds on MovieLens and on --train files")
    p.add_argument("--splits", default="time,random", help="MovieLens: time and/or random")
    p.add_argument("--data-dir", default=str(movielens.DATA_DIR))
    p.add_argument("--lrs", type=common.positive_float_list, default=[1e-3, 3e-3])
    p.add_argument("--dropouts", type=common.probability_list, default=[0.0, 0.3],
                   help="MovieLens and --train files (generated data: 0)")
    p.add_argument("--weight-decays", type=common.non_negative_float_list, default=[0.0])
    p.add_argument("--max-lens", type=common.positive_int_list, default=[10, 30, 50],
                   help="history lengths L tried (pooling model, validation AUC)")
    p.add_argument("--emb-dim", type=common.positive_int, default=16)
    p.add_argument("--mlp", type=common.layer_list, default=(200, 80))
    p.add_argument("--batch-size", type=common.positive_int, default=1024)
    p.add_argument("--epochs", type=common.positive_int, default=20)
    p.add_argument("--patience", type=common.positive_int, default=2)
    p.add_argument("--skip-gbdt", action="store_true", help="no LightGBM peer")
    p.add_argument("--device", type=common.device_arg, default="auto")
    p.add_argument("--threads", type=common.positive_int, default=1)
    p.add_argument("--quick", action="store_true", help="the attention regime only, small")
    p.add_argument("--out", default=None, help="default results/stage3_user_history.md")
    p.add_argument("--runs-dir", default=str(common.RUNS))
    args = common.parse_with_quick(p, argv, dict(
        parts="synthetic", regimes="attention", gen_seeds=[0], train_seeds=[0],
        users=[800, 200, 400], seeds=[0], lrs=[3e-3], dropouts=[0.0], epochs=3,
        skip_gbdt=True))
    args.model_list = [m for m in args.models.split(",") if m]
    args.part_list = [s for s in args.parts.split(",") if s]
    args.regime_list = [r for r in args.regimes.split(",") if r]
    args.split_list = [s for s in args.splits.split(",") if s]
    files = [args.train, args.val, args.test]
    if any(files) and not all(files):
        p.error("--train, --val and --test go together (three files in the sequence format)")
    if (not args.model_list or set(args.model_list) - set(MODELS + ["din_prelu"])
            or set(args.part_list) - {"synthetic", "movielens"} or len(args.users) != 3
            or set(args.regime_list) - set(multi_interest.REGIMES)
            or set(args.split_list) - {"time", "random"}):
        p.error("--models from base,pool,din,din_prelu,bst; --parts from synthetic,movielens; "
                f"--regimes from {','.join(multi_interest.REGIMES)}; --splits from time,random;"
                " --users three numbers")
    args.device = common.resolve_device(args.device)
    args.out = Path(args.out or common.results_file(argv, args.quick, "stage3_user_history",
                                                    args.device))
    return args


@dataclass(frozen=True)
class TrainConfig:
    """What every training of this chapter shares; written into the JSON with the results."""
    emb_dim: int
    mlp: tuple
    batch_size: int
    epochs: int
    patience: int
    device: str


# ------------------------------------------------------------------------------ training
def train(cfg, data, name, hyper, seed):
    """One model ('din_prelu' = DIN with PReLU in its unit) -> (metrics, the trained model)."""
    kind, activation = ("din", "prelu") if name == "din_prelu" else (name, "dice")
    return uh.train_one(data, kind, hyper, seed, torch.device(cfg.device), cfg.epochs,
                        cfg.patience, cfg.batch_size, cfg.emb_dim, cfg.mlp, activation)


def pick_and_run(cfg, first, others, models, grid, seeds, desc, kept=None):
    """Per model: every config of `grid` on `first` (seeds[0]), the best by validation AUC,
    then the pick on every (data set, seed) of `others`. Returns {model: {picked, grid (val AUC
    per config), runs}}; kept collects the trained models of the first data set."""
    out = {}
    for name in tqdm(models, desc=desc, leave=False):
        tried = {}
        for hyper in grid:
            tried[tuple(hyper.values())] = train(cfg, first, name, hyper, seeds[0])
        best = max(tried, key=lambda c: tried[c][0]["val"]["auc"])
        runs = [tried[best][0]] + [train(cfg, d, name, dict(zip(grid[0], best)), s)[0]
                                   for d, s in others]
        if kept is not None:
            kept[name] = tried[best][1]
        out[name] = {"picked": dict(zip(grid[0], best)), "runs": runs,
                     "grid": {str(c): r[0]["val"]["auc"] for c, r in tried.items()}}
    return out


def grid_of(lrs, wds, dropouts):
    return [dict(lr=lr, wd=wd, dropout=d) for lr in lrs for wd in wds for d in dropouts]


def lightgbm_runs(lgb, datasets, seeds, threads):
    """LightGBM on the history aggregates: picked on the first data set's validation AUC."""
    feats = [uh.lightgbm_features(d) for d in datasets]
    space = gbdt.search_space(threads)
    tried = [uh.lightgbm_run(lgb, feats[0], datasets[0].users, p, seeds[0]) for p in space]
    best = space[int(np.argmax([t["val"]["auc"] for t in tried]))]
    return {"picked": {k: best[k] for k in ("num_leaves", "min_data_in_leaf")},
            "runs": [uh.lightgbm_run(lgb, f, d.users, best, s)
                     for f, d, s in zip(feats, datasets, seeds)]}


# -------------------------------------------------------------------------------- the parts
def synthetic_part(args, cfg, lgb):
    """Per regime: one data set per generator seed; lr picked on the first; the training-seed
    spread on the first; DIN with PReLU beside Dice; LightGBM with the history aggregates."""
    out, kept, attention = {}, {}, None
    for regime in args.regime_list:
        sets, metas = [], []
        for s in args.gen_seeds:
            folder = Path(args.runs_dir) / "user_history" / f"{regime}_seed{s}"
            d, m = uh.synthetic_data(regime, s, folder, tuple(args.users), 40)
            sets.append(d)
            metas.append(m)
        attention = sets[0] if regime == "attention" else attention
        grid = grid_of(args.lrs, [0.0], [0.0])
        models = pick_and_run(cfg, sets[0], list(zip(sets[1:], args.gen_seeds[1:])),
                              args.model_list, grid, args.gen_seeds, regime,
                              kept.setdefault(regime, {}))
        for name in set(CLAIMS[regime]) & set(models):  # the claim's two models: the same
            r = models[name]                             # data set, other training seeds
            r["train_seed_runs"] = [r["runs"][0]] + [
                train(cfg, sets[0], name, r["picked"], s)[0] for s in args.train_seeds
                if s != args.gen_seeds[0]]  # that seed's run is runs[0]
        out[regime] = {"models": models, "meta": metas, "rows": {
            k: len(v[1]) for k, v in sets[0].splits.items()}}
        if regime == "attention" and "din" in models and "din_prelu" not in models:
            out[regime]["prelu"] = [train(cfg, d, "din_prelu", models["din"]["picked"], s)[0]
                                    for d, s in zip(sets, args.gen_seeds)]
        if lgb is not None:
            out[regime]["lightgbm"] = lightgbm_runs(lgb, sets, args.gen_seeds, args.threads)
    return out, kept, attention


def movielens_part(args, cfg, lgb):
    """The time split picks L (pooling model), then each model's lr / dropout / wd (seed 0);
    every split runs every seed with the picks."""
    folder = Path(args.data_dir)
    try:
        movielens.layout(folder)
    except movielens.MovieLensError:
        if folder.resolve() != movielens.DATA_DIR.resolve() or folder.is_file():
            raise
        movielens.fetch(folder)  # the default folder: fetched once (05_movielens.py's rule)
    task = movielens.click_task(movielens.read_frame(folder, say=tqdm.write))
    files = {k: uh.movielens_files(task, k, Path(args.runs_dir) / "user_history" /
                                   f"movielens_{k}", max(args.max_lens), tqdm.write)
             for k in args.split_list}
    first = args.split_list[0]
    sweep = {L: train(cfg, uh.prepare(files[first], L, first), "pool", dict(
        lr=max(args.lrs), wd=0.0, dropout=max(args.dropouts)), args.seeds[0])[0]["val"]["auc"]
        for L in args.max_lens}
    L = max(sweep, key=sweep.get)
    data = {k: uh.prepare(files[k], L, f"MovieLens {k} split") for k in args.split_list}
    grid = grid_of(args.lrs, args.weight_decays, args.dropouts)
    others = [(data[k], s) for k in args.split_list for s in args.seeds
              if (k, s) != (first, args.seeds[0])]
    models = pick_and_run(cfg, data[first], others, args.model_list, grid, args.seeds,
                          "MovieLens")
    out = {"L": L, "L_sweep_val_auc": sweep, "rows": len(task), "splits": {}}
    n = len(args.seeds)
    for i, k in enumerate(args.split_list):
        out["splits"][k] = {name: dict(r, runs=r["runs"][i * n:(i + 1) * n])
                            for name, r in models.items()}
        if "din" in models and "din_prelu" not in models and k == first:
            out["prelu"] = [train(cfg, data[k], "din_prelu", models["din"]["picked"], s)[0]
                            for s in args.seeds]
        if lgb is not None:
            out["splits"][k]["lightgbm"] = lightgbm_runs(lgb, [data[k]] * n, args.seeds,
                                                         args.threads)
    return out


def files_part(args, cfg):
    """--train/--val/--test: the chosen models on the user's files, L = the first --max-lens."""
    rows = {k: behaviour.read_rows(getattr(args, k), tqdm.write) for k in ("train", "val",
                                                                           "test")}
    data = uh.prepare(rows, args.max_lens[0], Path(args.train).name)
    others = [(data, s) for s in args.seeds[1:]]
    return pick_and_run(cfg, data, others, args.model_list,
                        grid_of(args.lrs, args.weight_decays, args.dropouts), args.seeds,
                        "files"), data


def speed(kept, data, device, calls):
    """Training samples/s (the first run of each model) and forward p50/p99 in ms at batch
    1/64/1024, next to the Stage 2 field models on MovieLens's layout (7 ids + a genre bag)."""
    from stage2_ctr.models import FieldSchema, build_model
    from stage2_ctr.training import CTRInputs
    out = {}
    inputs = data.splits["test"][0]
    schema = FieldSchema(n_dense=0, n_sparse=7, n_buckets=3000, bags=(6,))
    fields = {"dense": torch.zeros(1024, 0), "sparse": torch.randint(0, 3000, (1024, 13))}
    contenders = {n: (m, inputs) for n, m in kept.items()} | {
        f"{n} (Stage 2, fields)": (CTRInputs(build_model(n, schema, emb_dim=16,
                                                         mlp=(200, 80))), fields)
        for n in ("dnn", "deepfm")}
    for name, (model, x) in contenders.items():
        out[name] = {f"batch {b}": uh.latency(model, x, b, device, calls)
                     for b in (1, 64, 1024)}
    return out


@common.one_line_errors(behaviour.FormatError, movielens.MovieLensError, gbdt.BaselineError,
                        FitError)
def main(argv=None):
    args = parse_args(argv)
    common.set_threads(args.threads)
    t0 = time.perf_counter()
    for folder, flag in [(args.out.parent, "--out"), (args.runs_dir, "--runs-dir")]:
        common.check_writable(folder, flag)
    cfg = TrainConfig(args.emb_dim, tuple(args.mlp), args.batch_size, args.epochs,
                      args.patience, str(args.device))
    print(f"user-behaviour history: models {', '.join(args.model_list)}; device {args.device}")
    result = {"script": "stage3_advanced/08_user_history.py", "config": asdict(cfg),
              "command": common.command_line(__file__, argv), "device": str(args.device)}
    if args.train:
        result["files"], data = files_part(args, cfg)
        result["files_rows"] = {k: len(v[1]) for k, v in data.splits.items()}
    else:
        with contextlib.nullcontext() if args.skip_gbdt else gbdt.lightgbm() as lgb:
            if "synthetic" in args.part_list:
                result["synthetic"], kept, attention = synthetic_part(args, cfg, lgb)
                if attention is not None:
                    result["attention_example"] = uh.attention_example(
                        kept["attention"].get("din"), attention)
                    result["speed"] = speed(kept["attention"], attention, args.device,
                                            20 if args.quick else 100)
            if "movielens" in args.part_list:
                result["movielens"] = movielens_part(args, cfg, lgb)
    result["wall_s"] = time.perf_counter() - t0
    text = uh.report(args, argv, result, CLAIMS, __file__)
    common.write_text(args.out, text)
    common.write_json(args.out.with_suffix(".json"), result)
    if not args.train:
        uh.plot(result, args.out.with_suffix(".png"))
    print(text)
    print(f"wrote {args.out} (+ .json{'' if args.train else ', .png'})")
    return result


if __name__ == "__main__":
    main()
