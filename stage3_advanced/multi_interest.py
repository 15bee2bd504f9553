"""Synthetic users with several interests, and clicks whose true probability is known (the
oracle): three regimes where target attention must win, where pooling is enough, and where the
order of the history matters. Read it with stage3_advanced/08_user_history.py.

The world: n_cats categories, each with a unit centre mu_c in R^dim; an item of category c has
the unit vector z_i = normalize(mu_c + spread * eps_i). A user has `interests` categories; each
of her past behaviours picks one of them, then an item of it (the history, oldest first, of a
random length in [max_len / 2, max_len]). Each user sees `impressions` candidates: half from
her interests (in the order regime: from her old or her recent ones alike), half from any
category. The click probability is
    p = sigmoid(sharpness * (s - threshold)),  s = how the candidate relates to the history:
    attention: s = max_j <z_t, z_j>          (6 interests: the most relevant past behaviour
                                              decides; the mean over all of them dilutes it)
    pooling:   s = <z_t, mean_j z_j>         (one interest: the mean IS the user's taste)
    order:     s = max_{j recent} <z_t, z_j> (interest drift: the older half of the history
                                              came from 3 old interests, the recent half from 3
                                              new ones - and only the recent half counts)
threshold = the 60% quantile of s, so about 40% of impressions are clicks in every regime.
Train, validation and test hold different users (as the Amazon files' split by user): a user's
id says nothing at test time, her history everything.

meta.json records the oracle's AUC (the true p as the score) and the oracle WITHOUT the
history: the click rate of each candidate item over the training users, the best a model that
sees only the candidate can learn - the gap between the two is what the history is worth.
"""
import numpy as np
import pandas as pd

import common
from stage3_advanced import behaviour

REGIMES = {"attention": dict(interests=6, old_interests=0),
           "pooling": dict(interests=1, old_interests=0),
           "order": dict(interests=3, old_interests=3)}


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def generate(regime, seed, users=(6000, 1000, 2000), impressions=8, max_len=40, n_cats=40,
             items_per_cat=25, dim=16, spread=0.9, sharpness=10.0):
    """{train/val/test: sequence-format rows (DataFrame)}, {split: oracle p}, meta dict."""
    if regime not in REGIMES:
        raise ValueError(f"unknown regime {regime!r}: one of {', '.join(REGIMES)}")
    cfg = REGIMES[regime]
    rng = np.random.default_rng(seed)
    centres = unit(rng.normal(size=(n_cats, dim)))
    item_cat = np.repeat(np.arange(n_cats), items_per_cat)
    z = unit(centres[item_cat] + spread * rng.normal(size=(len(item_cat), dim)) / np.sqrt(dim))
    n_users = sum(users)
    k_new, k_old = cfg["interests"], cfg["old_interests"]
    # each user's interests: k_old + k_new distinct categories (old ones first)
    interests = np.argsort(rng.random((n_users, n_cats)), axis=1)[:, :k_old + k_new]
    length = rng.integers(max_len // 2, max_len + 1, n_users)
    slot = np.arange(max_len)
    recent = slot[None, :] >= (length // 2)[:, None] if k_old else np.ones((n_users, max_len),
                                                                            bool)
    pick = rng.integers(0, k_new, (n_users, max_len)) + np.where(recent, k_old, 0)
    if k_old:  # the older half draws from the old interests only
        pick = np.where(recent, pick, rng.integers(0, k_old, (n_users, max_len)))
    hist_cat = np.take_along_axis(interests, pick, axis=1)
    hist_item = hist_cat * items_per_cat + rng.integers(0, items_per_cat, (n_users, max_len))
    filled = slot[None, :] < length[:, None]

    # candidates: half from the user's interests (old or new), half from any category
    user = np.repeat(np.arange(n_users), impressions)
    own = rng.random(len(user)) < 0.5
    cand_cat = np.where(own, interests[user, rng.integers(0, k_old + k_new, len(user))],
                        rng.integers(0, n_cats, len(user)))
    cand = cand_cat * items_per_cat + rng.integers(0, items_per_cat, len(user))
    sim = np.einsum("nd,nld->nl", z[cand], z[hist_item[user]])  # (rows, max_len)
    counts = filled[user] & (recent[user] if regime == "order" else True)
    if regime == "pooling":
        mean = unit((z[hist_item] * filled[..., None]).sum(1))
        s = np.einsum("nd,nd->n", z[cand], mean[user])
    else:
        s = np.where(counts, sim, -np.inf).max(1)
    threshold = np.quantile(s, 0.6)
    p = 1 / (1 + np.exp(-sharpness * (s - threshold)))
    label = (rng.random(len(p)) < p).astype(int)

    part = np.repeat(np.arange(3), users)[user]  # users 0.. train, then val, then test
    out, oracle = {}, {}
    for k, name in enumerate(["train", "val", "test"]):
        r = np.flatnonzero(part == k)
        hist = [list(hist_item[u, :n]) for u, n in zip(user[r], length[user[r]])]
        out[name] = pd.DataFrame({
            "label": label[r], "user": user[r], "item": cand[r], "cat": cand_cat[r],
            "hist_item": hist, "hist_cat": [[i // items_per_cat for i in h] for h in hist]})
        oracle[name] = p[r]
    meta = dict(regime=regime, seed=seed, users=list(users), impressions=impressions,
                max_len=max_len, n_cats=n_cats, items_per_cat=items_per_cat, dim=dim,
                spread=spread, sharpness=sharpness, **cfg, click_rate=float(label.mean()))
    meta.update(oracle_metrics(out, oracle))
    return out, oracle, meta


def oracle_metrics(rows, oracle):
    """The oracle's test AUC / log loss / gAUC, and the oracle without the history: each
    candidate item's mean true p over the training impressions (unseen items: the mean p)."""
    test = rows["test"]
    y = test["label"].to_numpy()
    train_p = pd.Series(oracle["train"]).groupby(rows["train"]["item"].to_numpy()).mean()
    no_hist = test["item"].map(train_p).fillna(oracle["train"].mean()).to_numpy()
    out = {}
    for name, p in [("oracle", oracle["test"]), ("oracle_without_history", no_hist)]:
        m = common.auc_logloss(y, p)
        out[name] = dict(test_auc=m["auc"], test_logloss=m["logloss"],
                         test_gauc=behaviour.gauc(test["user"].to_numpy(), y, p)["gauc"])
    return out
