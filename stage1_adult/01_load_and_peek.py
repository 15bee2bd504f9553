"""Stage 1, step 1: load the raw UCI Adult files and look at them before modelling anything.

What you learn here: the quirks of a real CSV (", " separator, "?" for missing, a junk first line
and "." after the test labels), how unbalanced the target is (>50K is ~24%), which columns have
missing values, and the leakage trap: task B "married" is a function of marital-status, and
relationship (Husband/Wife) nearly is too, so neither may be an input when predicting it.

Run:    python stage1_adult/01_load_and_peek.py [--plots]
Reads:  stage1_adult/data/adult.data, adult.test
Writes: with --plots, results/stage1_numeric_hist.png and results/stage1_income_by_field.png
"""
import argparse
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: plain imports
from stage1_adult.adult_data import (CATEGORICAL, DATA_DIR, LEAKY, MISSING,  # noqa: E402
                                     NUMERIC, DataError, add_labels, load_both)
import common  # noqa: E402



def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default=str(DATA_DIR), help="folder with adult.data/adult.test")
    p.add_argument("--plots", action="store_true", help="write histograms to --out-dir")
    p.add_argument("--out-dir", default=str(common.RESULTS), help="where --plots writes PNGs")
    p.add_argument("--top", type=int, default=5, help="top categories shown per column")
    p.add_argument("--max-bad-fraction", type=float, default=0.01,
                   help="stop with an error when more rows than this are malformed")
    return p.parse_args(argv)


def section(title):
    print(f"\n== {title} " + "=" * max(0, 70 - len(title)))


def peek(train, test, top):
    section("shapes and dtypes")
    print(f"adult.data {train.shape[0]:,} rows, adult.test {test.shape[0]:,} rows, "
          f"{len(NUMERIC)} numeric + {len(CATEGORICAL)} categorical columns + income")
    print(train[NUMERIC + CATEGORICAL].dtypes.astype(str).value_counts().to_string())

    section("missing values ('?') per column")
    missing = pd.DataFrame({s: (df[CATEGORICAL] == MISSING).sum()
                            for s, df in [("adult.data", train), ("adult.test", test)]})
    missing["share (data)"] = (missing["adult.data"] / len(train)).map("{:.2%}".format)
    print(missing[missing["adult.data"] + missing["adult.test"] > 0].to_string())

    section("labels")
    for name, df in [("adult.data", train), ("adult.test", test)]:
        print(f"{name}: income >50K {df['y_income'].mean():.2%}, married {df['y_married'].mean():.2%}")
    print("-> income is unbalanced: a model that always says <=50K is 76% accurate, so we "
          "report AUC, not accuracy")

    section("numeric columns (adult.data)")
    print(train[NUMERIC].describe().T.round(1).to_string())
    zeros = {c: (train[c] == 0).mean() for c in ["capital-gain", "capital-loss"]}
    print("zeros: " + ", ".join(f"{c} {z:.1%}" for c, z in zeros.items())
          + " -> heavy-tailed; 02 applies log1p, and a few exact values act like rules")
    top_gain = train.loc[train["capital-gain"] > 0].groupby("capital-gain")["y_income"].agg(
        ["size", "mean"]).sort_values("size", ascending=False).head(top)
    print("most common non-zero capital-gain values and their >50K rate:")
    print(top_gain.rename(columns={"size": "rows", "mean": ">50K rate"}).round(3).to_string())

    section(f"top {top} categories per column (adult.data)")
    for col in CATEGORICAL:
        vc = train[col].value_counts()
        shown = ", ".join(f"{v} {n / len(train):.1%}" for v, n in vc.head(top).items())
        print(f"{col:<15} {len(vc):>3} values: {shown}")

    section("leakage: task B (married) vs the columns it comes from")
    for col in LEAKY:
        table = train.groupby(col)["y_married"].agg(["size", "mean"]).rename(
            columns={"size": "rows", "mean": "married rate"})
        print(table.round(3).to_string())
        purity = (table["married rate"].clip(0, 1).apply(lambda r: max(r, 1 - r))
                  * table["rows"]).sum() / table["rows"].sum()
        print(f"-> predicting married from {col} alone is {purity:.1%} accurate\n")
    print(f"02_preprocess.py therefore drops {' and '.join(LEAKY)} by default (--keep-leaky "
          "keeps them: task B's AUC then goes to ~1.0, which measures nothing)")


def plots(train, out_dir):
    plt = common.pyplot()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(2, 3, figsize=(11, 6))
    for ax, col in zip(axes.flat, NUMERIC):
        for label, name in [(0.0, "<=50K"), (1.0, ">50K")]:
            ax.hist(train.loc[train["y_income"] == label, col], bins=40, alpha=0.6, label=name,
                    log=col.startswith("capital"))
        ax.set_title(col + (" (log count)" if col.startswith("capital") else ""))
    axes.flat[0].legend()
    fig.suptitle("Adult numeric columns by income (adult.data)")
    fig.tight_layout()
    common.save_figure(fig, out_dir / "stage1_numeric_hist.png", dpi=90)

    fig, axes = plt.subplots(2, 3, figsize=(12, 7))
    for ax, col in zip(axes.flat, ["education", "occupation", "workclass", "marital-status",
                                   "relationship", "sex"]):
        rate = train.groupby(col)["y_income"].mean().sort_values()
        ax.barh(rate.index.astype(str), rate.values)
        ax.set_title(f">50K rate by {col}")
        ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    common.save_figure(fig, out_dir / "stage1_income_by_field.png", dpi=90)
    print(f"\nwrote {out_dir / 'stage1_numeric_hist.png'} and stage1_income_by_field.png")


def main(argv=None):
    args = parse_args(argv)
    try:
        train, test = load_both(args.data_dir, args.max_bad_fraction)
    except DataError as e:
        sys.exit(f"error: {e}")
    train, test = add_labels(train), add_labels(test)
    peek(train, test, args.top)
    if args.plots:
        plots(train, args.out_dir)


if __name__ == "__main__":
    main()
