"""The harness behind stage2_ctr/08_one_epoch.py (the one-epoch phenomenon): validation curves
read as "drop at the start of epoch 2" and "best epoch", an in-memory loop with evaluations
inside the epoch (MovieLens and the probe), the probe itself, and the report.

Runs on Criteo-format files go through train_ctr.train (via compare.run_all: a finished run is
read back only when its whole config and its data fingerprints equal today's); MovieLens and the
probe train in memory with the trainer's optimizers and step (training.py), same batch order
every epoch as the trainer's text stream.
"""
import copy
import statistics

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
from stage2_ctr import criteo
from stage2_ctr.training import make_optimizers, make_step, reset_embeddings

MLP_MODELS = ("dnn", "deepfm", "dcn", "dcnv2")
DROPS = 0.005  # a model "drops" when its val AUC falls by more than this at epoch 2's start


# ------------------------------------------------------------------------- reading curves
def curve(history):
    """[(position in epochs, val AUC, val logloss)] from a history whose entries carry the epoch
    they fell in and whether they closed it (train_ctr's and train_in_memory's): an evaluation
    a quarter into epoch 2 sits at 1.25."""
    ends, start, out = {}, 0, []
    for h in history:
        if h.get("epoch_end"):
            ends[h["epoch"]] = (start, h["step"])
            start = h["step"]
    for h in history:
        a, b = ends.get(h["epoch"], (start, max(h["step"], start + 1)))
        out.append((h["epoch"] - 1 + (h["step"] - a) / max(b - a, 1), h["val_auc"],
                    h["val_logloss"]))
    return out


def shape_of(history):
    """What a curve says: val AUC at the end of each epoch, the first evaluation of epoch 2,
    the drop (end of epoch 1 minus that), and the epoch of the best evaluation."""
    points = curve(history)
    ends = [auc for (pos, auc, _), h in zip(points, history) if h.get("epoch_end")]
    second = [auc for (pos, auc, _), h in zip(points, history) if h["epoch"] == 2]
    best = max(range(len(points)), key=lambda i: points[i][1])
    return {"ends": ends, "epoch2_first": second[0] if second else None,
            "drop": ends[0] - second[0] if ends and second else None,
            "best_epoch": history[best]["epoch"], "best_auc": points[best][1]}


def per_model(runs):
    """{model: [metrics per data seed]} -> table rows with spreads over the data seeds."""
    rows = []
    for model, ms in runs.items():
        shapes = [shape_of(m["history"]) for m in ms]
        rows.append({"model": model, "shapes": shapes,
                     "test": [m["splits"].get("test", {}).get("auc") for m in ms],
                     "drop": [s["drop"] for s in shapes if s["drop"] is not None]})
    return rows


def verdict(rows):
    """The claim of the chapter on one data family: every MLP model drops on every data set,
    LR and FM on none."""
    out = []
    for r in rows:
        if not r["drop"]:
            continue
        expect = r["model"] in MLP_MODELS
        seen = min(r["drop"]) > DROPS if expect else max(r["drop"]) <= DROPS
        out.append(f"{r['model']}: drop " + " / ".join(f"{d:+.4f}" for d in r["drop"]) + " - "
                   + ("expected a drop > " if expect else "expected none above ") + f"{DROPS}"
                   + (" on every data set: holds" if seen else ": does not hold"))
    return out


# ------------------------------------------------------------------- data held in memory
def read_split(files, hash_bits, stats, rows=None):
    """(dense, sparse, label) tensors of Criteo-format files (the first `rows` rows)."""
    parts, n = [], 0
    for batch in criteo.CriteoStream(files, 1 << 15, hash_bits, stats):
        parts.append(batch)
        n += len(batch[2])
        if rows and n >= rows:
            break
    dense, sparse, label = (torch.cat(x) for x in zip(*parts))
    return (dense[:rows], sparse[:rows], label[:rows]) if rows else (dense, sparse, label)


def rare_share(ids, below=10):
    """Share of the id occurrences (rows x id fields) whose id occurs fewer than `below` times
    in these rows: how many of the rows carry ids the model barely sees (sparsity)."""
    ids = ids[ids >= 0]
    counts = torch.bincount(ids)
    return (counts[ids] < below).float().mean().item()


def logloss_of(model, split, batch=16384):
    """Mean BCE of a model on (dense, sparse, label), and the logits."""
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(split[0][i:i + batch], split[1][i:i + batch])
                            for i in range(0, len(split[2]), batch)])
    model.train()
    return F.binary_cross_entropy_with_logits(logits, split[2]).item(), logits


def train_in_memory(model, train, val, lr, epochs, evals_per_epoch, batch_size, seed,
                    optimizer="adam", reinit_emb=False, shuffle=False, stop_at=None):
    """train_ctr's loop on tensors: the same optimizers and step, val AUC / logloss
    `evals_per_epoch` times per epoch (history entries as train_ctr's). shuffle: a new order per
    epoch (a torch generator seeded with `seed`), else the file's order every epoch, as the
    trainer's text stream. stop_at: (epoch, batches) -> stop there and return the state dicts
    {(epoch, batches): state} seen at the end of epoch 1 and at stop_at (the probe)."""
    torch.manual_seed(seed)
    opts = make_optimizers(model, lr, kind=optimizer)
    step = make_step(model, opts)
    gen = torch.Generator().manual_seed(seed)
    n = len(train[2])
    per_epoch = -(-n // batch_size)
    points = {round(k * per_epoch / evals_per_epoch) for k in range(1, evals_per_epoch + 1)}
    history, snapshots, t = [], {}, 0
    for epoch in range(epochs):
        if reinit_emb and epoch:
            reset_embeddings(model, opts)
        order = torch.randperm(n, generator=gen) if shuffle else torch.arange(n)
        for i in range(per_epoch):
            idx = order[i * batch_size:(i + 1) * batch_size]
            step(train[0][idx], train[1][idx], train[2][idx])
            t += 1
            if (epoch, i + 1) == stop_at:
                snapshots[stop_at] = copy.deepcopy(model.state_dict())
                return history, snapshots
            if i + 1 in points:
                loss, logits = logloss_of(model, val)
                auc = common.auc_logloss(val[2].numpy(), torch.sigmoid(logits).numpy())["auc"]
                history.append({"step": t, "val_auc": auc, "val_logloss": loss,
                                "epoch": epoch + 1, "epoch_end": i + 1 == per_epoch})
        if epoch == 0:
            snapshots[(0, per_epoch)] = copy.deepcopy(model.state_dict())
    return history, snapshots


# -------------------------------------------------------------------------- the probe
def table_keys(model):
    """state_dict keys of the embedding tables (every nn.Embedding's weight)."""
    return {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, nn.Embedding)}


def boundary_probe(make_model, train, val, lr, batch_size, seed, quarter=4, seen_rows=20_000):
    """Zhang et al.'s hypothesis in small: train one epoch (state A), then the first 1/quarter
    of epoch 2 (state B). Seen rows: the training rows of that first part of epoch 2 (revisited
    in epoch 2, seen in epoch 1 too); unseen rows: validation. For each, the change of logloss
    from A to B, and split by where it comes from: B's tables with A's dense part (MLP, cross,
    dense vectors, biases), and A's tables with B's dense part."""
    torch.manual_seed(seed)  # the initial draw too: the probe is the same whatever ran before
    model = make_model()
    per_epoch = -(-len(train[2]) // batch_size)
    part = max(per_epoch // quarter, 1)
    # one run, optimizer state kept across the boundary: A at the end of epoch 1, B `part`
    # batches into epoch 2 (the file's order: epoch 2 starts with the same rows as epoch 1)
    _, snaps = train_in_memory(model, train, val, lr, 2, 1, batch_size, seed,
                               stop_at=(1, part))
    a, b = snaps[(0, per_epoch)], snaps[(1, part)]
    rows = min(part * batch_size, seen_rows)
    seen = tuple(x[:rows] for x in train)
    keys = table_keys(model)
    mixes = {"all of B": b, "B's tables only": {k: b[k] if k in keys else a[k] for k in a},
             "B's dense part only": {k: a[k] if k in keys else b[k] for k in a}}
    out = {}
    for name, split in [("seen", seen), ("unseen", val)]:
        model.load_state_dict(a)
        base, _ = logloss_of(model, split)
        for mix, state in mixes.items():
            model.load_state_dict(state)
            out[(name, mix)] = logloss_of(model, split)[0] - base
    return out


# ------------------------------------------------------------------------------- report
def _f(x, digits=4):
    return "-" if x is None else f"{x:.{digits}f}"


def curve_lines(title, runs, n_seeds, what, rare=None):
    """The table of one data family: per model the val AUC at each epoch's end, the first
    evaluation of epoch 2, the drop, the best epoch per data set, test AUC of the best step."""
    rows = per_model(runs)
    if not rows:
        return []
    n_epochs = max(len(s["ends"]) for r in rows for s in r["shapes"])
    lines = [f"## {title}", "", what, ""]
    lines += common.markdown_table(
        ["model"] + [f"val AUC, end of epoch {e + 1}" for e in range(n_epochs)]
        + ["val AUC, first eval of epoch 2", "drop at the start of epoch 2", "best epoch",
           "test AUC (best val step)"],
        [[r["model"]] + [common.mean_std([s["ends"][e] for s in r["shapes"]
                                          if len(s["ends"]) > e]) for e in range(n_epochs)]
         + [common.mean_std([s["epoch2_first"] for s in r["shapes"]
                             if s["epoch2_first"] is not None]),
            common.mean_std(r["drop"]), ", ".join(str(s["best_epoch"]) for s in r["shapes"]),
            common.mean_std([t for t in r["test"] if t is not None])] for r in rows])
    lines += ["", f"Mean ± std over {n_seeds} data sets; best epoch listed per data set."
              + (f" Sparsity (first data set): {rare:.1%} of the training rows' id occurrences "
                 "are of ids seen fewer than 10 times in the training split." if rare is not None
                 else "")]
    lines += [f"- {v}" for v in verdict(rows)] + [""]
    return lines


def factor_lines(args, factors, base_drops):
    """The factor table: drop and best epoch per setting (DeepFM, first data set)."""
    base_end = shape_of(factors[0][3]["history"])["ends"][0]
    matched = {}
    for factor, label, family, m in factors:
        if factor == "optimizer":
            gap = abs(shape_of(m["history"])["ends"][0] - base_end)
            if family not in matched or gap < matched[family][0]:
                matched[family] = (gap, label)
    lines = ["## What makes the drop larger or smaller (DeepFM, demo data set "
             f"{args.data_seeds[0]})", "", "One change at a time from the demo's DeepFM; for "
             "the optimizers the learning rate whose end-of-epoch-1 val AUC is closest to "
             "Adam's is marked 'matched' (the comparison at matched one-epoch quality). "
             f"For scale: the baseline's drop over the {len(base_drops)} data sets is "
             f"{common.mean_std(base_drops)}.", ""]
    rows = []
    for factor, label, family, m in factors:
        s = shape_of(m["history"])
        mark = " (matched)" if factor == "optimizer" and matched[family][1] == label else ""
        rows.append([factor, label + mark, _f(s["ends"][0]), _f(s["epoch2_first"]),
                     _f(s["drop"]), " -> ".join(_f(e) for e in s["ends"]), s["best_epoch"],
                     _f(s["best_auc"]), _f(m["splits"]["test"]["auc"])])
    lines += common.markdown_table(
        ["factor", "setting", "val AUC end of epoch 1", "first eval of epoch 2", "drop",
         "val AUC at epoch ends", "best epoch", "best val AUC", "test AUC"], rows)
    return lines + [""]


PROBE_MIXES = ("all of B", "B's dense part only", "B's tables only")


def probe_lines(probe):
    lines = ["## The probe: what the first quarter of epoch 2 does to seen and unseen rows", "",
             "State A: the end of epoch 1; B: a quarter into epoch 2 (the same run, optimizer "
             "state kept). Seen rows: the training rows of that quarter (seen in epoch 1 and "
             "again now, up to 20,000); unseen: the validation split. Each cell: the change of "
             "mean logloss from A, with all of B, with B's dense part (MLP, cross, dense-field "
             "vectors, biases) over A's tables, and with B's tables under A's dense part. "
             "Mean ± std over the data sets.", ""]
    rows = [[m, mix, common.mean_std([r[("seen", mix)] for r in rs]),
             common.mean_std([r[("unseen", mix)] for r in rs])]
            for m, rs in probe.items() for mix in PROBE_MIXES]
    lines += common.markdown_table(["model", "parameters from B", "seen rows: logloss change",
                                    "unseen rows: logloss change"], rows)
    return lines + [""]


def fix_lines(fix, n_seeds):
    lines = ["## The fix: embedding tables drawn afresh at every epoch start (--reinit-emb)", "",
             "Test AUC of the best validation step: one epoch (--epochs 1), the plain multi-"
             "epoch run, and the multi-epoch run with --reinit-emb (MLP kept); the difference "
             f"to one epoch per data set. Mean ± std over {n_seeds} data sets.", ""]
    rows = []
    for m, r in fix.items():
        test = {k: [x["splits"]["test"]["auc"] for x in v] for k, v in r.items()}
        diff = [a - b for a, b in zip(test["reinit"], test["one"])]
        shapes = [shape_of(x["history"]) for x in r["reinit"]]
        rows.append([m, common.mean_std(test["one"]), common.mean_std(test["plain"]),
                     common.mean_std(test["reinit"]),
                     " / ".join(f"{d:+.4f}" for d in diff) + f" ({common.mean_std(diff)})",
                     ", ".join(str(s["best_epoch"]) for s in shapes),
                     " -> ".join(common.mean_std([s["ends"][e] for s in shapes], 3)
                                 for e in range(len(shapes[0]["ends"])))])
    lines += common.markdown_table(
        ["model", "one epoch", "plain, best step", "--reinit-emb, best step",
         "reinit - one epoch, per data set", "best epoch (reinit)",
         "val AUC at epoch ends (reinit)"], rows)
    return lines + [""]


def write_report(args, parts, log, seconds):
    """<out>/stage2_one_epoch.md + .png."""
    n = len(args.data_seeds)
    budget = (f"batch {args.batch_size}, Adam lr {args.lr:g} (RowSparseAdam for the tables), "
              f"emb {args.emb_dim}, MLP {'-'.join(map(str, args.mlp))}, {args.cross_layers} "
              f"cross layers, hash 2^{args.hash_bits}, {args.epochs} epochs, "
              f"{args.evals_per_epoch} validations per epoch, no early stop")
    lines = ["# Stage 2: the one-epoch phenomenon", "", f"Every run: {budget}; 1 torch thread. "
             "The drop = val AUC at the end of epoch 1 minus val AUC at the first validation "
             "of epoch 2.", ""]
    if "curves" in parts:
        lines += curve_lines("The demo's data (lowrank regime)", parts["curves"], n,
                             rare=parts.get("rare", {}).get("curves"), what=
                             f"{args.rows:,} rows (8:1:1) per data set, generator seeds "
                             f"{', '.join(map(str, args.data_seeds))} (seed 0 is `make demo`'s "
                             "data).")
    if "regime" in parts:
        lines += curve_lines(f"The {args.regime} regime", parts["regime"], n,
                             rare=parts.get("rare", {}).get("regime"), what=
                             f"{args.regime_rows:,} rows per data set, generator seeds "
                             f"{', '.join(map(str, args.data_seeds))}.")
    if "movielens" in parts:
        lines += curve_lines("MovieLens-100k", parts["movielens"], n,
                             rare=parts.get("rare", {}).get("movielens"), what=
                             "05_movielens.py's click task, random 8:1:1 split with seeds "
                             f"{', '.join(map(str, args.data_seeds))}, batch 1024, a fresh "
                             "order every epoch (in memory; no test column).")
    if "factors" in parts:
        base = [s for s in per_model({"deepfm": parts["curves"]["deepfm"]})[0]["drop"]]
        lines += factor_lines(args, parts["factors"], base)
    if "probe" in parts:
        lines += probe_lines(parts["probe"])
    if "fix" in parts:
        lines += fix_lines(parts["fix"], n)
    if log["reused"]:
        lines.append(f"{log['reused']} of the {log['runs']} trainer runs were read back from "
                     "runs/oe_*/metrics.json (same config and data; --fresh retrains).")
    lines += ["", f"Written by `{args.command}` in {seconds / 60:.0f} min.",
              common.machine_line("cpu", 1)]
    common.write_text(args.out_dir / "stage2_one_epoch.md", "\n".join(lines) + "\n")
    plot(args, parts, args.out_dir / "stage2_one_epoch.png")
    print(f"wrote {args.out_dir / 'stage2_one_epoch.md'} (+ .png)")


def plot(args, parts, path):
    """Val AUC against epochs (mean over data sets), the epoch boundaries dashed."""
    panels = [(k, t) for k, t in [("curves", "demo data (lowrank)"),
                                  ("regime", f"{args.regime} regime"),
                                  ("movielens", "MovieLens-100k")] if k in parts]
    deepfm = {}
    if "factors" in parts:
        for factor, label, family, m in parts["factors"]:
            if factor in ("baseline", "optimizer"):
                deepfm[label] = [m]
    if "fix" in parts and "deepfm" in parts["fix"]:
        deepfm["Adam + --reinit-emb"] = parts["fix"]["deepfm"]["reinit"][:1]
    if deepfm:
        panels.append(("deepfm", f"DeepFM, data set {args.data_seeds[0]}"))
    if not panels:
        return
    plt = common.pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.8), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        runs = deepfm if key == "deepfm" else parts[key]
        for i, (name, ms) in enumerate(runs.items()):
            pts = [curve(m["history"]) for m in ms]
            k = min(len(p) for p in pts)
            x = [p[0] for p in pts[0][:k]]
            y = np.mean([[p[1] for p in c[:k]] for c in pts], axis=0)
            ax.plot(x, y, marker=".", label=name, color=f"C{i}",
                    ls="--" if name in ("lr", "fm") else "-")
        for e in range(1, args.epochs):
            ax.axvline(e, color="grey", ls=":", lw=1)
        ax.set(xlabel="epoch", ylabel="val AUC" + ("" if key == "deepfm" else
                                                   f" (mean of {len(args.data_seeds)} sets)"),
               title=title)
        ax.legend(fontsize=6)
    fig.tight_layout()
    common.save_figure(fig, path)
