"""The harness of stage3_advanced/08_user_history.py: data sets in the sequence format turned
into tensors, one training of one history model, the LightGBM peer's history aggregates, the
latency probe, and the plots. The lesson (which data, which models, what the table says) is
in the chapter; this module only measures.
"""
import time
from dataclasses import dataclass

import numpy as np
import torch

import common
from stage2_ctr import movielens
from stage2_ctr.models.history import HistoryModel
from stage2_ctr.training import FitError, bce, fit, predict_in_memory
from stage3_advanced import behaviour, multi_interest


@dataclass
class Prepared:
    """One data set ready to train on: {split: (inputs, y (N, 1))}, the raw user ids of each
    split (for gAUC), the table sizes, and the rows' history lengths."""
    splits: dict
    users: dict
    schema: object
    name: str


def prepare(rows, max_len, name):
    """rows: {train/val/test: sequence-format rows (strings, as read_rows returns)}."""
    vocab = behaviour.fit_vocab(rows["train"])
    splits, users = {}, {}
    for part, r in rows.items():
        x, y = behaviour.encode(r, vocab, max_len)
        splits[part] = ({k: torch.from_numpy(v) for k, v in x.items()},
                        torch.from_numpy(y)[:, None])
        users[part] = r["user"].to_numpy()
        labels = y
        if len(labels) == 0 or labels.min() == labels.max():
            raise behaviour.FormatError(f"{name}: the {part} rows hold {len(labels)} rows, "
                                        f"{int(labels.sum())} clicks: AUC needs both labels")
    return Prepared(splits, users, behaviour.schema_of(vocab, max_len), name)


def through_files(rows, folder, say=print):
    """Write {split: rows} as sequence-format files into `folder` and read them back: every data
    set of the chapter goes through the format a downloaded Amazon file is read with."""
    out = {}
    for part, r in rows.items():
        behaviour.write_rows(folder / f"{part}.txt", r)
        out[part] = behaviour.read_rows(folder / f"{part}.txt", say)
    return out


def synthetic_data(regime, seed, folder, users, max_len):
    """A generated data set (multi_interest.py) as files + meta.json (with the oracle's AUC and
    the oracle without history) -> (Prepared, meta)."""
    rows, oracle, meta = multi_interest.generate(regime, seed, users=users, max_len=max_len)
    for part, p in oracle.items():
        common.save_npy(folder / f"{part}.oracle.npy", p.astype(np.float32))
    common.write_json(folder / "meta.json", meta)
    return prepare(through_files(rows, folder), max_len, f"{regime} seed {seed}"), meta


def movielens_files(task, kind, folder, max_len, say=print):
    """MovieLens-100k's click task with time-ordered histories (behaviour.movielens_histories:
    strictly earlier ratings only, up to max_len) in the project's `kind` split
    (movielens.split), written as sequence files and read back: {split: rows}."""
    rows = behaviour.movielens_rows(task, behaviour.movielens_histories(task, max_len))
    idx = movielens.split(task, kind, seed=0)
    parts = {part: rows.iloc[i].reset_index(drop=True) for part, i in idx.items()}
    return through_files(parts, folder, say)


def scores(y, p, users):
    m = common.auc_logloss(y, p)
    g = behaviour.gauc(users, y, p)
    return {"auc": m["auc"], "logloss": m["logloss"], "gauc": g["gauc"],
            "gauc_users": g["users"], "gauc_skipped": g["skipped"]}


def train_one(data, kind, cfg, seed, device, epochs, patience, batch_size, emb_dim, mlp,
              activation="dice"):
    """One model, one config {lr, wd, dropout}: early stopping on validation AUC, then the
    validation and test metrics of the best epoch (AUC, log loss, gAUC) and the speed."""
    torch.manual_seed(seed)
    model = HistoryModel(data.schema, kind, emb_dim=emb_dim, mlp=mlp, dropout=cfg["dropout"],
                         activation=activation)
    info = fit(model, data.splits["train"], data.splits["val"], bce, lr=cfg["lr"],
               weight_decay=cfg["wd"], batch_size=batch_size, epochs=epochs, patience=patience,
               seed=seed, quiet=True, device=device)
    out = {"best_epoch": info["best_epoch"], "train_samples_per_s": info["train_samples_per_s"],
           "epochs_run": len(info["history"])}
    for part in ("val", "test"):
        inputs, y = data.splits[part]
        p = torch.sigmoid(predict_in_memory(model, inputs))[:, 0].numpy()
        if not np.isfinite(p).all():
            raise FitError(f"{kind} on {data.name} (lr {cfg['lr']:g}) predicts NaN on {part}: "
                           "lower --lrs")
        out[part] = scores(y[:, 0].numpy(), p, data.users[part])
    return out, model.cpu()


# ------------------------------------------------------------------------ the LightGBM peer
def aggregates(inputs):
    """What a tabular model gets from the history, per row: its length, the candidate
    category's count and share in it, whether the candidate item is in it, the share of the
    last 5 in the candidate's category, and - with a liked flag - the like rate overall, of the
    last 5, and within the candidate's category. Plus item, category and user as categoricals.
    Returns (X float32 (N, F), names, number of leading categorical columns)."""
    mask = inputs["hist_item"] > 0
    n = mask.sum(1).clamp(min=1).float()
    same_cat = (inputs["hist_cat"] == inputs["cat"][:, None]) & mask
    same_item = (inputs["hist_item"] == inputs["item"][:, None]) & mask
    last5 = mask & (behaviour_recency(mask) <= 5)
    cols = {"item": inputs["item"], "cat": inputs["cat"], "user": inputs["user"],
            "length": mask.sum(1), "cat_count": same_cat.sum(1),
            "cat_share": same_cat.sum(1) / n, "item_seen": same_item.any(1),
            "cat_share_last5": (same_cat & last5).sum(1) / last5.sum(1).clamp(min=1)}
    if "hist_side" in inputs:
        liked = (inputs["hist_side"] == 2) & mask
        cols |= {"like_rate": liked.sum(1) / n,
                 "like_rate_last5": (liked & last5).sum(1) / last5.sum(1).clamp(min=1),
                 "like_rate_in_cat": (liked & same_cat).sum(1) / same_cat.sum(1).clamp(min=1)}
    X = torch.stack([v.float() for v in cols.values()], 1).numpy()
    return X, list(cols), 3


def behaviour_recency(mask):
    from stage2_ctr.models.layers import recency
    return recency(mask)


def lightgbm_features(data):
    return {part: (aggregates(x)[0], y[:, 0].numpy()) for part, (x, y) in data.splits.items()}


def lightgbm_run(lgb, feats, users, params, seed):
    """One LightGBM fit (early stopping on validation AUC) -> the same metrics as train_one."""
    train = lgb.Dataset(feats["train"][0], feats["train"][1], categorical_feature=[0, 1, 2])
    val = lgb.Dataset(feats["val"][0], feats["val"][1], reference=train)
    booster = lgb.train(dict(params, seed=seed), train, num_boost_round=2000, valid_sets=[val],
                        callbacks=[lgb.early_stopping(50, verbose=False)])
    out = {"best_epoch": booster.best_iteration}
    for part in ("val", "test"):
        p = booster.predict(feats[part][0], num_iteration=booster.best_iteration)
        out[part] = scores(feats[part][1], p, users[part])
    return out


# ---------------------------------------------------------------------------- the latency
@torch.inference_mode()
def latency(model, inputs, batch, device, calls=100):
    """p50 / p99 milliseconds of one forward call at `batch` rows, after 10 warm-up calls."""
    model.eval().to(device)
    x = {k: v[:batch].to(device) for k, v in inputs.items()}
    times = []
    for i in range(calls + 10):
        common.synchronize(device)
        t0 = time.perf_counter()
        model(x)
        common.synchronize(device)
        if i >= 10:
            times.append((time.perf_counter() - t0) * 1e3)
    return float(np.percentile(times, 50)), float(np.percentile(times, 99))


# ------------------------------------------------------------------ what DIN looks at
def attention_example(model, data):
    """DIN's weights over one test user's history for two of her candidates from different
    categories that both occur in her history (the attention regime's first data set)."""
    if model is None:
        return None
    x, y = data.splits["test"]
    users = data.users["test"]
    for u in dict.fromkeys(users):
        rows = np.flatnonzero(users == u)
        hist = x["hist_cat"][rows[0]]
        cats = [r for r in rows if (hist == x["cat"][r]).any()]
        pair = [cats[0], next((r for r in cats if x["cat"][r] != x["cat"][cats[0]]), None)]
        if pair[1] is not None:
            break
    else:
        return None
    model.eval()
    with torch.no_grad():
        w = model.attention_weights({k: v[pair] for k, v in x.items()}).numpy()
    n = int((x["hist_item"][pair[0]] > 0).sum())
    return {"user": str(u), "history_cats": x["hist_cat"][pair[0], :n].tolist(),
            "candidates": [{"cat": int(x["cat"][r]), "label": int(y[r, 0]),
                            "weights": w[i, :n].tolist()} for i, r in enumerate(pair)]}


# ------------------------------------------------------------------------------ the report
def test_values(runs, metric="auc"):
    return [r["test"][metric] for r in runs]


def row_of(name, runs, oracle=None, extra=()):
    auc = test_values(runs)
    cells = [name, *extra, common.mean_std(auc), common.mean_std(test_values(runs, "gauc")),
             common.mean_std(test_values(runs, "logloss"))]
    return cells + ([f"{oracle - np.mean(auc):+.4f}"] if oracle is not None else [])


def claim(models, lead, other, regime):
    """lead - other per data set (paired), against 3x the larger seed std of the two."""
    if lead not in models or other not in models:
        return []
    diff = np.array(test_values(models[lead]["runs"])) - np.array(
        test_values(models[other]["runs"]))
    stds = [np.std(test_values(models[m][k])) for m in (lead, other)
            for k in ("runs", "train_seed_runs")]
    noise = 3 * max(stds)
    if regime == "pooling":
        verdict = ("within noise: pooling is enough" if abs(diff.mean()) < noise else
                   "NOT within noise")
    else:
        verdict = ("holds" if diff.mean() >= max(noise, 0.01 if lead == "din" else 0) else
                   "does NOT hold")
    return [f"{lead} - {other}: {diff.mean():+.4f} test AUC (per data set "
            f"{', '.join(f'{d:+.4f}' for d in diff)}; 3 x the largest seed std "
            f"{noise:.4f}) - {verdict}."]


def synthetic_lines(args, syn, claims):
    lines = ["", "## Generated users (multi_interest.py): where each idea must win", "",
             f"Generator seeds {args.gen_seeds} (one data set each, trained with the same "
             f"training seed; the training-seed column is seeds {args.train_seeds} on the "
             f"first data set); {args.users[0]:,} / {args.users[1]:,} / {args.users[2]:,} "
             "users in train / val / test (8 impressions each, histories of 20-40 behaviours, "
             "split by user); lr picked on the first data set's validation AUC, dropout and "
             "weight decay 0. `gap` = the oracle's test AUC - the model's."]
    for regime, r in syn.items():
        oracle = np.mean([m["oracle"]["test_auc"] for m in r["meta"]])
        rows = [row_of(n, m["runs"], oracle, [f"{m['picked']['lr']:g}", common.mean_std(
            test_values(m["train_seed_runs"])) if "train_seed_runs" in m else "-"])
                for n, m in r["models"].items()]
        if "lightgbm" in r:
            rows.append(row_of("LightGBM + history aggregates", r["lightgbm"]["runs"], oracle,
                               ["-", "-"]))
        for key, label in [("oracle", "oracle (the true p)"),
                           ("oracle_without_history", "oracle without the history")]:
            vals = {k: [m[key][f"test_{k}"] for m in r["meta"]] for k in ("auc", "gauc",
                                                                        "logloss")}
            rows.append([label, "-", "-", common.mean_std(vals["auc"]),
                         common.mean_std(vals["gauc"]), common.mean_std(vals["logloss"]),
                         f"{oracle - np.mean(vals['auc']):+.4f}"])
        lines += ["", f"### {regime} regime ({multi_interest.REGIMES[regime]['interests']} "
                  "interests" + (", drift: 3 old ones first" if regime == "order" else "")
                  + f", {r['rows']['train']:,} train rows)", ""]
        lines += common.markdown_table(["model", "lr", "test AUC, training seeds",
                                        "test AUC", "test gAUC", "test logloss", "gap"], rows)
        lines += [""] + claim(r["models"], *claims[regime], regime)
    return lines


def movielens_lines(args, ml):
    lines = ["", "## MovieLens-100k: time-ordered histories", "",
             f"{ml['rows']:,} ratings (3s dropped, label = rating >= 4); a row's history = the "
             "user's last L ratings with a STRICTLY earlier timestamp (item, genres, liked "
             "flag). L picked with the pooling model on the "
             f"{args.split_list[0]} split's validation AUC: "
             + ", ".join(f"L {k} {v:.4f}" for k, v in ml["L_sweep_val_auc"].items())
             + f" -> L = {ml['L']}. lr / weight decay / dropout picked per model on the "
             f"{args.split_list[0]} split (seed {args.seeds[0]}); seeds {args.seeds}. "
             "LightGBM (stage2_ctr/gbdt.py, installed for the run only) gets item, genres and "
             "user as categoricals and the history's aggregates (user_history.aggregates: "
             "length, like rate overall / of the last 5 / within the candidate's genres, the "
             "candidate genres' count and share, whether the item was rated before)."]
    for kind, models in ml["splits"].items():
        rows = []
        for n, m in models.items():
            p = m["picked"]
            cfg = (f"lr {p['lr']:g}, wd {p['wd']:g}, dropout {p['dropout']:g}" if "lr" in p
                   else f"leaves {p['num_leaves']}, min leaf {p['min_data_in_leaf']}")
            rows.append(row_of("LightGBM + history aggregates" if n == "lightgbm" else n,
                               m["runs"], None, [cfg]) + [
                f"{np.mean([r['best_epoch'] for r in m['runs']]):.1f}"])
        lines += ["", f"### {kind} split" + (" (leaks the future into histories: see below)"
                                              if kind == "random" else ""), ""]
        lines += common.markdown_table(["model", "picked on val", "test AUC", "test gAUC",
                                        "test logloss", "best epoch (trees)"], rows)
        hist = {n: np.mean(test_values(m["runs"])) for n, m in models.items()
                if n in ("pool", "din", "din_prelu", "bst")}
        if hist and "base" in models and kind == "time":
            best = max(hist, key=hist.get)
            base = np.mean(test_values(models["base"]["runs"]))
            lines += ["", f"Best history model: {best}, {hist[best]:.4f} test AUC "
                      f"({'>=' if hist[best] >= 0.805 else 'BELOW'} the 0.805 target), "
                      f"{hist[best] - base:+.4f} over no history ("
                      f"{'>=' if hist[best] - base >= 0.02 else 'BELOW'} the +0.02 target)."]
        users = next(iter(models.values()))["runs"][0]["test"]
        gain = {n: (np.mean(test_values(models[n]["runs"])) - np.mean(test_values(
            models["base"]["runs"])), np.mean(test_values(models[n]["runs"], "gauc"))
            - np.mean(test_values(models["base"]["runs"], "gauc"))) for n in hist} \
            if "base" in models else {}
        lines += ["", f"gAUC over the {users['gauc_users']} test users with both labels "
                  f"({users['gauc_skipped']} one-class users skipped). Against no history, "
                  "AUC / gAUC: " + "; ".join(f"{n} {a:+.4f} / {g:+.4f}"
                                             for n, (a, g) in gain.items()) + "."]
        if kind == "random":
            lines += ["", "Why the random split leaks: a training row rated after a test row "
                      "holds that test rating - and its liked flag, the test label - in its "
                      "history, and the user's embedding is trained on her later ratings. A "
                      "history is only honest when everything after the row is unseen: the "
                      "time split."]
    return lines


def report(args, argv, result, claims, script):
    lines = ["# Stage 3: the user's behaviour history - pooling, DIN, BST, with gAUC", "",
             f"Models: base (user + candidate), pool (+ mean of the history), din (+ DIN's "
             f"target attention, Dice), bst (+ one transformer layer with recency positions); "
             f"emb {args.emb_dim}, MLP {'-'.join(map(str, args.mlp))} (BatchNorm, ReLU), batch "
             f"{args.batch_size}, AdamW, early stopping on validation AUC (patience "
             f"{args.patience}). gAUC: the AUC within each user, weighted by her impressions "
             "(behaviour.gauc)."]
    if "files" in result:
        lines += ["", f"## {args.train} / {args.val} / {args.test}", "",
                  "rows " + ", ".join(f"{k} {v:,}" for k, v in result["files_rows"].items())
                  + f"; L = {args.max_lens[0]}; seeds {args.seeds}", ""]
        lines += common.markdown_table(
            ["model", "picked on val", "test AUC", "test gAUC", "test logloss"],
            [row_of(n, m["runs"], None, [", ".join(f"{k} {v:g}" for k, v in
                                                   m["picked"].items())])
             for n, m in result["files"].items()])
    if "synthetic" in result:
        lines += synthetic_lines(args, result["synthetic"], claims)
    prelu = [(where, runs, other) for where, runs, other in [
        ("generated, attention regime", result.get("synthetic", {}).get("attention", {}).get(
            "prelu"), result.get("synthetic", {}).get("attention", {}).get("models", {})),
        (f"MovieLens, {args.split_list[0]} split", result.get("movielens", {}).get("prelu"),
         result.get("movielens", {}).get("splits", {}).get(args.split_list[0], {}))] if runs]
    if prelu:
        lines += ["", "## DIN's activation: Dice vs PReLU (the same picked config)", ""]
        lines += common.markdown_table(["data", "Dice test AUC", "PReLU test AUC", "Dice - PReLU"],
                                       [[w, common.mean_std(test_values(o["din"]["runs"])),
                                         common.mean_std(test_values(r)),
                                         f"{np.mean(test_values(o['din']['runs'])) - np.mean(test_values(r)):+.4f}"]
                                        for w, r, o in prelu])
    if "movielens" in result:
        lines += movielens_lines(args, result["movielens"])
    if result.get("speed"):
        models = result["synthetic"]["attention"]["models"]
        lines += ["", "## Speed (generated attention regime, device "
                  f"{result['device']}, {args.threads} thread(s))", ""]
        lines += common.markdown_table(
            ["model", "training samples/s"] + [f"p50 / p99 ms, batch {b}" for b in (1, 64, 1024)],
            [[n, f"{models[n]['runs'][0]['train_samples_per_s']:,.0f}" if n in models else "-"]
             + [f"{v[0]:.2f} / {v[1]:.2f}" for v in t.values()]
             for n, t in result["speed"].items()])
    lines += ["", f"Command: `{common.command_line(script, argv)}` "
              f"({result['wall_s'] / 60:.1f} min, device {result['device']}).",
              common.machine_line(result["device"], args.threads)]
    return "\n".join(lines) + "\n"


def plot(result, path):
    """Test AUC per regime and model against the oracle; MovieLens AUC and gAUC per split; DIN's
    weights over one user's history for two candidates."""
    plt = common.pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(12, 7.5))
    ax = axes[0, 0]
    for i, (regime, r) in enumerate(result.get("synthetic", {}).items()):
        names = list(r["models"])
        vals = [test_values(r["models"][n]["runs"]) for n in names]
        xs = i * (len(names) + 1) + np.arange(len(names))
        ax.bar(xs, [np.mean(v) for v in vals], yerr=[np.std(v) for v in vals], capsize=2,
               color=[f"C{k}" for k in range(len(names))])
        ax.hlines(np.mean([m["oracle"]["test_auc"] for m in r["meta"]]), xs[0] - .4,
                  xs[-1] + .4, colors="k", linestyles="--")
        ax.text(xs[0], 0.98, regime, fontsize=9)
    ax.set(ylim=(0.45, 1.0), title="generated users: test AUC (dashed: oracle)",
           xticks=[], xlabel=" / ".join(next(iter(result.get("synthetic", {"": {"models": {}}})
                                                  .values()))["models"]))
    ax = axes[0, 1]
    for i, (kind, models) in enumerate(result.get("movielens", {}).get("splits", {}).items()):
        names = list(models)
        for j, metric in enumerate(["auc", "gauc"]):
            vals = [np.mean(test_values(models[n]["runs"], metric)) for n in names]
            ax.plot(names, vals, "o-" if j == 0 else "s--", label=f"{kind} {metric}")
    ax.set(title="MovieLens-100k: test AUC and gAUC")
    if result.get("movielens"):
        ax.legend(fontsize=8)
    example = result.get("attention_example")
    for ax, cand in zip(axes[1], (example or {}).get("candidates", [])):
        cats = np.array(example["history_cats"])
        ax.bar(np.arange(len(cats)), cand["weights"],
               color=np.where(cats == cand["cat"], "C3", "C7"))
        ax.set(title=f"DIN weights, user {example['user']}: candidate of category "
               f"#{cand['cat']} (red: same category), clicked {cand['label']}",
               xlabel="past behaviour (oldest -> latest)", ylabel="w_j")
        ax.title.set_fontsize(8)
    fig.tight_layout()
    common.save_figure(fig, path)
