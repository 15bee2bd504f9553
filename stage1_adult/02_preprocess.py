"""Stage 1, step 2: turn the raw Adult text into model-ready arrays (adult_stage1.npz).

What you learn here: a leak-free train/val/test split; statistics and vocabularies fitted on train
only; categorical -> index with 0 kept for OOV (rare or unseen values); three ways to hand a
numeric column to a neural net (standardized value, quantile-bin index + position inside the bin,
exact-value token); and why a label derived from the features (married <- marital-status) must
not see the columns it was derived from.

Run:    python stage1_adult/02_preprocess.py [--keep-leaky] [--val-frac 0.15] [--seed 0]
Writes: stage1_adult/adult_stage1.npz + adult_stage1_meta.json
        (with --keep-leaky: adult_stage1_leaky.npz + adult_stage1_leaky_meta.json)

Arrays in the npz, for each split in (train, val, test); N rows each:
  x_num_<split>      float32 (N, 6)  numerics, log1p on capital-*, standardized with train stats
  x_bin_<split>      int64   (N, 6)  quantile-bin index per numeric (edges from train)
  x_binfrac_<split>  float32 (N, 6)  where the value sits inside its bin, in [0, 1]
                                     (bin + frac = the piecewise-linear encoding)
  x_tok_<split>      int64   (N, 2)  exact-value token of capital-gain, capital-loss (0 = rare)
  x_cat_<split>      int64   (N, C)  categorical index per field, 0 = OOV (rare or unseen)
  y_income_<split>   float32 (N,)    task A: income >50K
  y_married_<split>  float32 (N,)    task B: married (derived from marital-status)
"""
import argparse
import sys
from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: plain imports
from stage1_adult.adult_data import (CATEGORICAL, DATA_DIR, LEAKY, NUMERIC, DataError,  # noqa: E402
                        add_labels, load_both)
import common  # noqa: E402

HERE = Path(__file__).resolve().parent
SCHEMA_VERSION = 1
LOG1P = ["capital-gain", "capital-loss"]  # heavy-tailed: 0 for ~90% of rows, up to 99,999
TOKEN_COLUMNS = ["capital-gain", "capital-loss"]  # a few exact values act like rules


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default=str(DATA_DIR), help="folder with adult.data/adult.test")
    p.add_argument("--out", default=None,
                   help="output .npz (default stage1_adult/adult_stage1[_leaky].npz)")
    p.add_argument("--val-frac", type=float, default=0.15,
                   help="share of adult.data held out for validation (stratified on income)")
    p.add_argument("--min-count", type=int, default=10,
                   help="categories seen fewer times in train map to OOV (index 0)")
    p.add_argument("--n-bins", type=int, default=32, help="quantile bins per numeric column")
    p.add_argument("--keep-leaky", action="store_true",
                   help="keep marital-status and relationship as inputs (leaks task B)")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val split")
    p.add_argument("--max-bad-fraction", type=float, default=0.01,
                   help="stop with an error when more rows than this are malformed")
    args = p.parse_args(argv)
    if not 0 < args.val_frac < 0.5:
        p.error("--val-frac must be in (0, 0.5)")
    if args.min_count < 1 or args.n_bins < 2:
        p.error("--min-count must be >= 1 and --n-bins >= 2")
    return args


# ---------------------------------------------------------------------------- numeric encodings
def fit_numeric(train):
    """Per-column mean/std after the log1p of the heavy-tailed columns (train rows only)."""
    stats = {}
    for col in NUMERIC:
        x = np.log1p(train[col].to_numpy()) if col in LOG1P else train[col].to_numpy()
        stats[col] = {"log1p": col in LOG1P, "mean": float(x.mean()), "std": float(x.std() + 1e-8)}
    return stats


def standardize(df, stats):
    cols = []
    for col in NUMERIC:
        x = df[col].to_numpy()
        x = np.log1p(x) if stats[col]["log1p"] else x
        cols.append((x - stats[col]["mean"]) / stats[col]["std"])
    return np.stack(cols, axis=1).astype(np.float32)


def fit_bin_edges(train, n_bins):
    """Quantile edges per column. Repeated quantiles (discrete columns) collapse, so a column
    gets at most n_bins bins; capital-* is ~90% zeros, so its edges are quantiles of the
    non-zero values with 0 as the first edge (else all its quantiles would be 0)."""
    edges = {}
    for col in NUMERIC:
        x = train[col].to_numpy()
        if col in LOG1P:  # mostly zeros: bin the non-zero values, keep 0 as its own edge
            x = np.concatenate([[0.0], x[x > 0]])
        q = np.unique(np.quantile(x, np.linspace(0, 1, n_bins + 1)))
        if len(q) < 2:
            q = np.array([q[0], q[0] + 1.0])
        edges[col] = q.tolist()
    return edges


def bin_and_frac(df, edges):
    """Bin index b (0 .. len(edges)-2) and frac = (x - lo_b) / (hi_b - lo_b) clipped to [0, 1].
    The piecewise-linear encoding of x is then [1]*b + [frac] + [0]*(rest)."""
    bins, fracs = [], []
    for col in NUMERIC:
        x, e = df[col].to_numpy(), np.asarray(edges[col])
        b = np.clip(np.searchsorted(e, x, side="right") - 1, 0, len(e) - 2)
        lo, hi = e[b], e[b + 1]
        fracs.append(np.clip((x - lo) / np.maximum(hi - lo, 1e-12), 0.0, 1.0))
        bins.append(b)
    return np.stack(bins, 1).astype(np.int64), np.stack(fracs, 1).astype(np.float32)


# ------------------------------------------------------------------------------ vocabularies
def fit_vocab(values, min_count):
    """value -> index 1..V for values seen >= min_count times in train; 0 is OOV."""
    counts = values.value_counts()
    kept = sorted(counts[counts >= min_count].index.tolist(), key=str)
    return {str(v): i + 1 for i, v in enumerate(kept)}


def apply_vocab(values, vocab):
    # map() is vectorized in pandas; anything not in the vocabulary (rare, unseen) becomes 0
    return values.astype(str).map(vocab).fillna(0).to_numpy(np.int64)


def fmt_num(v):
    return str(int(v)) if float(v).is_integer() else str(v)


# ---------------------------------------------------------------------------------- writing
def save_npz(path, arrays):
    """np.savez into a file object (a file name would get .npz appended), atomically."""
    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    common.atomic_write(path, write)


def encode_split(df, cat_cols, num_stats, edges, vocabs, token_vocabs):
    """One split's arrays (every numeric three ways, categoricals as indices) and its OOV rate
    per categorical column, with the statistics and vocabularies fitted on train."""
    x_bin, x_binfrac = bin_and_frac(df, edges)
    x_cat = np.stack([apply_vocab(df[c], vocabs[c]) for c in cat_cols], 1)
    arrays = {"x_num": standardize(df, num_stats), "x_bin": x_bin, "x_binfrac": x_binfrac,
              "x_tok": np.stack([apply_vocab(df[c].map(fmt_num), token_vocabs[c])
                                 for c in TOKEN_COLUMNS], 1),
              "x_cat": x_cat, "y_income": df["y_income"].to_numpy(np.float32),
              "y_married": df["y_married"].to_numpy(np.float32)}
    return arrays, {c: float((x_cat[:, i] == 0).mean()) for i, c in enumerate(cat_cols)}


def report(args, splits, meta, out, meta_path):
    print(f"split (seed {args.seed}): " + ", ".join(f"{k} {len(v):,}" for k, v in splits.items()))
    print("numerics: log1p on " + ", ".join(LOG1P) + "; standardized with train mean/std; "
          + "bins per column: " + ", ".join(f"{c} {meta['n_bins'][c]}" for c in NUMERIC))
    print("categoricals: " + ", ".join(f"{c} {meta['cardinalities'][c]}"
                                       for c in meta["categorical_columns"])
          + f" (index 0 = OOV, min count {args.min_count})")
    print(f"dropped (leak of task B): {meta['dropped_columns'] or 'none (--keep-leaky)'}")
    test_oov = {c: r for c, r in meta["oov_rate"]["test"].items() if r > 0}
    print("test OOV rate: " + (", ".join(f"{c} {r:.2%}" for c, r in test_oov.items()) or "none"))
    print(f"wrote {out.relative_to(HERE.parent) if out.is_relative_to(HERE.parent) else out} "
          f"and {meta_path.name}")


@common.one_line_errors(DataError)
def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out) if args.out else HERE / (
        "adult_stage1_leaky.npz" if args.keep_leaky else "adult_stage1.npz")
    meta_path = out.with_name(out.stem + "_meta.json")
    common.check_writable(out.parent, "--out")  # a read-only folder: one line, before the work

    # 1. data ----------------------------------------------------------------------------------
    train_full, test = load_both(args.data_dir, args.max_bad_fraction)
    train_full, test = add_labels(train_full), add_labels(test)
    train, val = train_test_split(train_full, test_size=args.val_frac, random_state=args.seed,
                                  stratify=train_full["y_income"])
    splits = {"train": train, "val": val, "test": test}
    cat_cols = [c for c in CATEGORICAL if args.keep_leaky or c not in LEAKY]

    # 2. fit on train only ---------------------------------------------------------------------
    num_stats = fit_numeric(train)
    edges = fit_bin_edges(train, args.n_bins)
    vocabs = {c: fit_vocab(train[c], args.min_count) for c in cat_cols}
    token_vocabs = {c: fit_vocab(train[c].map(fmt_num), args.min_count) for c in TOKEN_COLUMNS}

    # 3. transform every split -----------------------------------------------------------------
    arrays, oov_rate = {}, {}
    for name, df in splits.items():
        split_arrays, oov_rate[name] = encode_split(df, cat_cols, num_stats, edges, vocabs,
                                                    token_vocabs)
        arrays.update({f"{k}_{name}": v for k, v in split_arrays.items()})

    # 4. write the npz and its meta, report ------------------------------------------------------
    meta = {
        "schema_version": SCHEMA_VERSION, "script": "stage1_adult/02_preprocess.py",
        "config": vars(args), "keep_leaky": args.keep_leaky,
        "dropped_columns": [] if args.keep_leaky else list(LEAKY),
        "dropped_why": "" if args.keep_leaky else (
            "task B (married) is derived from marital-status; marital-status and relationship "
            "(Husband/Wife) would let the model read the label off its inputs"),
        "numeric_columns": NUMERIC, "numeric_standardize": num_stats,
        "numeric_bin_edges": edges, "n_bins": {c: len(edges[c]) - 1 for c in NUMERIC},
        "token_columns": TOKEN_COLUMNS, "token_vocabs": token_vocabs,
        "categorical_columns": cat_cols, "vocabs": vocabs,
        "cardinalities": {c: len(vocabs[c]) + 1 for c in cat_cols},  # +1 for OOV index 0
        "rows": {k: int(len(v)) for k, v in splits.items()},
        "positive_rate": {k: {"income": float(v["y_income"].mean()),
                              "married": float(v["y_married"].mean())} for k, v in splits.items()},
        "oov_rate": oov_rate,
    }
    save_npz(out, arrays)
    common.write_json(meta_path, meta)
    report(args, splits, meta, out, meta_path)


if __name__ == "__main__":
    main()
