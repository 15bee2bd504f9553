"""Stage 3, step 4: class imbalance - BCE vs pos_weight reweighting vs focal loss, and calibration.

What you learn here: the tools people reach for when positives are rare, measured on ranking
(AUC), on probability quality (log loss, expected calibration error, a reliability diagram) and
after the fix that makes the probabilities usable again:
    pos_weight w:   L = -[w y log p + (1 - y) log(1 - p)]. Its optimum is odds' = w * odds, so
                    the exact fix is the prior-shift correction  logit - log(w).
    focal (γ, α):   L = -α_t (1 - p_t)^γ log p_t  (Lin et al. 2017), p_t = p if y = 1 else 1 - p,
                    α_t = α if y = 1 else 1 - α. γ = 0, no α: plain BCE. It down-weights easy
                    examples, which pushes predictions toward 0.5: no closed-form fix, so we fit
                    Platt scaling (a 1-feature logistic regression on the logit) on validation.
Two data sets: Adult income (24% positives) and a low-CTR synthetic Criteo (3% positives, like
Criteo 1TB) from stage2_ctr/01_make_subset.py --ctr 0.03. The lesson to read off the table: the
losses barely move AUC but move calibration a lot; when probabilities matter (bids, expected
revenue), train with plain BCE or correct afterwards.

Run:    python stage3_advanced/04_imbalance.py --make-data            # 3 seeds, ~7 min
        python stage3_advanced/04_imbalance.py --quick --make-data    # 1 seed, small, ~1 min
Reads:  stage1_adult/adult_stage1.npz (stage1_adult/02_preprocess.py) and
        stage3_advanced/data/ctr_low_<rows>/ (01_make_subset.py --synthetic N --ctr 0.03;
        --make-data runs it when missing)
Writes: results/stage3_imbalance.md + .png (reliability diagrams; only the default run: --quick
        writes to runs/quick/, other flags to runs/partial/, CUDA to *_cuda.md),
        runs/stage3_imbalance.json
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: plain imports
import common  # noqa: E402
from common import (binary_metrics, checked, mean_std, pyplot, save_figure,  # noqa: E402
                    write_json, write_text)
from stage2_ctr import synthetic, train_stats  # noqa: E402
from stage2_ctr.models import build_model, criteo_schema  # noqa: E402
from stage2_ctr.training import CTRInputs, FitError, fit, predict_in_memory  # noqa: E402
from stage3_advanced.stage3_common import (ADULT_NPZ, HERE, AdultMultiTask,  # noqa: E402
                                           load_adult, load_criteo, setup)


def focal_loss(logits, y, gamma=2.0, alpha=None):
    """Per-element focal loss  -α_t (1 - p_t)^γ log p_t, from logits (numerically stable:
    log p_t = -BCEWithLogits). gamma = 0 and alpha = None give BCE exactly."""
    ce = F.binary_cross_entropy_with_logits(logits, y, reduction="none")
    p_t = torch.exp(-ce)
    loss = (1 - p_t) ** gamma * ce if gamma else ce
    if alpha is not None:
        loss = (alpha * y + (1 - alpha) * (1 - y)) * loss
    return loss


def make_losses(args, pos_rate):
    """name -> (loss_fn, pos_weight or None)."""
    w = (1 - pos_rate) / pos_rate  # the usual choice: balance the two classes' total weight
    losses = {"BCE": (lambda z, y: F.binary_cross_entropy_with_logits(z, y, reduction="none"),
                      None),
              f"pos_weight={w:.1f}": (lambda z, y: F.binary_cross_entropy_with_logits(
                  z, y, pos_weight=torch.tensor(w, device=z.device), reduction="none"), w)}
    for g in args.gammas:
        losses[f"focal γ={g:g}"] = (lambda z, y, g=g: focal_loss(z, y, g), None)
    if args.alpha is not None:
        g = max(args.gammas)
        losses[f"focal γ={g:g} α={args.alpha:g}"] = (
            lambda z, y, g=g: focal_loss(z, y, g, args.alpha), None)
    return losses


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", choices=["adult", "ctr"], default=["adult", "ctr"])
    p.add_argument("--gammas", type=checked(float, lambda v: 0 <= v < 100, "a focal γ >= 0"),
                   nargs="+", default=[1.0, 2.0])
    p.add_argument("--alpha", type=checked(float, lambda v: 0 < v < 1, "a focal α in (0, 1)"),
                   default=0.25,
                   help="α of one extra focal run (with the largest γ)")
    p.add_argument("--seeds", type=common.seed_list, default=[0, 1, 2])
    p.add_argument("--npz", default=str(ADULT_NPZ))
    p.add_argument("--ctr", type=common.rate, default=0.03,
                   help="click rate of the synthetic data")
    p.add_argument("--rows", type=checked(int, lambda v: v >= 100, "an integer >= 100"),
                   default=300_000, help="synthetic rows (8:1:1)")
    p.add_argument("--data-root", default=str(HERE / "data"))
    p.add_argument("--make-data", action="store_true",
                   help="generate the synthetic data with stage2_ctr/01_make_subset.py if missing")
    p.add_argument("--epochs", type=common.positive_int, default=20, help="Adult epochs (CTR: 2)")
    p.add_argument("--device", type=common.device_arg, default="auto",
                   help="auto | cpu | cuda | cuda:N")
    p.add_argument("--threads", type=common.positive_int, default=2, help="torch CPU threads")
    p.add_argument("--quick", action="store_true",
                   help="defaults 1 seed, 40k synthetic rows, 3 epochs")
    p.add_argument("--out", default=None,
                   help="default results/stage3_imbalance.md for the default run; --quick: "
                        "runs/quick/, other flags: runs/partial/")
    p.add_argument("--runs-dir", default=str(common.RUNS), help="where the JSON goes")
    args = common.parse_with_quick(p, argv, dict(seeds=[0], rows=40_000, epochs=3))
    args.device = common.resolve_device(args.device)
    args.out = str(args.out or common.results_file(argv, args.quick, "stage3_imbalance",
                                                   args.device))
    args.seed_list = args.seeds
    return args


# -------------------------------------------------------------------------------------- data
def load_dataset(args, name):
    """-> {split: (inputs, y (N, 1))}, the oracle's test AUC (synthetic only), a model
    factory."""
    if name == "adult":
        data, meta = load_adult(args.npz)
        data = {s: (x, y[:, :1]) for s, (x, y) in data.items()}  # income only
        return data, None, lambda: AdultMultiTask(meta, "shared_bottom", 1, width=256,
                                                  depth=2, tower=(32,), dropout=0.2)
    folder = Path(args.data_root) / f"ctr_low_{args.rows}_ctr{args.ctr:g}"
    if not (folder / "meta.json").exists():
        if not args.make_data:
            sys.exit(f"error: {folder}/meta.json not found: run `python stage2_ctr/"
                     f"01_make_subset.py --synthetic {args.rows} --ctr {args.ctr} --out-dir "
                     f"{folder}` first (or add --make-data)")
        synthetic.make_synthetic(synthetic.SyntheticConfig(rows=args.rows, ctr=args.ctr), folder)
    stats = train_stats.fit_stats([folder / "train.txt"])
    data = {s: load_criteo(folder / f"{s}.txt", 1, 18, stats) for s in ["train", "val", "test"]}
    oracle_auc = json.loads((folder / "meta.json").read_text())["splits"]["test"]["oracle_auc"]
    return data, oracle_auc[0], lambda: CTRInputs(build_model("dnn", criteo_schema(18),
                                                              emb_dim=8, mlp=(256, 128),
                                                              sparse=True))


# ------------------------------------------------------------------------------- calibration
def platt(val_logits, val_y, test_logits):
    """Platt scaling: p = sigmoid(a * logit + b), a and b fitted on validation."""
    lr = LogisticRegression(C=1e6).fit(val_logits.reshape(-1, 1), val_y)
    return lr.predict_proba(test_logits.reshape(-1, 1))[:, 1]


def reliability(y, p, n_bins=15):
    """Mean prediction and observed positive rate per occupied probability bin."""
    edges = np.linspace(0, 1, n_bins + 1)
    which = np.clip(np.digitize(p, edges[1:-1]), 0, n_bins - 1)
    count = np.bincount(which, minlength=n_bins)
    seen = count > 0
    return (np.bincount(which, weights=p, minlength=n_bins)[seen] / count[seen],
            np.bincount(which, weights=y, minlength=n_bins)[seen] / count[seen])


def run_loss(args, data, new_model, loss_fn, pos_weight, seed, dataset, name):
    setup(args.threads, seed)
    model = new_model()
    is_ctr = dataset == "ctr"
    fit(model, data["train"], data["val"], loss_fn, lr=2e-3 if is_ctr else 1e-3,
        weight_decay=0.0 if is_ctr else 1e-4, batch_size=2048 if is_ctr else 256,
        epochs=2 if is_ctr else args.epochs, patience=1 if is_ctr else 4, seed=seed,
        desc=f"{dataset} {name} s{seed}", device=args.device)
    val_z = predict_in_memory(model, data["val"][0])[:, 0].numpy()
    test_z = predict_in_memory(model, data["test"][0])[:, 0].numpy()
    y_val, y = data["val"][1][:, 0].numpy(), data["test"][1][:, 0].numpy()
    raw = 1 / (1 + np.exp(-test_z))
    out = {"raw": binary_metrics(y, raw), "platt": binary_metrics(y, platt(val_z, y_val, test_z))}
    if pos_weight is not None:
        out["prior_shift"] = binary_metrics(y, 1 / (1 + np.exp(-(test_z - np.log(pos_weight)))))
    out["curve"] = [c.tolist() for c in reliability(y, raw)]
    return out


# ------------------------------------------------------------------------------------ report
def report(args, argv, results, oracles, wall_s):
    lines = ["# Stage 3: class imbalance - reweighting and focal loss vs calibration", "",
             f"Test metrics, mean ± std over seeds {','.join(map(str, args.seed_list))}. ECE: "
             "expected calibration error (15 equal-width bins). 'fixed': prior-shift "
             "correction (logit - log w) for pos_weight, Platt scaling fitted on validation "
             "for the others; AUC is unchanged "
             "by either (both are monotone).", ""]
    for dataset, per_loss in results.items():
        first = next(iter(per_loss.values()))[0]["raw"]
        oracle = (f", the oracle's AUC {oracles[dataset]:.4f}" if oracles[dataset] else "")
        lines += [f"## {dataset} (test positive rate {first['pos_rate']:.3f}{oracle})", "",
                  "| loss | AUC | log loss | ECE | mean prediction | log loss fixed | "
                  "ECE fixed |", "|---|---|---|---|---|---|---|"]
        for name, runs in per_loss.items():
            def col(key, fix="raw"):
                return mean_std([r[fix][key] for r in runs])
            fix = "prior_shift" if "prior_shift" in runs[0] else "platt"
            lines.append(f"| {name} | {col('auc')} | {col('logloss')} | {col('ece')} | "
                         f"{np.mean([r['raw']['mean_pred'] for r in runs]):.3f} | "
                         f"{col('logloss', fix)} | {col('ece', fix)} |")
        lines.append("")
    lines += [f"Command: `{common.command_line(__file__, argv)}` ({wall_s / 60:.1f} min, "
              f"device {args.device}).", common.machine_line(args.device, args.threads)]
    return "\n".join(lines) + "\n"


def plot(results, path):
    plt = pyplot()
    fig, axes = plt.subplots(1, len(results), figsize=(4.5 * len(results), 4), squeeze=False)
    for ax, (dataset, per_loss) in zip(axes[0], results.items()):
        ax.plot([0, 1], [0, 1], "k:", label="perfect")
        for name, runs in per_loss.items():
            mean_p, frac = runs[0]["curve"]
            ax.plot(mean_p, frac, "o-", ms=3, label=name)
        ax.set(title=f"{dataset}: reliability (seed {0}, raw)", xlabel="mean predicted p",
               ylabel="observed positive rate", xlim=(0, 1), ylim=(0, 1))
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


@common.one_line_errors(FitError)
def main(argv=None):
    args = parse_args(argv)
    for folder, flag in [(Path(args.out).parent, "--out"), (args.runs_dir, "--runs-dir")]:
        common.check_writable(folder, flag)
    t0 = time.perf_counter()
    results, oracles = {}, {}
    for dataset in args.datasets:
        data, oracle_auc, new_model = load_dataset(args, dataset)
        pos_rate = float(data["train"][1].mean())
        oracles[dataset] = oracle_auc
        print(f"{dataset}: {len(data['train'][1]):,} train rows, {pos_rate:.3f} positives")
        results[dataset] = {}
        for name, (loss_fn, w) in make_losses(args, pos_rate).items():
            runs = [run_loss(args, data, new_model, loss_fn, w, s, dataset, name)
                    for s in args.seed_list]
            results[dataset][name] = runs
            r = runs[0]
            print(f"  {name:<22} AUC {r['raw']['auc']:.4f} logloss {r['raw']['logloss']:.4f} "
                  f"ECE {r['raw']['ece']:.4f} mean p {r['raw']['mean_pred']:.3f}")
    wall = time.perf_counter() - t0
    common.require_finite({f"{d} {name}": [[r[fix][k] for k in ("auc", "logloss", "ece")]
                                           for r in runs for fix in ("raw", "platt")]
                           for d, per_loss in results.items()
                           for name, runs in per_loss.items()}, "the test metrics")
    table = report(args, argv, results, oracles, wall)
    out = Path(args.out)
    write_text(out, table)
    plot(results, out.with_suffix(".png"))
    write_json(Path(args.runs_dir) / (out.stem + ".json"),
               {"script": "stage3_advanced/04_imbalance.py",
                "command": common.command_line(__file__, argv), "device": str(args.device),
                "config": {k: str(v) if k == "device" else v for k, v in vars(args).items()},
                "results": results, "wall_s": wall})
    print(table)
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
