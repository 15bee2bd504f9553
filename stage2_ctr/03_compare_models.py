"""Stage 2, step 3: explicit vs implicit crosses - every CTR model on three kinds of planted
interactions, against the oracle, over several generated data sets.

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
per model on validation (data seed 0, seed 0), then 3 training seeds on that data set and one
run on each other generated data set (--data-seeds): a gap that holds for one data set only is
not a lesson. Plus: the validation curve per data set in the dot regime (when does a DNN escape
its plateau?), a learning curve over training rows, what the frequency threshold (--min-count)
and the hash table's size (--hash-bits: the cost of collisions) are worth, and the optimizer
decision of the trainer (AdamW vs Adam + L2, on validation).

Read with it: stage2_ctr/synthetic.py (the regimes), stage2_ctr/train_ctr.py (one run each),
stage2_ctr/compare.py (data sets, reuse of finished runs).
Run:    python stage2_ctr/03_compare_models.py                  # ~40 min, 2 runs at a time
        python stage2_ctr/03_compare_models.py --regimes dot --seeds 0 --parts models
        python stage2_ctr/03_compare_models.py --quick          # ~1 min, a smoke test
        A finished run (runs/cmp_*/metrics.json whose recorded config and data fingerprints
        equal today's) is read back, not retrained: a killed comparison picks up where it
        stopped (--fresh retrains all).
Reads:  stage2_ctr/data/compare_<regime>_<rows>_seed<d>/ (made here with the generator)
Writes: results/stage2_models.md + .png, results/stage2_learning_curve.png,
        results/stage2_weight_decay.md (a default run; --quick: runs/quick/, other flags:
        runs/partial/), runs/cmp_*/metrics.json
"""
import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: plain imports
import common  # noqa: E402
from stage2_ctr import synthetic  # noqa: E402
from stage2_ctr.compare import (best_epoch, collisions, dataset, expected_wins_of,  # noqa: E402
                                write_report, run_all)
from stage2_ctr.models import MODELS  # noqa: E402
from stage2_ctr.train_ctr import TrainConfig  # noqa: E402

HERE = Path(__file__).resolve().parent
# per regime: rows (8:1:1), epochs (early stopping picks the best one), what each test expects
ROWS = {"lowrank": 1_000_000, "dot": 1_000_000, "fieldpair": 500_000}
EPOCHS = {"lowrank": 1, "dot": 4, "fieldpair": 2}
EXPECTED = {"lowrank": [("lr", "fm"), ("lr", "dnn")],
            "dot": [("dnn", "fm"), ("dnn", "deepfm")],
            "fieldpair": [("dnn", "dcnv2")]}
MARGIN = 0.003  # an expected win: by at least this much AUC and by more than 3x the seed std
PARTS = ["models", "curve", "min_count", "hash_bits", "optimizer"]
# what --quick changes, for the flags the command line does not set itself
QUICK = {"seeds": [0], "data_seeds": [0, 1], "curve_rows": [], "regimes": "dot,fieldpair",
         "ablation_models": "", "lrs": [0.005], "hash_bits_list": [12, 16], "rows": 60_000,
         "hash_models": "fm", "weight_decays": [0.0, 1e-4]}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default=",".join(PARTS), help=f"any of {','.join(PARTS)}")
    p.add_argument("--regimes", default=None, help="default lowrank,dot,fieldpair")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--seeds", type=common.int_list, default=None,
                   help="training seeds on the first data set (default 0,1,2)")
    p.add_argument("--data-seeds", type=common.int_list, default=None,
                   help="generator seeds: one data set each (default 0,1,2); the others than "
                        "the first are trained with the first training seed")
    p.add_argument("--rows", type=common.positive_int, default=None,
                   help="synthetic rows of every regime, split 8:1:1 (default ROWS: 1M for "
                        "lowrank and dot, 0.5M for fieldpair; --quick 60k)")
    p.add_argument("--lrs", type=common.float_list, default=None,
                   help="learning rates tried per model on the first data and training seed; "
                        "the best on val is kept (default 0.002,0.005)")
    p.add_argument("--min-count", type=common.non_negative_int, default=10,
                   help="values seen fewer times in train -> their field's rare bucket")
    p.add_argument("--curve-rows", type=common.int_list, default=None,
                   help="dot regime: more training-set sizes (default 100000,200000,400000)")
    p.add_argument("--curve-models", default="fm,dnn,deepfm")
    p.add_argument("--ablation-models", default=None,
                   help="trained once more without the frequency threshold (default fm,dnn)")
    p.add_argument("--hash-bits-list", type=common.int_list, default=None,
                   help="table sizes 2^b for the collision part (default 14,16,18,20,22)")
    p.add_argument("--hash-models", default=None, help="models of that part (default lr,fm,dnn)")
    p.add_argument("--weight-decays", type=common.float_list, default=None,
                   help="the optimizer part: AdamW vs Adam+L2 at these (default 0,1e-5,1e-4)")
    p.add_argument("--batch-size", type=common.positive_int, default=2048)
    p.add_argument("--emb-dim", type=common.positive_int, default=16)
    p.add_argument("--mlp", type=common.layer_list, default=(256, 128))
    p.add_argument("--cross-layers", type=common.positive_int, default=2,
                   help="DCN / DCN-v2 cross layers (2: crosses up to degree 3)")
    p.add_argument("--jobs", type=common.positive_int, default=2,
                   help="trainings at a time (each with 1 torch thread, parsing in-process)")
    p.add_argument("--device", type=common.device_arg, default="auto",
                   help="auto | cpu | cuda | cuda:N for every training; on CUDA the tables go to "
                        "runs/cuda/ (the committed ones are CPU runs: --sparse-emb auto trains "
                        "the embeddings with another optimizer there, 09_sparse_or_dense.py)")
    p.add_argument("--quick", action="store_true", help="60k rows, dot + fieldpair, 2 data sets")
    p.add_argument("--fresh", action="store_true", help="retrain every run")
    p.add_argument("--out-dir", default=None, help="default results/ (see Writes above)")
    p.add_argument("--data-dir", default=str(HERE / "data"), help="where compare_*/ go")
    p.add_argument("--runs-dir", default=str(common.RUNS))
    args = p.parse_args(argv)
    full = {"seeds": [0, 1, 2], "data_seeds": [0, 1, 2], "curve_rows": [100_000, 200_000,
            400_000], "regimes": "lowrank,dot,fieldpair", "ablation_models": "fm,dnn",
            "lrs": [0.002, 0.005], "hash_bits_list": [14, 16, 18, 20, 22], "rows": None,
            "hash_models": "lr,fm,dnn", "weight_decays": [0.0, 1e-5, 1e-4]}
    for key, value in (QUICK if args.quick else full).items():
        if getattr(args, key) is None:  # --quick never overrides a flag the user gave
            setattr(args, key, value)
    args.rows_of = {g: args.rows or ROWS[g] for g in ROWS}
    args.regime_list = [r for r in args.regimes.split(",") if r]
    args.model_list = [m for m in args.models.split(",") if m]
    args.part_list = [x for x in args.parts.split(",") if x]
    if set(args.regime_list) - set(synthetic.REGIMES) or set(args.model_list) - set(MODELS) \
            or set(args.part_list) - set(PARTS) or not args.seeds or not args.data_seeds:
        p.error(f"--regimes from {synthetic.REGIMES}, --models from {MODELS}, --parts from "
                f"{PARTS}; --seeds and --data-seeds not empty")
    argv = sys.argv[1:] if argv is None else argv
    args.command = common.command_line(__file__, argv)
    args.out_dir = Path(args.out_dir or common.results_folder(argv, args.quick,
                                                              common.HARMLESS_FLAGS | {"--device"}))
    if common.resolve_device(args.device).type == "cuda" and args.out_dir == common.RESULTS:
        args.out_dir = common.RUNS / "cuda"  # a GPU run never overwrites the CPU tables
    return args


def run_config(args, regime, model, lr, seed, data_seed, tag="main", rows=None, **changes):
    """The TrainConfig of one comparison run: the same budget for every model of a regime."""
    folder = dataset(regime, rows or args.rows_of[regime], args.data_dir, data_seed)
    cfg = TrainConfig(model=model, seed=seed, train=[str(folder / "train.txt")],
                      val=[str(folder / "val.txt")], test=[str(folder / "test.txt")],
                      epochs=EPOCHS[regime], patience=1, batch_size=args.batch_size, lr=lr,
                      emb_dim=args.emb_dim, mlp=tuple(args.mlp), min_count=args.min_count,
                      cross_layers=args.cross_layers, threads=1, num_workers=0,
                      device=args.device,
                      amp="off", runs_dir=args.runs_dir)  # fp32: the same numbers on any CPU
    for key, value in changes.items():
        setattr(cfg, key, value)
    extra = "".join(f"_{k}{v:g}" for k, v in sorted(changes.items()) if k != "min_count")
    cfg.run_name = (f"cmp_{tag}_{regime}_d{data_seed}_{model}_lr{lr:g}_mc{cfg.min_count}"
                    f"{extra}_s{seed}")
    return cfg


# -------------------------------------------------------------------------------- the runs
def compare_regime(args, regime, pool, log):
    """Learning rates on the first data and training seed (best on val), then every training
    seed on that data set and the first training seed on every other data set."""
    d0, s0 = args.data_seeds[0], args.seeds[0]
    tries = run_all([run_config(args, regime, m, lr, s0, d0) for m in args.model_list
                     for lr in args.lrs], pool, log, args.fresh)
    best_lr = {m: max(args.lrs, key=lambda lr: tries[run_config(args, regime, m, lr, s0, d0)
                                                     .run_name]["splits"]["val"]["auc"])
               for m in args.model_list}
    grid = [(m, s, d0) for m in args.model_list for s in args.seeds] + [
        (m, s0, d) for m in args.model_list for d in args.data_seeds[1:]]
    runs = run_all([run_config(args, regime, m, best_lr[m], s, d) for m, s, d in grid],
                   pool, log, args.fresh)
    get = {(m, s, d): runs[run_config(args, regime, m, best_lr[m], s, d).run_name]
           for m, s, d in grid}
    rows = []
    for m in args.model_list:
        seeds = [get[m, s, d0] for s in args.seeds]       # training seeds, first data set
        datas = [get[m, s0, d] for d in args.data_seeds]  # data sets, first training seed
        rows.append({"model": m, "lr": best_lr[m],
                     "auc": [r["splits"]["test"]["auc"] for r in seeds],
                     "val_auc": [r["splits"]["val"]["auc"] for r in seeds],
                     "logloss": [r["splits"]["test"]["logloss"] for r in seeds],
                     "data_auc": [r["splits"]["test"]["auc"] for r in datas],
                     "data_gap": [r["splits"]["test"]["auc_gap_to_oracle"] for r in datas],
                     "oracle": [r["splits"]["test"]["oracle"]["auc"] for r in datas],
                     "val_curve": [[h["val_auc"] for h in r["history"]] for r in datas],
                     "best_epoch": [best_epoch(r) for r in seeds + datas[1:]],
                     "samples_per_s": [r["train_samples_per_s"] for r in seeds],
                     "parameters": seeds[0]["parameters"]})
        print(f"{regime:<9} {m:<7} lr {best_lr[m]:g}  test AUC {common.mean_std(rows[-1]['auc'])}"
              f" (seeds)  {common.mean_std(rows[-1]['data_auc'])} (data sets)", flush=True)
    folder = dataset(regime, args.rows_of[regime], args.data_dir, d0)
    return {"rows": rows, "best_lr": best_lr,
            "meta": json.loads((folder / "meta.json").read_text())["splits"]["test"]}


def learning_curve(args, best_lr, pool, log):
    """Dot regime, first seeds: test AUC at more training-set sizes (the main size included)."""
    curve = {"oracle": []}
    for n in sorted(set(args.curve_rows) | {int(args.rows_of["dot"] * 0.8)}):
        total = int(round(n / 0.8))
        tag = "main" if total == args.rows_of["dot"] else f"curve{total}"
        configs = [run_config(args, "dot", m, best_lr[m], args.seeds[0], args.data_seeds[0],
                              tag=tag, rows=total) for m in args.curve_models.split(",") if m]
        runs = run_all(configs, pool, log, args.fresh)
        for cfg in configs:
            test = runs[cfg.run_name]["splits"]["test"]
            curve.setdefault(cfg.model, []).append((n, test["auc"]))
        curve["oracle"].append((n, test["oracle"]["auc"]))
    return curve


def single_runs(args, regime, model, lr, pool, log, **changes):
    """Test and val AUC of one run per setting in `changes` (first data and training seed)."""
    cfg = run_config(args, regime, model, lr, args.seeds[0], args.data_seeds[0], **changes)
    m = run_all([cfg], pool, log, args.fresh)[cfg.run_name]["splits"]
    return {"val": m["val"]["auc"], "test": m["test"]["auc"]}


def min_count_part(args, results, pool, log):
    """What the frequency threshold is worth: the first seeds again with --min-count 0."""
    return {(g, m): [single_runs(args, g, m, r["best_lr"][m], pool, log, min_count=mc)["test"]
                     for mc in (0, args.min_count)]
            for g, r in results.items() for m in args.ablation_models.split(",") if m}


def hash_bits_part(args, results, pool, log):
    """What collisions cost: the lowrank regime's models at tables of 2^b rows, next to the
    share of values that share a bucket at that size."""
    regime = "lowrank" if "lowrank" in results else next(iter(results))
    folder = dataset(regime, args.rows_of[regime], args.data_dir, args.data_seeds[0])
    out = {}
    for bits in args.hash_bits_list:
        out[bits] = {"collisions": collisions(folder, bits)}
        for m in [m for m in args.hash_models.split(",") if m]:
            lr = results[regime]["best_lr"].get(m, args.lrs[0])
            out[bits][m] = single_runs(args, regime, m, lr, pool, log, hash_bits=bits)["test"]
    return regime, out


def optimizer_part(args, results, pool, log):
    """The trainer's optimizer rule, decided on validation: AdamW (decoupled weight decay) vs
    Adam with L2 in the gradient, DeepFM on the lowrank regime (first seeds)."""
    regime = "lowrank" if "lowrank" in results else next(iter(results))
    lr = results[regime]["best_lr"].get("deepfm", args.lrs[0])
    out = {}
    for wd in args.weight_decays:
        for decoupled in ([True] if wd == 0 else [True, False]):
            out[(wd, decoupled)] = single_runs(args, regime, "deepfm", lr, pool, log,
                                               weight_decay=wd, decoupled_wd=decoupled)
    seeds = next((r for r in results[regime]["rows"] if r["model"] == "deepfm"), None)
    return regime, lr, out, seeds


def main(argv=None):
    args = parse_args(argv)
    t0 = time.perf_counter()
    log = {"runs": 0, "reused": 0, "train_s": 0.0, "seen": {}}
    with ProcessPoolExecutor(args.jobs, mp_context=get_context("fork")) as pool:
        results = {g: compare_regime(args, g, pool, log) for g in args.regime_list}
        parts = {
            "curve": (learning_curve(args, results["dot"]["best_lr"], pool, log)
                      if "curve" in args.part_list and "dot" in results and args.curve_rows
                      else {}),
            "min_count": (min_count_part(args, results, pool, log)
                          if "min_count" in args.part_list else {}),
            "hash_bits": (hash_bits_part(args, results, pool, log)
                          if "hash_bits" in args.part_list else None),
            "optimizer": (optimizer_part(args, results, pool, log)
                          if "optimizer" in args.part_list and "deepfm" in args.model_list
                          else None)}
    write_report(args, results, parts, log, time.perf_counter() - t0,
                 {g: expected_wins(g, r["rows"]) for g, r in results.items()}, EPOCHS)
    return results


def expected_wins(regime, rows):
    """Each expected (loser, winner) pair of the regime, with whether it holds (MARGIN and 3x
    the seed std on the first data set; the same sign on every data set)."""
    return expected_wins_of(EXPECTED[regime], rows, MARGIN)


if __name__ == "__main__":
    main()
