"""The harness of stage3_advanced/09_esmm.py: funnel data sets (generated on request, read with
the reader's funnel bad-row rule and lined up row by row with their oracle file), one model's
scores against the oracle over the entire space, and the report's tables and plot. The lesson
(which worlds, which models, what the tables say) is in the chapter; this module only measures.
"""
import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

import common
from common import pyplot, save_figure
from stage2_ctr import criteo, synthetic, train_stats

# columns of FUNNEL_ORACLE: pCVR given x and u; E[pCVR given x]; P(conversion given x, click)
ORACLES = {"oracle (sees u)": 1, "best from x": 3, "clicked-rows target": 4}
PAIR = ["esmm", "naive_cvr"]  # the headline difference: ESMM - the CVR model on clicks
SPLITS = ["train", "val", "test"]


def folder_of(root, rows, data_seed, cfg):
    """Where one funnel data set lives: its name says its generator settings."""
    return Path(root) / (
        f"esmm_{rows}_{cfg['selection']}_ctr{cfg['ctr']:g}_cvr{cfg['ctr2']:g}_l"
        f"{cfg['latent_std']:g}_{cfg['cvr_relation']}{cfg['task_corr']:g}_d{data_seed}")


def ensure_data(root, rows, data_seed, cfg, make=False):
    """The folder of one funnel data set (cfg: SyntheticConfig fields), generated if `make`."""
    folder = folder_of(root, rows, data_seed, cfg)
    cfg = synthetic.SyntheticConfig(rows=rows, seed=data_seed, tasks="funnel", **cfg)
    files = ["meta.json"] + [f"{s}{e}" for s in SPLITS for e in (".txt", ".oracle.npy")]
    missing = [f for f in files if not (folder / f).exists()]
    if missing:
        if not make:
            sys.exit(f"error: {folder}/{missing[0]} not found: add --make-data, or run `python "
                     f"stage2_ctr/01_make_subset.py --synthetic {cfg.rows} --seed {cfg.seed} "
                     f"--tasks funnel --selection {cfg.selection} --ctr {cfg.ctr:g} --ctr2 "
                     f"{cfg.ctr2:g} --latent-std {cfg.latent_std:g} --task-corr {cfg.task_corr:g}"
                     f" --cvr-relation {cfg.cvr_relation} --out-dir {folder}`")
        synthetic.make_synthetic(cfg, folder)
    return folder


def load_funnel(folder, hash_bits):
    """{split: (inputs, labels (N, 2) [click, conversion], oracle (N, 5))}. A conversion on an
    unclicked row is a bad row of the reader (funnel=True); any bad row breaks the row-by-row
    match with the oracle file, so it stops the run with the file and the first bad lines."""
    stats = train_stats.fit_stats([folder / "train.txt"], n_labels=2)
    out = {}
    for split in SPLITS:
        path = folder / f"{split}.txt"
        stream = criteo.CriteoStream([path], 1 << 16, hash_bits, dense_stats=stats,
                                     n_labels=2, funnel=True)
        dense, sparse, y = (torch.cat(p) for p in zip(*stream))
        if stream.stats["bad_rows"]:
            raise criteo.CriteoFormatError("; ".join(criteo.describe_bad_rows(
                stream.stats["files"])) + ": the oracle no longer lines up, regenerate it")
        file = folder / f"{split}.oracle.npy"
        try:
            oracle = np.load(file, allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            raise criteo.CriteoFormatError(f"{file}: unreadable ({e}): regenerate the data set")
        if oracle.shape != (len(y), len(synthetic.FUNNEL_ORACLE)):
            raise criteo.CriteoFormatError(
                f"{file}: shape {oracle.shape}, but {path.name} has {len(y):,} rows and the "
                f"funnel oracle {len(synthetic.FUNNEL_ORACLE)} columns: regenerate the data set")
        out[split] = ({"dense": dense, "sparse": sparse}, y, oracle)
    return out


def head(split, n):
    """The first n rows of a split (rows are i.i.d.: a smaller sample of the same world)."""
    x, y, o = split
    return {k: v[:n] for k, v in x.items()}, y[:n], o[:n]


def clicked(split):
    """The clicked rows of a split with their conversion label: the naive CVR model's data."""
    x, y, _ = split
    keep = y[:, 0] == 1
    return {k: v[keep] for k, v in x.items()}, y[keep][:, [1]]


def score(test, pcvr, pctcvr):
    """The metrics of one model on the test split; entire-space scores against the oracle."""
    _, y, o = test
    y, click = y.numpy(), y[:, 0].numpy() == 1
    common.require_finite({"pCVR": pcvr, "pCTCVR": pctcvr}, "the predictions")
    return {"cvr_auc_clicked": float(roc_auc_score(y[click, 1], pcvr[click])),
            "cvr_auc_entire": synthetic.expected_auc(o[:, 1], pcvr),
            "cvr_calibration": float(pcvr.mean() / o[:, 1].mean()),
            "ctcvr_auc_entire": synthetic.expected_auc(o[:, 2], pctcvr)}


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
    return [np.array([r[model].get(key, np.nan) for r in d["runs"]]) for d in res.values()
            if model in d["runs"][0]]


def regime_table(res, models):
    """Per model: mean over data sets and seeds ± the std over training seeds (mean within a
    data set); the gap is to the best pCVR from x of the same data sets."""
    keys = ["cvr_auc_clicked", "cvr_auc_entire", "cvr_calibration", "ctcvr_auc_entire"]
    rows = []
    for m in models + list(ORACLES):
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
        gap = best_x - np.mean(np.concatenate(sets))
        rows.append([m + where, cells[0], cells[1], "-" if np.isnan(gap) else f"{gap:+.4f}",
                     cells[2], cells[3]])
    return common.markdown_table(["model", "CVR AUC, clicked test rows", "CVR AUC, entire space",
                                  "gap to best from x", "pCVR mean / true mean",
                                  "CTCVR AUC, entire space"], rows)


def headline(res):
    """ESMM - naive entire-space CVR AUC per data set (mean over seeds, the larger of the two
    seed stds), then over data sets: the mean difference ± its std across generator seeds."""
    rows, means = [], []
    for ds, d in res.items():
        e, n = (np.array([r[m]["cvr_auc_entire"] for r in d["runs"]]) for m in PAIR)
        std, means = max(e.std(), n.std()), means + [(e.mean(), n.mean())]
        rows.append([ds, f"{e.mean():.4f}", f"{n.mean():.4f}", f"{e.mean() - n.mean():+.4f}",
                     f"{std:.4f}", f"{(e.mean() - n.mean()) / std:+.1f}x" if std > 0 else "-"])
    return rows, np.array(means)  # means: (data sets, 2) [ESMM, naive]


def versus_esmm(res, models):
    """Each other model - ESMM per data set (mean over seeds; naive_product: its CTCVR AUC
    against ESMM's, the only score of its own), then over data sets: mean ± std."""
    rows = []
    for m in [m for m in models if m not in PAIR]:
        key = "ctcvr_auc_entire" if m == "naive_product" else "cvr_auc_entire"
        diffs = [np.mean([r[m][key] - r["esmm"][key] for r in d["runs"]]) for d in res.values()
                 if m in d["runs"][0]]
        if diffs:
            rows.append([m, key.replace("_auc_entire", "").upper()] + [
                f"{v:+.4f}" for v in diffs] + [f"{np.mean(diffs):+.4f}" + (
                    f" ± {np.std(diffs):.4f}" if len(diffs) > 1 else "")])
    return rows


def summary_row(section, res):
    """One line per setting: ESMM vs naive over data sets, and per data set in seed stds."""
    rows, means = headline(res)
    diffs = means[:, 0] - means[:, 1]
    clicks = np.mean([d["runs"][0]["naive_cvr"]["train_clicks"] for d in res.values()])
    rate = np.mean([d["rates"]["cvr_among_clicks"] for d in res.values()])
    epochs = [np.array([r[m]["best_epoch"] for d in res.values() for r in d["runs"]])
              for m in PAIR[::-1]]
    return [section, len(res), f"{clicks:,.0f}", f"{rate:.1%}", f"{means[:, 1].mean():.4f}",
            f"{means[:, 0].mean():.4f}", f"{diffs.mean():+.4f}" + (
                f" ± {diffs.std():.4f}" if len(diffs) > 1 else ""),
            ", ".join(r[5] for r in rows),
            " / ".join(f"{np.median(e):g} ({e.max()})" for e in epochs)]


def plot(results, path, models, regimes):
    """Left: each model's entire-space CVR AUC per regime with the two oracles; right: ESMM -
    naive against the clicks, fewer clicks per impression vs fewer impressions."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    models = [m for m in models if any(not np.isnan(np.concatenate(vals_of(
        results[r], m, "cvr_auc_entire") or [[np.nan]])).all() for r in regimes)]
    width = 0.8 / len(models)
    for i, m in enumerate(models):
        means = [np.mean(np.concatenate(vals_of(results[r], m, "cvr_auc_entire") or [[np.nan]]))
                 for r in regimes]
        part = any(0 < len(vals_of(results[r], m, "cvr_auc_entire")) < len(results[r])
                   for r in regimes)  # ran on some data sets of a regime, not on all
        axes[0].bar(np.arange(len(regimes)) + i * width, means, width,
                    label=m + (" (first data set)" if part else ""))
    for name, style in zip(list(ORACLES)[1:], ["k--", "k:"]):
        for j, r in enumerate(regimes):
            v = np.mean(np.concatenate(vals_of(results[r], name, "cvr_auc_entire")))
            axes[0].plot([j - width / 2, j + 0.8 - width / 2], [v, v], style,
                         label=name if j == 0 else None)
    axes[0].set_xticks(np.arange(len(regimes)) + 0.4 - width / 2, regimes)
    axes[0].set(ylim=(0.5, None), ylabel="entire-space CVR AUC", title="CVR over all impressions")
    axes[0].legend(fontsize=7)
    for label, key in [("fewer clicks per impression (all impressions)", "pCTR"),
                       ("fewer impressions (the same click rate)", "of the impressions")]:
        points = []
        for k, res in results.items():
            if k == "observables" or (k.startswith("observables,") and key in k):
                means = headline(res)[1]
                points.append((np.mean([d["runs"][0]["naive_cvr"]["train_clicks"]
                                        for d in res.values()]), means[:, 0] - means[:, 1]))
        if len(points) > 1:
            x, d = zip(*sorted(points, key=lambda t: t[0]))
            axes[1].errorbar(x, [v.mean() for v in d], [v.std() for v in d], marker="o",
                             capsize=3, label=label)
    axes[1].axhline(0, color="k", lw=0.5)
    axes[1].set(xscale="log", xlabel="clicked train rows (mean over data sets)",
                ylabel="ESMM - naive CVR AUC (± std over data sets)",
                title="data sparsity (observables)")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
