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
            raise MovieLensError(f"pip download {RECBOLE} failed ({done.stderr.strip()[-200:]});"
                                 f" put ml-100k.inter/.user/.item into {folder} by hand")
        folder.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheels[0]) as wheel:
            for name in FILES.values():
                with wheel.open(f"recbole/dataset_example/ml-100k/{name}") as src, \
                        open(folder / (name + ".tmp"), "wb") as dst:
                    shutil.copyfileobj(src, dst)
                (folder / (name + ".tmp")).replace(folder / name)
    return folder


def layout(folder):
    """'recbole' or 'grouplens' by the files present; MovieLensError when neither is complete."""
    folder = Path(folder)
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


def read_table(path, sep, names, encoding="utf-8"):
    """A delimited file as strings, every row checked to have len(names) fields."""
    try:
        text = Path(path).read_text(encoding=encoding)
    except UnicodeDecodeError as e:
        raise MovieLensError(f"{path}: not {encoding} text ({e.reason}); run `{FETCH}`") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines = lines[:-1]
    rows = [line.split(sep) for line in lines]
    for i, r in enumerate(rows):
        if len(r) != len(names):
            raise MovieLensError(f"{path}:{i + 1}: {len(r)} fields, expected {len(names)} "
                                 f"({', '.join(names)}): truncated or damaged; run `{FETCH}`")
    return pd.DataFrame(rows, columns=names)


def read_frame(folder=DATA_DIR):
    """One row per rating: user_id, item_id, rating, timestamp, age, gender, occupation,
    zip_code, release_year (strings) and genres (a tuple of genre names), in file order."""
    folder = Path(folder)
    if layout(folder) == "recbole":
        inter = read_table(folder / FILES["inter"], "\t", ["user_id", "item_id", "rating",
                                                           "timestamp"]).iloc[1:]
        user = read_table(folder / FILES["user"], "\t", ["user_id", "age", "gender",
                                                         "occupation", "zip_code"]).iloc[1:]
        item = read_table(folder / FILES["item"], "\t", ["item_id", "title", "release_year",
                                                         "genres"]).iloc[1:]
        item["genres"] = item["genres"].str.split(" ").map(tuple)
        header = 2  # line numbers in messages: the typed header is line 1
    else:
        inter = read_table(folder / GROUPLENS["inter"], "\t", ["user_id", "item_id", "rating",
                                                               "timestamp"])
        user = read_table(folder / GROUPLENS["user"], "|", ["user_id", "age", "gender",
                                                            "occupation", "zip_code"])
        item = read_table(folder / GROUPLENS["item"], "|", ["item_id", "title", "date",
                                                            "video", "url"] + GENRES,
                          encoding="latin-1")
        item["release_year"] = item["date"].str[-4:].where(item["date"] != "", "unkonwn")
        flags = item[GENRES].to_numpy() == "1"
        item["genres"] = [tuple(g for g, on in zip(GENRES, row) if on) for row in flags]
        header = 1
    rating = pd.to_numeric(inter["rating"], errors="coerce")
    bad = rating.isna() | ~np.isfinite(rating.fillna(0)) | ~rating.isin([1, 2, 3, 4, 5])
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise MovieLensError(f"{folder / (FILES if header == 2 else GROUPLENS)['inter']}:"
                             f"{i + header}: rating {inter['rating'].iloc[i]!r} is not 1-5; run "
                             f"`{FETCH}`")
    inter = inter.assign(rating=rating.astype(int),
                         timestamp=pd.to_numeric(inter["timestamp"], errors="coerce"))
    frame = inter.merge(user, on="user_id", how="left").merge(
        item[["item_id", "release_year", "genres"]], on="item_id", how="left")
    for col in ["age", "release_year"]:
        frame[col] = frame[col].fillna("unknown")
    frame["genres"] = frame["genres"].map(lambda g: g if isinstance(g, tuple) else ("unknown",))
    return frame.reset_index(drop=True)


# -------------------------------------------------------------------------- task and splits
def click_task(frame):
    """The AutoInt protocol: rating 3 dropped, label = rating >= 4."""
    kept = frame[frame["rating"] != 3].reset_index(drop=True)
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
