"""Stage 3, step 9: the click -> conversion funnel - ESMM against a CVR model trained on clicks.

What you learn here: a conversion is only seen after a click, so the usual CVR model is trained
on clicked rows and then ranks every impression. The funnel data of stage2_ctr/01_make_subset.py
(--tasks funnel) knows each row's true pCVR, clicked or not, so we can score CVR over the ENTIRE
space (what serving needs) next to the clicked test rows (what is usually reported), in three
regimes: the click depends on the features only (observables: no selection bias), also on a
latent intent the conversion depends on too (latent: the clicked rows are a biased sample), and
few clicks (the learning curve). Models: the naive CVR tower (clicked rows), naive pCTR x pCVR,
ESMM (Ma et al. 2018; stage2_ctr/models/esmm.py) with towers, MMoE or PLE under it, and oracles.

Read with it: stage2_ctr/models/esmm.py, stage2_ctr/synthetic.py (the funnel, FUNNEL_ORACLE).
Run:    python stage3_advanced/09_esmm.py --make-data --threads 1     # ~21 min on one core
        python stage3_advanced/09_esmm.py --quick --make-data         # 30k rows, < 1 min
Reads:  stage3_advanced/data/esmm_<rows>_<regime>_d<data seed>/ (made by --make-data, or by
        python stage2_ctr/01_make_subset.py --synthetic N --tasks funnel --selection ...)
Writes: results/stage3_esmm.md + .png (default run only; --quick: runs/quick/, other flags:
        runs/partial/), runs/stage3_esmm.json
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: plain imports
import common  # noqa: E402
from common import mean_std, positive_int, pyplot, save_figure, write_json, write_text  # noqa: E402
from stage2_ctr import criteo, synthetic, train_stats  # noqa: E402
from stage2_ctr.models import criteo_schema  # noqa: E402
from stage2_ctr.models.esmm import ESMM, CVRView, Tower  # noqa: E402
from stage2_ctr.models.mtl import n_params, width_for_budget  # noqa: E402
from stage2_ctr.training import CTRInputs, FitError, bce, fit, predict_in_memory  # noqa: E402
from stage3_advanced.stage3_common import HERE, setup  # noqa: E402

# regime -> generator settings; "realistic" rates give 0.3-0.7% conversions per impression
REGIMES = {"observables": dict(selection="observables", ctr=0.03, ctr2=0.03),
           "latent": dict(selection="latent", ctr=0.03, ctr2=0.03),
           "latent_easy": dict(selection="latent", ctr=0.3, ctr2=0.3)}
MODELS = ["naive_cvr", "naive_product", "esmm", "esmm_mmoe", "esmm_ple"]
# columns of FUNNEL_ORACLE: pCVR given x and u; E[pCVR given x]; P(conversion given x, click)
ORACLES = {"oracle (sees u)": 1, "best from x": 3, "clicked-rows target": 4}
CURVE = ["naive_cvr", "esmm"]  # the learning curve's models


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=common.checked(int, lambda v: v >= 1000, "an integer >= 1000"),
                   default=500_000, help="rows per data set (8:1:1 split)")
    p.add_argument("--regimes", nargs="+", choices=list(REGIMES), default=list(REGIMES))
    p.add_argument("--data-seeds", type=common.seed_list, default=[0, 1, 2],
                   help="generator seeds (other features, weights, latent) for observables and "
                        "latent; latent_easy uses the first")
    p.add_argument("--seeds", type=common.seed_list, default=[0, 1, 2, 3, 4])
    p.add_argument("--latent-std", type=common.non_negative_float, default=2.0,
                   help="weight of the unseen latent u in the logits (--latent-std of the data)")
    p.add_argument("--curve-fracs", type=common.checked(float, lambda v: 0 < v <= 1,
                                                        "fractions in (0, 1]", True),
                   default=[1 / 16, 1 / 8, 1 / 4, 1 / 2],
                   help="learning curve: shares of the train rows (observables, data seed 0)")
    p.add_argument("--min-steps", type=common.non_negative_int, default=0,
                   help="at least this many optimizer steps per model (more epochs on small "
                        "data, early stopping with patience 2); 0: the epochs as given")
    p.add_argument("--curve-only", action="store_true", help="only the learning curve "
                   "(give the full size as --curve-fracs ... 1)")
    p.add_argument("--data-root", default=str(HERE / "data"))
    p.add_argument("--make-data", action="store_true", help="generate missing data sets")
    p.add_argument("--hash-bits", type=common.hash_bits, default=18)
    p.add_argument("--emb-dim", type=positive_int, default=8)
    p.add_argument("--tower", type=common.layer_list, default=(64, 32), help="MLP of a tower")
    p.add_argument("--lr", type=common.positive_float, default=2e-3)
    p.add_argument("--batch-size", type=positive_int, default=2048, help="all-rows models")
    p.add_argument("--epochs", type=positive_int, default=1,
                   help="all-rows models (a second epoch overfits the hashed table: README)")
    p.add_argument("--click-batch-size", type=positive_int, default=256,
                   help="the naive CVR model on the (few) clicked rows")
    p.add_argument("--click-epochs", type=positive_int, default=10,
                   help="the naive CVR model: at most this many, early stopping (patience 2)")
    p.add_argument("--device", type=common.device_arg, default="auto")
    p.add_argument("--threads", type=positive_int, default=2, help="torch CPU threads")
    p.add_argument("--quick", action="store_true", help="30k rows, 2 seeds, 1 data seed")
    p.add_argument("--out", default=None, help="default results/stage3_esmm.md (default run)")
    p.add_argument("--runs-dir", default=str(common.RUNS), help="where the JSON goes")
    args = common.parse_with_quick(p, argv, dict(rows=30_000, seeds=[0, 1], data_seeds=[0],
                                                 click_epochs=2, curve_fracs=[1 / 4]))
    args.device = common.resolve_device(args.device)
    args.out = str(args.out or common.results_file(argv, args.quick, "stage3_esmm", args.device))
    return args


# -------------------------------------------------------------------------------------- data
def data_dir(args, regime, data_seed):
    return Path(args.data_root) / f"esmm_{args.rows}_{regime}_l{args.latent_std:g}_d{data_seed}"


def ensure_data(args, regime, data_seed):
    folder = data_dir(args, regime, data_seed)
    cfg = synthetic.SyntheticConfig(rows=args.rows, seed=data_seed, tasks="funnel",
                                    latent_std=args.latent_std, **REGIMES[regime])
    if not (folder / "meta.json").exists():
        if not args.make_data:
            sys.exit(f"error: {folder}/meta.json not found: add --make-data, or run `python "
                     f"stage2_ctr/01_make_subset.py --synthetic {cfg.rows} --seed {cfg.seed} "
                     f"--tasks funnel --selection {cfg.selection} --ctr {cfg.ctr} --ctr2 "
                     f"{cfg.ctr2} --latent-std {cfg.latent_std:g} --out-dir {folder}`")
        synthetic.make_synthetic(cfg, folder)
    return folder


def load_funnel(folder, hash_bits):
    """{split: (inputs, labels (N, 2) [click, conversion], oracle (N, 5))}. A conversion on an
    unclicked row is a bad row of the reader (funnel=True); any bad row breaks the row-by-row
    match with the oracle file, so it stops the run with the file and the first bad lines."""
    stats = train_stats.fit_stats([folder / "train.txt"], n_labels=2)
    out = {}
    for split in ["train", "val", "test"]:
        path = folder / f"{split}.txt"
        stream = criteo.CriteoStream([path], 1 << 16, hash_bits, dense_stats=stats,
                                     n_labels=2, funnel=True)
        dense, sparse, y = (torch.cat(p) for p in zip(*stream))
        if stream.stats["bad_rows"]:
            raise criteo.CriteoFormatError("; ".join(criteo.describe_bad_rows(
                stream.stats["files"])) + ": the oracle no longer lines up, regenerate it")
        oracle = np.load(folder / f"{split}.oracle.npy", allow_pickle=False)
        out[split] = ({"dense": dense, "sparse": sparse}, y, oracle)
    return out


def head(split, n):
    """The first n rows of a split (rows are i.i.d.: a smaller sample of the same world)."""
    x, y, o = split
    return {k: v[:n] for k, v in x.items()}, y[:n], o[:n]


def clicked(split, label=1):
    x, y, _ = split
    keep = y[:, 0] == 1
    return {k: v[keep] for k, v in x.items()}, y[keep][:, [label]]


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


def train(args, model, train_split, val_split, seed, desc, on_clicks=False):
    setup(args.threads, seed)
    batch = args.click_batch_size if on_clicks else args.batch_size
    steps_per_epoch = -(-len(train_split[1]) // batch)
    epochs = max(args.click_epochs if on_clicks else args.epochs,
                 min(200, -(-args.min_steps // steps_per_epoch)))
    info = fit(CTRInputs(model), train_split, val_split, bce, lr=args.lr, batch_size=batch,
               epochs=epochs, patience=2, seed=seed, desc=desc, device=args.device)
    return model, info


def probs(model, inputs):
    return torch.sigmoid(predict_in_memory(CTRInputs(model), inputs)).numpy()[:, 0]


def score(test, pcvr, pctcvr):
    """The metrics of one model on the test split; entire-space scores against the oracle."""
    _, y, o = test
    y, click = y.numpy(), y[:, 0].numpy() == 1
    common.require_finite({"pCVR": pcvr, "pCTCVR": pctcvr}, "the predictions")
    return {"cvr_auc_clicked": float(roc_auc_score(y[click, 1], pcvr[click])),
            "cvr_auc_entire": synthetic.expected_auc(o[:, 1], pcvr),
            "cvr_calibration": float(pcvr.mean() / o[:, 1].mean()),
            "ctcvr_auc_entire": synthetic.expected_auc(o[:, 2], pctcvr)}


def run_models(args, data, seed, models, tag):
    """Train `models` on one data set and seed; naive_product reuses naive_cvr's pCVR."""
    out, test = {}, data["test"]
    x_val, y_val, _ = data["val"]
    if {"naive_cvr", "naive_product"} & set(models):
        cvr, info = train(args, build(args, "naive_cvr"), clicked(data["train"]),
                          clicked(data["val"]), seed, f"{tag} naive_cvr s{seed}", True)
        pcvr = probs(cvr, test[0])
        out["naive_cvr"] = dict(score(test, pcvr, pcvr), best_epoch=info["best_epoch"],
                                train_clicks=int(data["train"][1][:, 0].sum()))
    if "naive_product" in models:
        x, y, _ = data["train"]
        ctr, _ = train(args, build(args, "naive_ctr"), (x, y[:, [0]]), (x_val, y_val[:, [0]]),
                       seed, f"{tag} naive_ctr s{seed}")
        out["naive_product"] = score(test, pcvr, probs(ctr, test[0]) * pcvr)
    for name in [m for m in models if m.startswith("esmm")]:
        model, info = train(args, build(args, name), data["train"][:2], (x_val, y_val), seed,
                            f"{tag} {name} s{seed}")
        p = torch.sigmoid(predict_in_memory(CTRInputs(model), test[0])).numpy()
        out[name] = dict(score(test, probs(CVRView(model), test[0]), p[:, 1]),
                         best_epoch=info["best_epoch"])
    return out


# ------------------------------------------------------------------------------------ report
def oracle_rows(test):
    _, y, o = test
    click = y[:, 0].numpy() == 1
    return {name: {"cvr_auc_clicked": float(roc_auc_score(y[click, 1].numpy(), o[click, k])),
                   "cvr_auc_entire": synthetic.expected_auc(o[:, 1], o[:, k]),
                   "cvr_calibration": float(o[:, k].mean() / o[:, 1].mean())}
            for name, k in ORACLES.items()}


def vals_of(res, model, key):
    """One array of a metric per data set that ran `model` (an oracle: one value each)."""
    if model in ORACLES:
        return [np.array([d["oracles"][model].get(key, np.nan)]) for d in res.values()]
    return [np.array([r[model][key] for r in d["runs"]]) for d in res.values()
            if model in d["runs"][0]]


def regime_table(res):
    """Per model: mean over data sets and seeds ± the std over training seeds (mean within a
    data set); the gap is to the best pCVR from x of the same data sets."""
    keys = ["cvr_auc_clicked", "cvr_auc_entire", "cvr_calibration", "ctcvr_auc_entire"]
    rows = []
    for m in MODELS + list(ORACLES):
        sets = vals_of(res, m, "cvr_auc_entire")
        ran = [ds for ds, d in res.items() if m in ORACLES or m in d["runs"][0]]
        if not ran:
            continue
        best_x = np.mean([res[ds]["oracles"][list(ORACLES)[1]]["cvr_auc_entire"] for ds in ran])
        cells = []
        for key in keys:
            v = vals_of(res, m, key)
            cells.append("-" if np.isnan(np.concatenate(v)).all() else
                         f"{np.mean(np.concatenate(v)):.4f}" if m in ORACLES else
                         f"{np.mean(np.concatenate(v)):.4f} ± {np.mean([x.std() for x in v]):.4f}")
        where = "" if len(ran) == len(res) else f" (data seed {', '.join(map(str, ran))})"
        rows.append([m + where, cells[0], cells[1],
                     f"{best_x - np.mean(np.concatenate(sets)):+.4f}", cells[2], cells[3]])
    return common.markdown_table(["model", "CVR AUC, clicked test rows", "CVR AUC, entire space",
                                  "gap to best from x", "pCVR mean / true mean",
                                  "CTCVR AUC, entire space"], rows)


def headline(res):
    """ESMM - naive entire-space CVR AUC per data set (mean over seeds, the larger of the two
    seed stds), then over data sets: the mean difference ± its std across generator seeds."""
    rows, diffs = [], []
    for ds, d in res.items():
        e, n = (np.array([r[m]["cvr_auc_entire"] for r in d["runs"]])
                for m in ["esmm", "naive_cvr"])
        std, diffs = max(e.std(), n.std()), diffs + [e.mean() - n.mean()]
        rows.append([ds, f"{e.mean():.4f}", f"{n.mean():.4f}", f"{diffs[-1]:+.4f}",
                     f"{std:.4f}", f"{diffs[-1] / max(std, 1e-9):+.1f}x"])
    return rows + [["all", "", "", mean_std(diffs) + " (over data sets)", "", ""]]


def report(args, argv, results, curve, wall_s):
    lines = ["# Stage 3: the click -> conversion funnel, ESMM vs a CVR model trained on clicks",
             "", f"{args.rows:,} rows per data set (8:1:1), latent weight {args.latent_std:g}; "
             f"seeds {','.join(map(str, args.seeds))} per data set; towers {list(args.tower)}, "
             f"embedding {args.emb_dim}-d over 2^{args.hash_bits} buckets, ESMM-MMoE/PLE at "
             "the towers' parameter budget. Entire-space AUCs are expected AUCs against the "
             "oracle's probabilities over all test impressions (each row a positive of weight "
             "p and a negative of weight 1 - p); clicked-rows AUC uses the conversion labels. "
             "± = std over training seeds (mean within a data set); the headline table gives "
             "each data set (generator seed) on its own."]
    for regime, res in results.items():
        rates = next(iter(res.values()))["rates"]
        lines += ["", f"## {regime}: {len(res)} data set(s); pCTR {rates['mean_pctr']:.3f}, "
                  f"conversions {rates['mean_pctcvr']:.2%} of impressions, "
                  f"{rates['cvr_among_clicks']:.1%} of clicks", ""] + regime_table(res)
        lines += ["", "ESMM - naive CVR, entire-space CVR AUC, per data set:", ""]
        lines += common.markdown_table(["data seed", "ESMM", "naive CVR", "difference",
                                        "larger seed std", "difference / std"], headline(res))
    if curve:
        lines += ["", "## data-sparse: learning curve (observables, data seed "
                  f"{args.data_seeds[0]}), entire-space CVR AUC", ""]
        lines += common.markdown_table(
            ["train rows", "train clicks", "naive CVR", "ESMM", "ESMM - naive"],
            [[f"{c['rows']:,}", f"{c['clicks']:,}", mean_std(c["naive_cvr"]),
              mean_std(c["esmm"]), f"{np.mean(c['esmm']) - np.mean(c['naive_cvr']):+.4f}"]
             for c in curve])
    lines += ["", f"Command: `{common.command_line(__file__, argv)}` ({wall_s / 60:.1f} min, "
              f"device {args.device}).", common.machine_line(args.device, args.threads)]
    return "\n".join(lines) + "\n"


def plot(results, curve, path):
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(MODELS)
    for i, m in enumerate(MODELS if results else []):
        means = [np.mean(np.concatenate(vals_of(res, m, "cvr_auc_entire") or [[np.nan]]))
                 for res in results.values()]
        axes[0].bar(np.arange(len(results)) + i * width, means, width, label=m)
    for name, style in zip(list(ORACLES)[1:], ["k--", "k:"]):
        for j, res in enumerate(results.values()):
            v = np.mean(np.concatenate(vals_of(res, name, "cvr_auc_entire")))
            axes[0].plot([j - width / 2, j + 0.8 - width / 2], [v, v], style,
                         label=name if j == 0 else None)
    axes[0].set_xticks(np.arange(len(results)) + 0.4 - width / 2, list(results))
    lo = min([np.concatenate(vals_of(r, m, "cvr_auc_entire")).mean() for r in results.values()
              for m in MODELS if vals_of(r, m, "cvr_auc_entire")] or [0.52])
    axes[0].set(ylim=(lo - 0.02, None), ylabel="entire-space CVR AUC",
                title="CVR over all impressions")
    axes[0].legend(fontsize=7)
    if curve:
        clicks = [c["clicks"] for c in curve]
        for m in ["naive_cvr", "esmm"]:
            mu, sd = (np.array([f(c[m]) for c in curve]) for f in (np.mean, np.std))
            axes[1].errorbar(clicks, mu, sd, marker="o", capsize=3, label=m)
        axes[1].set(xscale="log", xlabel="clicked train rows", ylabel="entire-space CVR AUC",
                    title="data sparsity (observables)")
        axes[1].legend()
    fig.tight_layout()
    save_figure(fig, path)


@common.one_line_errors(FitError, criteo.CriteoFormatError)
def main(argv=None):
    args = parse_args(argv)
    for folder, flag in [(Path(args.out).parent, "--out"), (args.runs_dir, "--runs-dir")]:
        common.check_writable(folder, flag)
    setup(args.threads, args.seeds[0])  # torch seeds itself at random: the first model's init
    t0, results, curve = time.perf_counter(), {}, []
    for regime in args.regimes:
        results[regime] = {}
        for ds in args.data_seeds[:1] if regime == "latent_easy" else args.data_seeds:
            folder = ensure_data(args, regime, ds)
            data = load_funnel(folder, args.hash_bits)
            meta = json.loads((folder / "meta.json").read_text())
            models = ([] if args.curve_only else MODELS[:3] if regime == "latent_easy" else
                      MODELS if ds == args.data_seeds[0] else ["naive_cvr", "esmm"])
            res = {"rates": meta["splits"]["test"]["funnel"], "oracles": oracle_rows(data["test"]),
                   "runs": [run_models(args, data, s, models, f"{regime} d{ds}")
                            for s in args.seeds]}
            if not args.curve_only:
                results[regime][ds] = res
                print(f"{regime} d{ds}: " + ", ".join(
                    f"{m} {np.mean([r[m]['cvr_auc_entire'] for r in res['runs']]):.4f}"
                    for m in res["runs"][0]) + " (entire-space CVR AUC)")
            if regime == "observables" and ds == args.data_seeds[0]:
                n = len(data["train"][1])
                for frac in args.curve_fracs:
                    part = dict(data, train=head(data["train"], int(n * frac)))
                    runs = [run_models(args, part, s, ["naive_cvr", "esmm"], f"curve {frac:g}")
                            for s in args.seeds]
                    curve.append({"rows": int(n * frac), "clicks": runs[0]["naive_cvr"][
                        "train_clicks"], **{m: [r[m]["cvr_auc_entire"] for r in runs]
                                            for m in ["naive_cvr", "esmm"]}})
                curve += [] if args.curve_only else [{
                    "rows": n, "clicks": res["runs"][0]["naive_cvr"]["train_clicks"],
                    **{m: [r[m]["cvr_auc_entire"] for r in res["runs"]] for m in CURVE}}]
    wall, results = time.perf_counter() - t0, {k: v for k, v in results.items() if v}
    table = report(args, argv, results, curve, wall)
    out = Path(args.out)
    write_text(out, table)
    plot(results, curve, out.with_suffix(".png"))
    write_json(Path(args.runs_dir) / (out.stem + ".json"),
               {"script": "stage3_advanced/09_esmm.py", "command": common.command_line(
                   __file__, argv), "config": {k: str(v) if k == "device" else v
                                               for k, v in vars(args).items()},
                "results": {k: {str(d): r for d, r in v.items()} for k, v in results.items()},
                "curve": curve, "wall_s": wall})
    print(table)
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
