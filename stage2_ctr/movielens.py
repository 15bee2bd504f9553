"""MovieLens-100k as a click task: the files, read into one frame, and the arrays the Stage 2
models take (FieldSchema: no dense field, 7 id fields in one offset table, one bag of genres).
Read it with stage2_ctr/05_movielens.py, the chapter that trains on it.

Where the files come from: MovieLens-100k (943 users, 1,682 movies, 100,000 ratings) ships inside
the `recbole==1.2.1` wheel on PyPI as three tab-separated files with typed headers
(`ml-100k.inter`, `.user`, `.item`). fetch() downloads the wheel with
`pip download --no-deps recbole==1.2.1` (recbole itself is never installed) and extracts the
three files; the licence of the data does not allow redistribution, so they are not committed.
A user with GroupLens's own `ml-100k.zip` can point --data-dir at its folder (`u.data`, `u.user`,
`u.item`: '|'-separated, latin-1 titles, 19 genre flags): both layouts read into the same frame.

The task (the AutoInt protocol): ratings of 3 are dropped, label = rating >= 4 (72,855 rows, 76%
positive). Fields: user_id, item_id, age, gender, occupation, zip_code, release_year (ids) and
genres (a bag of 1-6 genre ids per movie). Real-data quirks kept: movie 267 has the title and
release year "unkonwn" and the genre "unknown" (its year becomes the "unknown" value).

Damaged files are not trained on: a line with the wrong number of fields, a rating outside 1-5,
a timestamp that is not a number, a rating whose user or item has no line in its file, a recbole
file without its typed header, a file with no rows - each is one line naming file:line (and how
many more there are), with the command that fetches a fresh copy. Repeated lines have one rule:
one line per user id, per item id and per (user, item) rating - the first is kept, the repeats
are dropped, counted and reported.
"""
import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd

import common

DATA_DIR = Path(__file__).resolve().parent / "data" / "ml-100k"
RECBOLE = "recbole==1.2.1"
FILES = {"inter": "ml-100k.inter", "user": "ml-100k.user", "item": "ml-100k.item"}
GROUPLENS = {"inter": "u.data", "user": "u.user", "item": "u.item"}
MD5 = {"ml-100k.inter": "a8a8c3f165aedc53f63b5dc0a0463b14",
       "ml-100k.user": "ac50ecbab626dbefa83288a3593f92ab",
       "ml-100k.item": "fb748e97e64d9a35421d06d7083d0959"}
FETCH = "python stage2_ctr/05_movielens.py --fetch"
GENRES = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
          "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
          "Romance", "Sci-Fi", "Thriller", "War", "Western"]
ID_FIELDS = ["user_id", "item_id", "age", "gender", "occupation", "zip_code", "release_year"]
MAX_GENRES = 6


class MovieLensError(ValueError):
    """A missing or damaged file: the message is one line naming it and what to do."""


# ------------------------------------------------------------------------------ the files
def fetch(folder=DATA_DIR):
    """Download the recbole wheel (no dependencies, nothing installed) and extract the three
    MovieLens-100k files into `folder`. Returns the folder."""
    folder = Path(folder)
    with tempfile.TemporaryDirectory(prefix="recbole_wheel_") as tmp:
        print(f"fetching MovieLens-100k: pip download --no-deps {RECBOLE} (the data ships in "
              f"that wheel; recbole is not installed) -> {folder}")
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q",
                               "-d", tmp, RECBOLE], capture_output=True, text=True)
        wheels = list(Path(tmp).glob("recbole-*.whl"))
        if done.returncode or not wheels:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1][-200:]
            raise MovieLensError(f"pip download {RECBOLE} failed ({last}); put "
                                 f"ml-100k.inter/.user/.item into {folder} by hand")
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with zipfile.ZipFile(wheels[0]) as wheel:
                for name in FILES.values():
                    with wheel.open(f"recbole/dataset_example/ml-100k/{name}") as src, \
                            open(folder / (name + ".tmp"), "wb") as dst:
                        shutil.copyfileobj(src, dst)
                    (folder / (name + ".tmp")).replace(folder / name)
        except OSError as e:
            raise MovieLensError(f"{common.output_problem(folder, e)} (the data folder: "
                                 "choose another --data-dir)") from None
    return folder


def layout(folder):
    """'recbole' or 'grouplens' by the files present; MovieLensError when neither is complete."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise MovieLensError(f"{folder}: is a file, not a folder; --data-dir names the folder "
                             "that holds ml-100k.inter/.user/.item (or u.data/u.user/u.item)")
    for name, files in [("recbole", FILES), ("grouplens", GROUPLENS)]:
        if all((folder / f).is_file() for f in files.values()):
            return name
    missing = [f for f in FILES.values() if not (folder / f).is_file()]
    raise MovieLensError(f"{folder / missing[0]}: not found (neither the recbole files nor "
                         f"GroupLens's u.data/u.user/u.item are there); run `{FETCH}`")


def md5_warnings(folder):
    out = []
    for name, expected in MD5.items():
        path = Path(folder) / name
        if path.is_file() and hashlib.md5(path.read_bytes()).hexdigest() != expected:
            out.append(f"warning: {path} differs from the file in {RECBOLE} (md5); results may "
                       f"not match the README - run `{FETCH}` for a fresh copy")
    return out


def read_table(path, sep, names, encoding="utf-8", header=None):
    """A delimited file as strings plus `line` (its 1-based line number), every row checked to
    have len(names) fields. header: the field names of recbole's typed header line
    (`user_id:token ...`), which must be line 1 and is dropped - a file without it would
    otherwise lose its first real row."""
    path = Path(path)
    try:
        text = path.read_text(encoding=encoding)
    except UnicodeDecodeError as e:
        raise MovieLensError(f"{path}: not {encoding} text ({e.reason}); run `{FETCH}`") from None
    except OSError as e:
        raise MovieLensError(f"{path}: cannot read it ({e.strerror}); check its permissions or "
                             f"run `{FETCH}`") from None
    lines = text.replace("\r\n", "\n").split("\n")
    if lines and lines[-1] == "":
        lines = lines[:-1]
    first = 1
    if header is not None and lines:
        got = [f.split(":")[0] for f in lines[0].split(sep)]
        if got != header:
            raise MovieLensError(
                f"{path}:1: recbole's layout starts with the typed header "
                f"{sep.join(h + ':...' for h in header)!r}, this file with "
                f"{lines[0][:40]!r}: without it the first real row "
                f"would be read as the header; run `{FETCH}` (GroupLens's files without "
                "headers are u.data/u.user/u.item)")
        lines, first = lines[1:], 2
    if not lines:
        raise MovieLensError(f"{path}: no data rows (empty{' or header only' if header else ''}"
                             f"); run `{FETCH}`")
    rows = [line.split(sep) for line in lines]
    for i, r in enumerate(rows):
        if len(r) != len(names):
            raise MovieLensError(f"{path}:{i + first}: {len(r)} fields, expected {len(names)} "
                                 f"({', '.join(names)}): truncated or damaged; run `{FETCH}`")
    return pd.DataFrame(rows, columns=names).assign(line=np.arange(first, first + len(rows)))


def parse_ratings(inter, path):
    """rating (1-5) and timestamp (a finite number) parsed; a line with either unreadable is a
    bad row: the first is named with its line, the rest counted (a damaged file is fetched
    again, not trained on - a NaN timestamp would sort into the time split's test part)."""
    rating = pd.to_numeric(inter["rating"], errors="coerce")
    stamp = pd.to_numeric(inter["timestamp"], errors="coerce")
    why = pd.Series("", index=inter.index)
    bad = ~rating.isin([1, 2, 3, 4, 5])
    why[bad] = "rating " + inter.loc[bad, "rating"].map(repr) + " is not 1-5"
    bad = ~np.isfinite(stamp.astype(np.float64)) & (why == "")
    why[bad] = "timestamp " + inter.loc[bad, "timestamp"].map(repr) + " is not a number"
    bad = why != ""
    if bad.any():
        n, line = int(bad.sum()), int(inter.loc[bad, "line"].iloc[0])
        raise MovieLensError(f"{path}:{line}: {why[bad].iloc[0]}"
                             + (f" (and {n - 1} more bad lines)" if n > 1 else "")
                             + f"; run `{FETCH}`")
    return inter.assign(rating=rating.astype(int), timestamp=stamp)


def first_of_each(table, key, path, what, say):
    """The rule for repeated lines: one line per key (a user id, an item id, a (user, item)
    rating) - the first is kept, the repeats are dropped, counted and reported (with how many
    of them disagree with the line kept)."""
    repeat = table.duplicated(key, keep="first")
    if not repeat.any():
        return table
    same = table.drop(columns="line").duplicated(keep="first") & repeat
    r = table[repeat].iloc[0]
    shown = " ".join(f"{k} {r[k]}" for k in (key if isinstance(key, list) else [key]))
    say(f"{path}: {int(repeat.sum())} repeated {what} line(s) dropped (one line per {what}, the "
        f"first kept; {int((repeat & ~same).sum())} of the repeats disagree with it; first: "
        f"line {r['line']}, {shown})")
    return table[~repeat]


def check_known(inter, table, key, inter_path, table_path):
    """Every rating's user (item) must have its line in the user (item) file."""
    unknown = ~inter[key].isin(table[key])
    if unknown.any():
        r = inter[unknown].iloc[0]
        raise MovieLensError(f"{inter_path}:{r['line']}: {key} {r[key]} is not in {table_path} "
                             f"({int(unknown.sum())} ratings of {inter.loc[unknown, key].nunique()}"
                             f" id(s) missing there): the files do not belong together; run "
                             f"`{FETCH}`")


def read_frame(folder=DATA_DIR, say=print):
    """One row per rating: user_id, item_id, rating, timestamp, age, gender, occupation,
    zip_code, release_year (strings) and genres (a tuple of genre names), in file order.
    Repeated lines are dropped by first_of_each's rule and reported through `say`."""
    folder = Path(folder)
    kind = layout(folder)
    paths = {k: folder / (FILES if kind == "recbole" else GROUPLENS)[k] for k in FILES}
    inter_cols = ["user_id", "item_id", "rating", "timestamp"]
    user_cols = ["user_id", "age", "gender", "occupation", "zip_code"]
    if kind == "recbole":
        inter = read_table(paths["inter"], "\t", inter_cols, header=inter_cols)
        user = read_table(paths["user"], "\t", user_cols, header=user_cols)
        item = read_table(paths["item"], "\t", ["item_id", "title", "release_year", "genres"],
                          header=["item_id", "movie_title", "release_year", "class"])
        item["genres"] = item["genres"].str.split(" ").map(tuple)
    else:
        inter = read_table(paths["inter"], "\t", inter_cols)
        user = read_table(paths["user"], "|", user_cols)
        item = read_table(paths["item"], "|", ["item_id", "title", "date", "video", "url"]
                          + GENRES, encoding="latin-1")
        item["release_year"] = item["date"].str[-4:].where(item["date"] != "", "unkonwn")
        flags = item[GENRES].to_numpy() == "1"
        item["genres"] = [tuple(g for g, on in zip(GENRES, row) if on) for row in flags]
    inter = parse_ratings(inter, paths["inter"])
    user = first_of_each(user, "user_id", paths["user"], "user id", say)
    item = first_of_each(item[["item_id", "release_year", "genres", "line"]], "item_id",
                         paths["item"], "item id", say)
    inter = first_of_each(inter, ["user_id", "item_id"], paths["inter"], "rating", say)
    check_known(inter, user, "user_id", paths["inter"], paths["user"])
    check_known(inter, item, "item_id", paths["inter"], paths["item"])
    frame = inter.drop(columns="line").merge(user.drop(columns="line"), on="user_id",
                                             how="left", validate="many_to_one").merge(
        item.drop(columns="line"), on="item_id", how="left", validate="many_to_one")
    return frame.reset_index(drop=True)


# -------------------------------------------------------------------------- task and splits
def click_task(frame):
    """The AutoInt protocol: rating 3 dropped, label = rating >= 4. Both labels must occur."""
    kept = frame[frame["rating"] != 3].reset_index(drop=True)
    pos = int((kept["rating"] >= 4).sum())
    if pos == 0 or pos == len(kept):
        raise MovieLensError(f"the ratings hold {pos:,} of 4-5 and {len(kept) - pos:,} of 1-2 "
                             "(3s dropped): a click task needs both labels; is this "
                             f"MovieLens? run `{FETCH}`")
    return kept.assign(label=(kept["rating"] >= 4).astype(np.float32))


def split(frame, how="random", seed=0):
    """{'train', 'val', 'test'} row indices: random 8:1:1 with a seed, or by time (sorted by
    timestamp: the last 10% test, the 10% before validation)."""
    n = len(frame)
    if how == "random":
        order = np.random.default_rng(seed).permutation(n)
    else:
        order = np.argsort(frame["timestamp"].to_numpy(), kind="stable")
    a, b = int(n * 0.8), int(n * 0.9)
    return {"train": order[:a], "val": order[a:b], "test": order[b:]}


def encode(frame, splits):
    """Arrays for the models: sparse int64 (N, 7 + MAX_GENRES) ids into one table - each field
    has its own offset, index 0 of a field = a value not seen in train - with the genre slots
    padded with -1, and the FieldSchema that describes them. Vocabularies from train only."""
    from stage2_ctr.models import FieldSchema
    train = frame.iloc[splits["train"]]
    columns, offset, vocab = [], 0, {}
    for field in ID_FIELDS:
        values = sorted(train[field].unique())
        vocab[field] = {v: i + 1 for i, v in enumerate(values)}
        columns.append(frame[field].map(vocab[field]).fillna(0).to_numpy(np.int64) + offset)
        offset += len(values) + 1
    genre_ids = {g: offset + 1 + i for i, g in enumerate(GENRES)}  # genres: fixed vocabulary
    codes, uniques = pd.factorize(frame["genres"])  # the distinct genre tuples, mapped once
    table = np.full((len(uniques), MAX_GENRES), -1, np.int64)
    for k, genres in enumerate(uniques):
        ids = [genre_ids.get(g, offset) for g in genres][:MAX_GENRES]
        table[k, :len(ids)] = ids
    bags = table[codes]
    offset += len(GENRES) + 1
    sparse = np.concatenate([np.stack(columns, 1), bags], axis=1)
    schema = FieldSchema(n_dense=0, n_sparse=len(ID_FIELDS), n_buckets=offset,
                         bags=(MAX_GENRES,))
    sizes = {f: len(v) + 1 for f, v in vocab.items()} | {"genres": len(GENRES) + 1}
    return sparse, frame["label"].to_numpy(np.float32), schema, sizes



def hash_ids(sparse_by_split, n_buckets, bits, seed=0):
    """The hash trick on top of the exact vocabulary: every row of the shared table (each field's
    values and OOV rows, the genres) goes to one of 2^bits buckets drawn at random - what hashing
    the (field, value) strings would do, without the strings; genre padding (-1) stays padding.
    Returns {split: hashed ids} and the share of the distinct ids of the train split whose bucket
    also holds another of them (a value that collides, as train_stats.collision_report counts)."""
    bucket_of = np.random.default_rng(seed).integers(0, 2 ** bits, size=n_buckets)
    hashed = {name: np.where(ids >= 0, bucket_of[np.maximum(ids, 0)], -1)
              for name, ids in sparse_by_split.items()}
    seen = np.unique(sparse_by_split["train"][sparse_by_split["train"] >= 0])
    per_bucket = np.bincount(bucket_of[seen], minlength=2 ** bits)
    return hashed, float((per_bucket[bucket_of[seen]] > 1).mean())


def hashed_split(data, schema, bits):
    """A split's {part: (inputs, y)} with hash_ids applied, its schema of 2^bits rows and the
    share of colliding train values."""
    import dataclasses

    import torch
    ids, share = hash_ids({s: x["sparse"].numpy() for s, (x, _) in data.items()},
                          schema.n_buckets, bits)
    parts = {s: ({"dense": x["dense"], "sparse": torch.from_numpy(ids[s])}, y)
             for s, (x, y) in data.items()}
    return parts, dataclasses.replace(schema, n_buckets=2 ** bits), share


def hashing_report(models, seeds, n_values, rows, exact, command, machine):
    """05_movielens.py --hashing's table: rows [bits, table rows, collision share, AUC per
    model] after the exact ids' AUCs."""
    lines = ["# Stage 2: what the hash trick costs on MovieLens-100k", "",
             "The random split; each model's learning rate, weight decay and dropout picked on "
             f"validation on the exact ids (seed {seeds[0]}), then the same config with every "
             f"id of the shared table ({n_values:,} rows: the fields' values, their OOV rows "
             "and the genres) sent to a random one of 2^bits buckets, as hashing the (field, "
             "value) strings would. Test AUC, mean ± std over seeds "
             f"{', '.join(map(str, seeds))}.", ""]
    table = [["exact (no hashing)", f"{n_values:,}", "0.00%"] + exact]
    table += [[bits, f"{size:,}", f"{share:.2%}"] + aucs for bits, size, share, *aucs in rows]
    lines += common.markdown_table(["hash bits", "table rows", "train values sharing a bucket"]
                                   + [f"{m} test AUC" for m in models], table)
    return "\n".join(lines + ["", command, machine]) + "\n"
