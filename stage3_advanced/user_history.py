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
