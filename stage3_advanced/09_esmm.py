"""Stage 3, step 9: the click -> conversion funnel - ESMM against a CVR model trained on clicks.

What you learn here: a conversion is only seen after a click, so the usual CVR model is trained
on clicked rows and then ranks every impression. The funnel data of stage2_ctr/01_make_subset.py
(--tasks funnel) knows each row's true pCVR, clicked or not, so we can score CVR over the ENTIRE
space (what serving needs) next to the clicked test rows (what is usually reported): with the
click depending on the features only (observables: no selection bias), also on a latent intent
the conversion depends on too (latent: the clicked rows are a biased sample), at easy rates, for
CVR signals more or less shared with the click's (rho), and with fewer clicks per impression or
fewer impressions (data sparsity). Models: the naive CVR tower (clicked rows), naive pCTR x pCVR,
ESMM (Ma et al. 2018; stage2_ctr/models/esmm.py) with towers, MMoE or PLE under it, and oracles.

Read with it: stage2_ctr/models/esmm.py, stage2_ctr/synthetic.py (the funnel, FUNNEL_ORACLE);
              funnel.py (the data sets, the scores against the oracle, the tables).
Run:    python stage3_advanced/09_esmm.py --make-data --threads 2     # ~55 min on 2 cores
        python stage3_advanced/09_esmm.py --quick --make-data         # 30k rows, < 1 min
Reads:  stage3_advanced/data/esmm_<rows>_<selection>_ctr.._cvr.._l.._<relation><rho>_d<seed>/
        (made by --make-data, or by python stage2_ctr/01_make_subset.py --synthetic N --tasks
        funnel ...: a missing one prints the whole command)
Writes: results/stage3_esmm.md + .png (default run only; --quick: runs/quick/, other flags:
        runs/partial/), runs/stage3_esmm.json (--quick: stage3_esmm_quick.json, and so on)
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: plain imports
import common  # noqa: E402
from common import positive_int, write_json, write_text  # noqa: E402
from stage2_ctr import criteo  # noqa: E402
from stage2_ctr.models import criteo_schema  # noqa: E402
from stage2_ctr.models.esmm import ESMM, CVRView, Tower  # noqa: E402
from stage2_ctr.models.mtl import n_params, width_for_budget  # noqa: E402
from stage2_ctr.training import CTRInputs, FitError, bce, fit, predict_in_memory  # noqa: E402
from stage3_advanced import funnel  # noqa: E402
from stage3_advanced.stage3_common import HERE, setup  # noqa: E402

# regime -> generator settings: at rho 0.9, 0.7% (observables) and 1.1% (latent) conversions
# per impression, about 0.35% and 0.14% at the click rates 0.01 and 0.003; "easy": 19%
REGIMES = {"observables": dict(selection="observables", ctr=0.03, ctr2=0.03),
           "latent": dict(selection="latent", ctr=0.03, ctr2=0.03),
           "latent_easy": dict(selection="latent", ctr=0.3, ctr2=0.3)}
MODELS = ["naive_cvr", "naive_product", "esmm", "esmm_mmoe", "esmm_ple"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=common.checked(int, lambda v: v >= 1000, "an integer >= 1000"),
                   default=500_000, help="rows per data set (8:1:1 split)")
    p.add_argument("--regimes", nargs="+", choices=list(REGIMES), default=list(REGIMES))
    p.add_argument("--data-seeds", type=common.seed_list, default=[0, 1, 2],
                   help="generator seeds (other features, weights, latent)")
    p.add_argument("--seeds", type=common.seed_list, default=[0, 1, 2, 3, 4])
    p.add_argument("--latent-std", type=common.non_negative_float, default=2.0,
                   help="weight of the unseen latent u in the logits (--latent-std of the data)")
    rho = common.checked(float, lambda v: -1 <= v <= 1, "in [-1, 1]")
    p.add_argument("--task-corr", type=rho, default=0.9, help="rho: the share of the click's "
                   "signal in the CVR logit, s2 = rho s1 + sqrt(1 - rho^2) s_own (every regime)")
    p.add_argument("--sweep-corrs", type=common.checked(float, lambda v: -1 <= v <= 1,
                                                        "numbers in [-1, 1]", True),
                   default=[0.5, 0.0], help="observables again "
                   "with these rho (0: independent signals, < 0: opposite), ESMM and naive CVR")
    p.add_argument("--curve-ctrs", type=common.checked(float, lambda v: 0 < v < 0.03,
                                                       "rates in (0, 0.03)", True),
                   default=[0.01, 0.003], help="fewer clicks per impression: observables with "
                   "these click rates (the regimes have 0.03), same impressions, every data seed")
    p.add_argument("--curve-fracs", type=common.checked(float, lambda v: 0 < v < 1,
                                                        "fractions in (0, 1)", True),
                   default=[1 / 16, 1 / 4], help="fewer impressions: these shares of the train "
                   "rows of observables (same val and test rows), every data seed")
    p.add_argument("--data-root", default=str(HERE / "data"))
    p.add_argument("--make-data", action="store_true", help="generate missing data sets")
    p.add_argument("--hash-bits", type=common.hash_bits, default=18)
    p.add_argument("--emb-dim", type=positive_int, default=8)
    p.add_argument("--tower", type=common.layer_list, default=(64, 32), help="MLP of a tower")
    p.add_argument("--lr", type=common.positive_float, default=2e-3)
    p.add_argument("--batch-size", type=positive_int, default=2048, help="all-rows models")
    p.add_argument("--epochs", type=positive_int, default=10, help="all-rows models: at most "
                   "this many, early stopping (patience 2, the best validation epoch kept)")
    p.add_argument("--click-batch-size", type=positive_int, default=256,
                   help="the naive CVR model on the (few) clicked rows")
    p.add_argument("--click-epochs", type=positive_int, default=10,
                   help="the naive CVR model: at most this many, early stopping (patience 2)")
    p.add_argument("--device", type=common.device_arg, default="auto")
    p.add_argument("--threads", type=positive_int, default=2, help="torch CPU threads")
    p.add_argument("--quick", action="store_true", help="30k rows, 2 seeds, 1 data seed")
    p.add_argument("--out", default=None, help="default results/stage3_esmm.md (default run)")
    p.add_argument("--runs-dir", default=str(common.RUNS), help="where the JSON goes")
    args = common.parse_with_quick(p, argv, dict(
        rows=30_000, seeds=[0, 1], data_seeds=[0], click_epochs=2, epochs=2, curve_fracs=[1 / 4],
        curve_ctrs=[0.01], sweep_corrs=[0.0]))
    args.device = common.resolve_device(args.device)
    args.out = str(args.out or common.results_file(argv, args.quick, "stage3_esmm", args.device))
    return args


# -------------------------------------------------------------------------------------- data
def world(args, regime, rho=None, ctr=None):
    """The generator's settings of a regime, optionally with another rho or click rate."""
    rho = args.task_corr if rho is None else rho
    cfg = dict(REGIMES[regime], latent_std=args.latent_std, task_corr=abs(rho),
               cvr_relation="shared" if rho > 0 else "opposite" if rho < 0 else "independent")
    return dict(cfg, **({"ctr": ctr} if ctr else {}))


# ------------------------------------------------------------------------------------ models
def build(args, name):
    schema = criteo_schema(args.hash_bits)
    if name in ("naive_cvr", "naive_ctr"):
        return Tower(schema, args.emb_dim, args.tower, sparse=True)
    if name == "esmm":
        return ESMM(schema, args.emb_dim, "towers", args.tower, sparse=True)
    towers = n_params(ESMM(schema, args.emb_dim, "towers", args.tower).block)  # the budget
    under = name.split("_")[1]
    kw = dict(depth=2, n_experts=4, n_shared=2, n_specific=1, batch_norm=True, tower=(16,))
    width = width_for_budget(under, schema.n_fields * args.emb_dim, 2, towers, **kw)
    return ESMM(schema, args.emb_dim, under, sparse=True, width=width,
                **{k: v for k, v in kw.items() if k != "tower"})


def train(args, name, train_split, val_split, seed, desc, on_clicks=False):
    """Seeded, built, then trained: every model stops early on its own validation AUCs (ESMM:
    pCTR on clicks, pCTCVR on conversions) and keeps its best epoch (a fixed single epoch
    starved ESMM on small data)."""
    setup(args.threads, seed)  # before build: the initial weights depend on the seed only
    model = build(args, name)
    info = fit(CTRInputs(model), train_split, val_split, bce, lr=args.lr,
               batch_size=args.click_batch_size if on_clicks else args.batch_size,
               epochs=args.click_epochs if on_clicks else args.epochs, patience=2, seed=seed,
               desc=desc, device=args.device)
    return model, info


def probs(model, inputs):
    return torch.sigmoid(predict_in_memory(CTRInputs(model), inputs)).numpy()[:, 0]


def run_models(args, data, seed, models, tag):
    """Train `models` on one data set and seed; naive_product is naive_cvr's pCVR times a CTR
    model's pCTR, so only its CTCVR is its own."""
    out, test = {}, data["test"]
    x_val, y_val, _ = data["val"]
    if {"naive_cvr", "naive_product"} & set(models):
        cvr, info = train(args, "naive_cvr", funnel.clicked(data["train"]),
                          funnel.clicked(data["val"]), seed, f"{tag} naive_cvr s{seed}", True)
        pcvr = probs(cvr, test[0])
        out["naive_cvr"] = dict(funnel.score(test, pcvr, pcvr), best_epoch=info["best_epoch"],
                                train_clicks=int(data["train"][1][:, 0].sum()))
    if "naive_product" in models:
        x, y, _ = data["train"]
        ctr, _ = train(args, "naive_ctr", (x, y[:, [0]]), (x_val, y_val[:, [0]]), seed,
                       f"{tag} naive_ctr s{seed}")
        both = funnel.score(test, pcvr, probs(ctr, test[0]) * pcvr)
        out["naive_product"] = {"ctcvr_auc_entire": both["ctcvr_auc_entire"]}
    for name in [m for m in models if m.startswith("esmm")]:
        model, info = train(args, name, data["train"][:2], (x_val, y_val), seed,
                            f"{tag} {name} s{seed}")
        p = torch.sigmoid(predict_in_memory(CTRInputs(model), test[0])).numpy()
        out[name] = dict(funnel.score(test, probs(CVRView(model), test[0]), p[:, 1]),
                         best_epoch=info["best_epoch"])
    return out


# ------------------------------------------------------------------------------------ report
def report(args, argv, results, wall_s):
    lines = ["# Stage 3: the click -> conversion funnel, ESMM vs a CVR model trained on clicks",
             "", f"{args.rows:,} rows per data set (8:1:1), latent weight {args.latent_std:g}, "
             f"rho {args.task_corr:g} unless a row says otherwise; seeds "
             f"{','.join(map(str, args.seeds))} per data set; towers {list(args.tower)}, "
             f"embedding {args.emb_dim}-d over 2^{args.hash_bits} buckets, ESMM-MMoE/PLE at "
             "the towers' parameter budget; every model stops early on its validation AUCs "
             f"(at most {args.epochs} epochs, naive CVR {args.click_epochs}). Entire-space AUCs "
             "are expected AUCs against the oracle's probabilities over all test impressions "
             "(each row a positive of weight p and a negative of weight 1 - p); clicked-rows AUC "
             "uses the conversion labels. ± = population std over training seeds (mean within a "
             "data set) unless it says over data sets (generator seeds). Fewer impressions: the "
             "first share of the train rows, the same val and test rows."]
    lines += ["", "## Summary: ESMM - naive CVR, entire-space CVR AUC", ""]
    lines += common.markdown_table(
        ["setting", "data sets", "train clicks", "conversions per click", "naive CVR", "ESMM",
         "ESMM - naive (over data sets)", "difference / larger seed std, per data set",
         "best epoch naive / ESMM: median (max)"],
        [funnel.summary_row(k, v) for k, v in results.items()])
    for regime in [r for r in results if r in REGIMES]:
        res = results[regime]
        rate = {k: np.mean([d["rates"][k] for d in res.values()]) for k in
                ["mean_pctr", "mean_pctcvr", "cvr_among_clicks"]}
        lines += ["", f"## {regime}: {len(res)} data set(s); pCTR {rate['mean_pctr']:.3f}, "
                  f"conversions {rate['mean_pctcvr']:.2%} of impressions, "
                  f"{rate['cvr_among_clicks']:.1%} of clicks (test rows, mean over data sets)",
                  ""] + funnel.regime_table(res, MODELS)
        lines += ["", "ESMM - naive CVR, entire-space CVR AUC, per data set:", ""]
        lines += common.markdown_table(["data seed", "ESMM", "naive CVR", "difference",
                                        "larger seed std", "difference / std"],
                                       funnel.headline(res)[0])
        lines += ["", "Each model - ESMM, entire-space AUC, per data set (mean over seeds):", ""]
        lines += common.markdown_table(["model", "AUC of"] + [f"data seed {ds}" for ds in res]
                                       + ["over data sets"], funnel.versus_esmm(res, MODELS))
    lines += ["", f"Command: `{common.command_line(__file__, argv)}` ({wall_s / 60:.1f} min, "
              f"device {args.device}).", common.machine_line(args.device, args.threads)]
    return "\n".join(lines) + "\n"


def settings(args):
    """(section, data seed, models, generator settings, share of the train rows) per job."""
    jobs = []
    for regime in args.regimes:
        for ds in args.data_seeds:  # every model on every data set: claims hold over data
            models = MODELS[:3] if regime == "latent_easy" else MODELS
            jobs.append((regime, ds, models, world(args, regime), 1.0))
            if regime == "observables":  # right after it: the data set is still in memory
                jobs += [(f"observables, {frac:g} of the impressions", ds, funnel.PAIR,
                          world(args, regime), frac) for frac in args.curve_fracs]
    if "observables" in args.regimes:
        jobs += [(f"observables, rho {rho:g}", ds, funnel.PAIR,
                  world(args, "observables", rho=rho), 1.0)
                 for rho in args.sweep_corrs for ds in args.data_seeds]
        jobs += [(f"observables, pCTR {ctr:g}", ds, funnel.PAIR,
                  world(args, "observables", ctr=ctr), 1.0)
                 for ctr in args.curve_ctrs for ds in args.data_seeds]
    return jobs


@common.one_line_errors(FitError, criteo.CriteoFormatError)
def main(argv=None):
    args = parse_args(argv)
    if Path(args.out).is_dir():
        sys.exit(f"error: --out {args.out} is a folder: give the path of a .md file")
    for folder, flag in [(Path(args.out).parent, "--out"), (args.runs_dir, "--runs-dir")]:
        common.check_writable(folder, flag)
    t0, results, loaded = time.perf_counter(), {}, (None, None)
    for section, ds, models, cfg, share in settings(args):
        folder = funnel.ensure_data(args.data_root, args.rows, ds, cfg, args.make_data)
        if loaded[0] != folder:  # the impressions curve reuses the data set just read
            loaded = folder, funnel.load_funnel(folder, args.hash_bits)
        data = loaded[1]
        if share < 1:
            n = int(len(data["train"][1]) * share)
            data = dict(data, train=funnel.head(data["train"], n))
        meta = json.loads((folder / "meta.json").read_text())
        res = {"rates": meta["splits"]["test"]["funnel"],
               "oracles": funnel.oracle_rows(data["test"]), "generator": cfg,
               "train_rows": len(data["train"][1]),
               "runs": [run_models(args, data, s, models, f"{section} d{ds}") for s in args.seeds]}
        results.setdefault(section, {})[ds] = res
        print(f"{section} d{ds}: " + ", ".join(
            f"{m} {np.mean([r[m]['cvr_auc_entire'] for r in res['runs']]):.4f}"
            for m in MODELS if "cvr_auc_entire" in res["runs"][0].get(m, {}))
              + " (entire-space CVR AUC)")
    wall = time.perf_counter() - t0
    table = report(args, argv, results, wall)
    out = Path(args.out)
    write_text(out, table)
    funnel.plot(results, out.with_suffix(".png"), MODELS, [r for r in results if r in REGIMES])
    # a --quick or partial run keeps its JSON apart from the default run's
    name = out.stem + ("" if out.parent == common.RESULTS else f"_{out.parent.name}")
    write_json(Path(args.runs_dir) / f"{name}.json",
               {"script": "stage3_advanced/09_esmm.py", "command": common.command_line(
                   __file__, argv), "config": {k: str(v) if k == "device" else v
                                               for k, v in vars(args).items()},
                "results": {k: {str(d): r for d, r in v.items()} for k, v in results.items()},
                "wall_s": wall})
    print(table)
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
