"""Stage 1 data: the Adult dialects, bad rows, the npz/meta contract, OOV and leakage."""
import json

import numpy as np
import pytest
from conftest import ROOT, load_script, write_tiny_adult

from stage1_adult import adult_data

ROW = ("39, State-gov, 77516, Bachelors, 13, Never-married, Adm-clerical, Not-in-family, "
       "White, Male, 2174, 0, 40, United-States, <=50K")


def test_reads_both_dialects(tmp_path):
    (tmp_path / "t.test").write_text(
        "|1x3 Cross validator\n"
        + ROW + ".\n"
        + ROW.replace("State-gov", "?").replace("<=50K", ">50K.") + "\n\n")
    df, report = adult_data.read_adult(tmp_path / "t.test")
    assert report == {"rows": 2, "bad_rows": 0, "bad_examples": []}
    assert list(df["income"]) == ["<=50K", ">50K"]  # trailing '.' removed
    assert df.loc[1, "workclass"] == adult_data.MISSING  # '?' is its own category
    assert df["age"].dtype == np.float64 and df.loc[0, "capital-gain"] == 2174
    assert list(df["line"]) == [2, 3]


def test_bad_rows_are_counted_with_line_numbers(tmp_path):
    good = [ROW] * 300
    bad = [ROW.replace(", 40,", ","),                 # 14 fields
           ROW.replace("<=50K", "maybe"),              # unknown label
           ROW.replace("39,", "thirty-nine,")]         # numeric that does not parse
    (tmp_path / "a.data").write_text("\n".join(good[:100] + bad + good[100:]) + "\n")
    df, report = adult_data.read_adult(tmp_path / "a.data", max_bad_fraction=0.05)
    assert report["rows"] == 300 and report["bad_rows"] == 3
    lines = [n for n, _ in report["bad_examples"]]
    assert lines == [101, 102, 103]
    whys = " ".join(w for _, w in report["bad_examples"])
    assert "expected 15 fields, got 14" in whys and "maybe" in whys and "age is not a number" in whys
    with pytest.raises(adult_data.DataError, match=r"3 of 303 rows are malformed.*line 101"):
        adult_data.read_adult(tmp_path / "a.data", max_bad_fraction=0.001)


def test_missing_file_and_dir_name_the_path(tmp_path):
    with pytest.raises(adult_data.DataError, match=r"nope: data directory not found.*adult.data.*uci"):
        adult_data.load_both(tmp_path / "nope")
    with pytest.raises(adult_data.DataError, match=r"adult.data: file not found"):
        adult_data.load_both(tmp_path)


def test_scripts_exit_with_one_line_on_missing_data(tmp_path, capsys):
    for script in ["stage1_adult/01_load_and_peek.py", "stage1_adult/02_preprocess.py"]:
        with pytest.raises(SystemExit) as e:
            load_script(script).main(["--data-dir", str(tmp_path / "none")])
        assert str(e.value).startswith("error: ") and "\n" not in str(e.value)
        assert "data directory not found" in str(e.value)


def test_md5_warning_only_for_changed_files(tiny_adult):
    assert adult_data.md5_warnings(ROOT / "stage1_adult" / "data") == []
    warnings = adult_data.md5_warnings(tiny_adult)
    assert len(warnings) == 2 and all("differs from the published UCI file" in w
                                      for w in warnings)


def test_npz_contract(tiny_npz):
    npz, _ = tiny_npz
    meta = json.loads(npz.with_name("adult_meta.json").read_text())
    with np.load(npz, allow_pickle=False) as z:
        for split in ["train", "val", "test"]:
            n = len(z[f"y_income_{split}"])
            assert z[f"x_num_{split}"].dtype == np.float32 and z[f"x_num_{split}"].shape == (n, 6)
            assert z[f"x_cat_{split}"].dtype == np.int64
            assert z[f"x_cat_{split}"].shape == (n, len(meta["categorical_columns"]))
            assert z[f"x_bin_{split}"].dtype == np.int64
            assert ((z[f"x_binfrac_{split}"] >= 0) & (z[f"x_binfrac_{split}"] <= 1)).all()
            assert z[f"x_tok_{split}"].shape == (n, 2)
            assert z[f"y_married_{split}"].dtype == np.float32
            assert set(np.unique(z[f"y_income_{split}"])) <= {0.0, 1.0}
            cards = np.array([meta["cardinalities"][c] for c in meta["categorical_columns"]])
            assert (z[f"x_cat_{split}"] < cards).all() and (z[f"x_cat_{split}"] >= 0).all()
            bins = np.array([meta["n_bins"][c] for c in meta["numeric_columns"]])
            assert (z[f"x_bin_{split}"] < bins).all()
        assert abs(z["x_num_train"].mean(0)).max() < 1e-4  # standardized with train statistics
        assert len(z["y_income_test"]) == 400  # the official test file, header line skipped
    assert meta["rows"]["train"] + meta["rows"]["val"] == 800


def test_leaky_columns_dropped_by_default(tiny_npz):
    npz, leaky = tiny_npz
    meta = json.loads(npz.with_name("adult_meta.json").read_text())
    meta_leaky = json.loads(leaky.with_name("adult_leaky_meta.json").read_text())
    assert "marital-status" not in meta["categorical_columns"]
    assert "relationship" not in meta["categorical_columns"]
    assert meta["dropped_columns"] == ["marital-status", "relationship"] and meta["dropped_why"]
    assert {"marital-status", "relationship"} <= set(meta_leaky["categorical_columns"])
    assert meta_leaky["dropped_columns"] == [] and meta_leaky["keep_leaky"] is True


def test_rare_and_unseen_categories_map_to_oov(tmp_path):
    folder = write_tiny_adult(tmp_path / "d", 400, 200)
    test = folder / "adult.test"
    rows = test.read_text().split("\n")
    rows[1] = rows[1].replace("Private", "Never-seen-before", 1).replace(
        rows[1].split(", ")[1], "Never-seen-before", 1)
    test.write_text("\n".join(rows))
    pre = load_script("stage1_adult/02_preprocess.py")
    pre.main(["--data-dir", str(folder), "--out", str(tmp_path / "a.npz"), "--min-count", "5"])
    meta = json.loads((tmp_path / "a_meta.json").read_text())
    assert "Never-seen-before" not in meta["vocabs"]["workclass"]
    assert all(idx >= 1 for v in meta["vocabs"].values() for idx in v.values())
    with np.load(tmp_path / "a.npz") as z:
        assert z["x_cat_test"][0, meta["categorical_columns"].index("workclass")] == 0
    # rarer than --min-count in train -> not in the vocabulary (so OOV)
    counts = {}
    for line in (folder / "adult.data").read_text().split("\n")[:400]:
        if line.strip():
            c = line.split(", ")[13]
            counts[c] = counts.get(c, 0) + 1
    rare = [c for c, n in counts.items() if n < 5]
    assert rare and not set(rare) & set(meta["vocabs"]["native-country"])


def test_01_prints_the_lessons(tiny_adult, tmp_path, capsys):
    load_script("stage1_adult/01_load_and_peek.py").main(
        ["--data-dir", str(tiny_adult), "--plots", "--out-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "missing values" in out and "income >50K" in out and "married" in out
    assert "predicting married from marital-status alone is 100.0% accurate" in out
    assert (tmp_path / "stage1_numeric_hist.png").stat().st_size > 1000
