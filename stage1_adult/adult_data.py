"""Stage 1's raw data: reading the UCI Adult files (the one place that knows their dialect).

01_load_and_peek.py and 02_preprocess.py both start from the raw text, so the parsing rules live
here once. The files are odd in small ways that bite every first attempt:
  - fields are separated by ", " (comma + space), and "?" marks a missing value;
  - adult.test starts with the line "|1x3 Cross validator" and its labels end in "." (">50K.");
  - both end with a blank line.
Parsing is vectorized with pandas string methods (no per-row Python). Rows with the wrong number
of fields, an unknown label, or a numeric field that does not parse are skipped, counted, and
reported with their line numbers; past `max_bad_fraction` we stop with one clear error line.
"""
import hashlib
from pathlib import Path

import numpy as np
import pandas as pd

UCI_URL = "https://archive.ics.uci.edu/dataset/2/adult"
DATA_DIR = Path(__file__).resolve().parent / "data"
FILES = {"train": "adult.data", "test": "adult.test"}
# md5 of the published UCI files: a different file still loads, with a warning.
MD5 = {
    "adult.data": "5d7c39d7b8804f071cdd1f2a7c460872",
    "adult.test": "35238206dfdf7f1fe215bbb874adecdc",
    "adult.names": "1a7cdb3ff7a1b709968b1c7a11def63e",
}

COLUMNS = ["age", "workclass", "fnlwgt", "education", "education-num", "marital-status",
           "occupation", "relationship", "race", "sex", "capital-gain", "capital-loss",
           "hours-per-week", "native-country", "income"]
NUMERIC = ["age", "fnlwgt", "education-num", "capital-gain", "capital-loss", "hours-per-week"]
CATEGORICAL = ["workclass", "education", "marital-status", "occupation", "relationship",
               "race", "sex", "native-country"]
# Task B is derived from marital-status; these two columns would hand it to the model.
MARRIED_VALUES = ["Married-civ-spouse", "Married-AF-spouse", "Married-spouse-absent"]
LEAKY = ["marital-status", "relationship"]
MISSING = "missing"  # "?" becomes this category: missingness is information, not noise


class DataError(Exception):
    """Bad or missing input: the message is one line saying what and what to do."""


def md5_warnings(data_dir):
    """Return a warning line for each file whose md5 differs from the published UCI file."""
    warnings = []
    for name, expected in MD5.items():
        path = Path(data_dir) / name
        if path.exists() and hashlib.md5(path.read_bytes()).hexdigest() != expected:
            warnings.append(f"warning: {path} differs from the published UCI file (md5); "
                            "results may not match the README")
    return warnings


def read_adult(path, max_bad_fraction=0.01):
    """Parse one Adult file into a DataFrame (COLUMNS, plus `line` = 1-based line number).

    Returns (df, report) where report = {"rows", "bad_rows", "bad_examples": [(line, why)]}.
    """
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a directory, not the Adult file; the UCI files "
                        f"(adult.data, adult.test) belong in {path.parent}/")
    if not path.exists():
        raise DataError(f"{path}: file not found. The UCI Adult files (adult.data, adult.test) "
                        f"belong in {path.parent}/ - copy them from {UCI_URL}")
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = pd.Series(text.split("\n"))
    line_no = pd.Series(np.arange(1, len(lines) + 1), index=lines.index)
    stripped = lines.str.strip()
    keep = (stripped != "") & ~stripped.str.startswith("|")  # blank lines, "|1x3 Cross validator"
    lines, line_no = stripped[keep], line_no[keep]
    if len(lines) == 0:
        raise DataError(f"{path}: no data rows (empty file?)")

    # Split on "," and strip the space that follows it; count fields vectorized.
    n_fields = lines.str.count(",") + 1
    bad_why = pd.Series("", index=lines.index)
    bad_why[n_fields != len(COLUMNS)] = (
        "expected 15 fields, got " + n_fields[n_fields != len(COLUMNS)].astype(str))
    ok = bad_why == ""
    if not ok.any():  # no row to parse at all: say what the rows look like instead
        counts = n_fields.value_counts()
        hint = ("tab-separated? the UCI files separate fields with ', '"
                if lines.iloc[0].count("\t") >= len(COLUMNS) - 1 else
                "an extra or missing column on every row?")
        raise DataError(f"{path}: no row has the {len(COLUMNS)} comma-separated fields of the "
                        f"UCI Adult file ({counts.iloc[0]:,} of {len(lines):,} rows have "
                        f"{counts.index[0]}): {hint}")
    parts = lines[ok].str.split(",", expand=True)
    parts.columns = COLUMNS
    parts = parts.apply(lambda col: col.str.strip())

    label = parts["income"].str.rstrip(".")
    bad_label = ~label.isin(["<=50K", ">50K"])
    bad_why[bad_label[bad_label].index] = "income label is not <=50K / >50K: " + parts.loc[
        bad_label, "income"]
    parse_numerics(parts, bad_why)

    good = bad_why[parts.index] == ""
    df = parts[good].copy()
    df["income"] = label[good]
    for col in CATEGORICAL:
        df[col] = df[col].replace("?", MISSING)
    for col in NUMERIC:
        df[col] = df[col].astype(np.float64)
    df["line"] = line_no[df.index].astype(np.int64)
    df = df.reset_index(drop=True)

    bad = bad_why[bad_why != ""]
    report = {"rows": int(len(df)), "bad_rows": int(len(bad)),
              "bad_examples": [(int(line_no[i]), why) for i, why in bad.head(5).items()]}
    if len(bad) > max_bad_fraction * len(lines):
        first = "; ".join(f"line {n}: {why}" for n, why in report["bad_examples"])
        raise DataError(f"{path}: {len(bad)} of {len(lines)} rows are malformed "
                        f"(more than {max_bad_fraction:.0%}); first: {first}. "
                        "Is this the UCI Adult file?")
    return df, report


def parse_numerics(parts, bad_why):
    """NUMERIC columns of `parts` parsed in place; a value that is not a finite number gives
    its row a reason in bad_why (the first reason a row gets is the one reported)."""
    for col in NUMERIC:
        values = pd.to_numeric(parts[col], errors="coerce")
        unset = bad_why[parts.index] == ""
        bad = values.isna() & unset
        bad_why[bad[bad].index] = f"{col} is not a number: " + parts.loc[bad, col]
        # pandas parses "inf" and "1e400" as infinite numbers: a bad row too, or the
        # standardization spreads the inf to every row of the split
        infinite = values.notna() & ~np.isfinite(values.astype(np.float64)) & unset
        bad_why[infinite[infinite].index] = f"{col} is not a finite number: " + parts.loc[
            infinite, col]
        parts[col] = values


def describe_report(path, report):
    """One line for people: rows read, and the bad rows with their line numbers."""
    msg = f"{path}: {report['rows']:,} rows"
    if report["bad_rows"]:
        first = "; ".join(f"line {n}: {why}" for n, why in report["bad_examples"])
        msg += f", {report['bad_rows']} malformed rows skipped ({first})"
    return msg


def load_both(data_dir=DATA_DIR, max_bad_fraction=0.01, verbose=True):
    """Read adult.data and adult.test, warn on md5 mismatch, print the bad-row report."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: data directory not found. Put adult.data and adult.test "
                        f"there (from {UCI_URL})")
    frames = {}
    for split, name in FILES.items():
        df, report = read_adult(data_dir / name, max_bad_fraction)
        if verbose:
            print(describe_report(data_dir / name, report))
        frames[split] = df
    if verbose:
        for w in md5_warnings(data_dir):
            print(w)
    return frames["train"], frames["test"]


def add_labels(df):
    """Task A: income >50K. Task B: married, derived from marital-status."""
    df["y_income"] = (df["income"] == ">50K").astype(np.float32)
    df["y_married"] = df["marital-status"].isin(MARRIED_VALUES).astype(np.float32)
    return df
