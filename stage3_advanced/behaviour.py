"""User-behaviour data in the DIN/DIEN sequence format: reading, writing, encoding, gAUC, and
MovieLens-100k's ratings turned into time-ordered histories. Read it with
stage3_advanced/08_user_history.py.

The format (the DIN/DIEN reference code's Amazon files, e.g. local_train_splitByUser): one
impression per line, tab-separated
    label  user  item  category  item_history  category_history  [side_history]
label 0/1; the histories list the user's earlier behaviours, oldest first, their ids joined by
the byte \\x02 (an empty field = no history). An optional 7th column is a side sequence of the
same length (here: MovieLens's liked flag, 0/1, of each past rating). A file downloaded from
the Amazon Books/Electronics releases runs unchanged.

Bad lines (a wrong number of fields, a label that is not 0/1, an empty id, histories of unequal
length) are skipped and counted; the first is named as file:line with what is wrong. More than
1% bad lines is an error: that file is not this format. Vocabularies come from the training file
only: row 0 of every table is padding, row 1 the OOV row that every id unseen in training -
candidate or history - maps to.
"""
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

import common

SEP = "\x02"
COLUMNS = ["label", "user", "item", "cat", "hist_item", "hist_cat", "hist_side"]
MAX_BAD_SHARE = 0.01


class FormatError(ValueError):
    """A file that is not the sequence format: one line naming file:line and what to do."""


# ------------------------------------------------------------------------------- the format
def write_rows(path, rows):
    """rows: a DataFrame with COLUMNS[:6] (+ hist_side), the histories as lists of strings."""
    cols = [c for c in COLUMNS if c in rows]
    text = rows["label"].astype(str)
    for c in cols[1:4]:
        text = text + "\t" + rows[c].astype(str)
    for c in cols[4:]:
        text = text + "\t" + rows[c].map(lambda ids: SEP.join(map(str, ids)))
    common.write_text(path, "\n".join(text) + "\n")


def read_rows(path, say=print, max_bad_share=MAX_BAD_SHARE):
    """A sequence-format file -> DataFrame of strings (COLUMNS[:6], hist_side if the file has a
    7th column, the histories still \\x02-joined) + `line`. Bad lines skipped and reported."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise FormatError(f"{path}: cannot read it as text ({getattr(e, 'strerror', None) or e})"
                          "; check the path (--train/--val/--test)") from None
    lines = pd.Series(text.replace("\r\n", "\n").split("\n"))
    line_no = np.arange(1, len(lines) + 1)
    keep = (lines != "").to_numpy()  # blank lines (the file's last newline) are no rows
    lines, line_no = lines[keep].reset_index(drop=True), line_no[keep]
    if lines.empty:
        raise FormatError(f"{path}: no rows; a sequence file has one impression per line")
    n_fields = lines.str.count("\t").to_numpy() + 1
    width = 7 if (n_fields == 7).sum() > (n_fields == 6).sum() else 6
    why = np.where(n_fields != width, "has " + pd.Series(n_fields).astype(str)
                   + f" tab-separated fields, expected {width}", "")
    parts = lines.where(n_fields == width, "\t".join(["0"] * width)).str.split("\t", expand=True)
    parts.columns = COLUMNS[:width]
    checks = [(~parts["label"].isin(["0", "1"]), "label is not 0 or 1")]
    checks += [(parts[c] == "", f"empty {c} id") for c in ["user", "item", "cat"]]
    n_hist = hist_length(parts["hist_item"])
    for c in COLUMNS[5:width]:
        checks.append((hist_length(parts[c]) != n_hist, f"{c} has another length than "
                       "hist_item"))
    for c in COLUMNS[4:width]:
        checks.append((parts[c].str.contains(SEP + SEP, regex=False)
                       | parts[c].str.startswith(SEP) | parts[c].str.endswith(SEP),
                       f"an empty id in {c}"))
    if width == 7:
        flags = parts["hist_side"].str.replace(SEP, "", regex=False)
        checks.append((flags.str.strip("01") != "", "hist_side holds values other than 0/1"))
    for bad, message in checks:
        why = np.where((why == "") & np.asarray(bad), message, why)
    bad = why != ""
    if bad.any():
        first = int(np.argmax(bad))
        where = f"{path}:{line_no[first]}: {why[first]}"
        if bad.mean() > max_bad_share:
            raise FormatError(f"{where}; {int(bad.sum()):,} of {len(bad):,} lines are bad "
                              f"(over {max_bad_share:.0%}): is this the DIN/DIEN sequence "
                              "format (label, user, item, category, item and category "
                              "history joined by \\x02)?")
        say(f"{path}: {int(bad.sum())} bad line(s) skipped (first: line {line_no[first]}: "
            f"{why[first]})")
    return parts[~bad].assign(line=line_no[~bad]).reset_index(drop=True)


def hist_length(column):
    """Number of ids in each \\x02-joined history (0 for an empty field)."""
    return np.where(column == "", 0, column.str.count(SEP) + 1)


# ------------------------------------------------------------------------------- encoding
@dataclass
class Vocab:
    """The ids seen in the training file, per table (index i -> table row i + 2)."""
    users: pd.Index
    items: pd.Index
    cats: pd.Index
    side: bool

    def lookup(self, index, values):  # unseen -> 1 (OOV), seen -> row >= 2
        rows = index.get_indexer(values)
        return np.where(rows < 0, 1, rows + 2).astype(np.int64)


def flatten(column):
    """All ids of a history column, in order, as one array (one join, one split)."""
    joined = SEP.join(column[column != ""])
    return np.array(joined.split(SEP) if joined else [], dtype=object)


def fit_vocab(rows):
    """Users, items (candidates and history items together) and categories of the train rows."""
    items = pd.Index(pd.unique(np.concatenate([rows["item"].to_numpy(object),
                                               flatten(rows["hist_item"])])))
    cats = pd.Index(pd.unique(np.concatenate([rows["cat"].to_numpy(object),
                                              flatten(rows["hist_cat"])])))
    return Vocab(pd.Index(pd.unique(rows["user"])), items, cats, "hist_side" in rows)


def encode(rows, vocab, max_len):
    """rows -> ({user, item, cat (N,), hist_item, hist_cat[, hist_side] (N, max_len)} int64,
    labels float32 (N,)). Each history keeps its max_len most recent ids, left-aligned
    (oldest kept first), 0-padded; the side values 0/1 become rows 1/2 of their table."""
    n = len(rows)
    out = {"user": vocab.lookup(vocab.users, rows["user"]),
           "item": vocab.lookup(vocab.items, rows["item"]),
           "cat": vocab.lookup(vocab.cats, rows["cat"])}
    length = hist_length(rows["hist_item"])
    kept = np.minimum(length, max_len)
    row = np.repeat(np.arange(n), length)
    k = np.arange(len(row)) - np.repeat(np.cumsum(length) - length, length)  # index in its row
    col = k - np.repeat(length - kept, length)  # the oldest dropped ids get col < 0
    use = col >= 0
    hist = {"hist_item": (vocab.items, "hist_item"), "hist_cat": (vocab.cats, "hist_cat")}
    for name, (index, column) in hist.items():
        grid = np.zeros((n, max_len), np.int64)
        grid[row[use], col[use]] = vocab.lookup(index, flatten(rows[column]))[use]
        out[name] = grid
    if vocab.side:
        grid = np.zeros((n, max_len), np.int64)
        grid[row[use], col[use]] = flatten(rows["hist_side"])[use].astype(np.int64) + 1
        out["hist_side"] = grid
    return out, rows["label"].to_numpy().astype(np.float32)


def schema_of(vocab, max_len):
    from stage2_ctr.models.history import HistorySchema
    return HistorySchema(len(vocab.users) + 2, len(vocab.items) + 2, len(vocab.cats) + 2,
                         max_len, 3 if vocab.side else 0)


# ------------------------------------------------------------------------------------ gAUC
def gauc(users, y, p):
    """Group AUC (the DIN paper's metric): the AUC within each user's rows, averaged with the
    user's number of impressions as weight,  gAUC = sum_u n_u AUC_u / sum_u n_u, over the users
    that have both labels (a user with one class has no AUC: skipped and counted).
    AUC_u = (sum of the positives' ranks - P(P+1)/2) / (P N), ranks within the user, ties
    averaged - the Mann-Whitney form, all users at once. Returns {gauc, users, skipped}."""
    frame = pd.DataFrame({"u": np.asarray(users), "y": np.asarray(y, np.float64),
                          "p": np.asarray(p, np.float64)})
    frame["rank"] = frame.groupby("u")["p"].rank(method="average")
    g = frame.assign(rank_pos=frame["rank"] * frame["y"]).groupby("u").agg(
        n=("y", "size"), pos=("y", "sum"), rank_pos=("rank_pos", "sum"))
    neg = g["n"] - g["pos"]
    both = (g["pos"] > 0) & (neg > 0)
    g = g[both]
    auc = (g["rank_pos"] - g["pos"] * (g["pos"] + 1) / 2) / (g["pos"] * neg[both])
    value = float((auc * g["n"]).sum() / g["n"].sum()) if len(g) else float("nan")
    return {"gauc": value, "users": int(both.sum()), "skipped": int((~both).sum())}


# ------------------------------------------------------------------- MovieLens as histories
def movielens_histories(task, max_len):
    """(N, max_len) row indices of each rating's history: the same user's last max_len
    ratings with a STRICTLY earlier timestamp (oldest first, -1 = padding). Ratings of the same
    second are not each other's history: one of them cannot have been seen before the other.
    Vectorized: sorted by (user, time), row i's history is the slice [max(start of its
    user, first - max_len), first) where `first` is the first row of its (user, second)."""
    user = task["user_id"].to_numpy()
    stamp = task["timestamp"].to_numpy()
    order = np.lexsort((stamp, user))
    u, s = user[order], stamp[order]
    pos = np.arange(len(order))
    new_user = np.r_[True, u[1:] != u[:-1]]
    new_second = new_user | np.r_[True, s[1:] != s[:-1]]
    user_start = np.maximum.accumulate(np.where(new_user, pos, 0))
    first = np.maximum.accumulate(np.where(new_second, pos, 0))
    cols = first[:, None] - max_len + np.arange(max_len)  # sorted positions of the history
    valid = cols >= user_start[:, None]
    idx = np.full((len(order), max_len), -1, np.int64)
    idx[order] = np.where(valid, order[np.clip(cols, 0, None)], -1)
    return idx


def movielens_rows(task, hist_idx):
    """MovieLens's click task as sequence-format rows: category = the movie's genres joined by
    '|', the side sequence = whether each past rating was a like (>= 4)."""
    items = task["item_id"].astype(str).to_numpy()
    cats = task["genres"].map("|".join).to_numpy()
    liked = task["label"].astype(int).astype(str).to_numpy()
    lists = {name: [list(values[r[r >= 0]]) for r in hist_idx]
             for name, values in [("hist_item", items), ("hist_cat", cats),
                                  ("hist_side", liked)]}
    return pd.DataFrame({"label": task["label"].astype(int), "user": task["user_id"],
                         "item": items, "cat": cats, **lists})
