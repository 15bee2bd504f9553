"""Nothing silently wrong, no tracebacks: each bad input a careful first-day user tried gives
the exact counts or one clear line (tiny fixtures made here)."""
import gzip
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import ROOT, load_script, one_line_exit

from stage1_adult import adult_data
from stage2_ctr import binary_cache, criteo, dataset_files, train_ctr, train_stats

make = load_script("stage2_ctr/01_make_subset.py")
loader_chapter = load_script("stage2_ctr/02_dataloader.py")
cache_chapter = load_script("stage2_ctr/07_binary_cache.py")
mtml_chapter = load_script("stage1_adult/03_train_mtml.py")
ROW = ("39, State-gov, 77516, Bachelors, 13, Never-married, Adm-clerical, Not-in-family, "
       "White, Male, 2174, 0, 40, United-States, <=50K")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("robust") / "set"
    make.main(["--synthetic", "3000", "--out-dir", str(out), "--workers", "1"])
    return out


def batches_of(paths, **kw):
    stream = criteo.CriteoStream(paths, 256, **kw)
    dense, sparse, label = (torch.cat(x) for x in zip(*list(stream)))
    return dense, sparse, label, stream


def md5_of(folder):
    return {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def train_argv(d, tmp_path, *extra, train=None, val=None, test=None):
    return ["--train", str(train or d / "train.txt"), "--val", str(val or d / "val.txt"),
            "--test", str(test or d / "test.txt"), "--batch-size", "256", "--hash-bits", "10",
            "--emb-dim", "4", "--mlp", "8", "--runs-dir", str(tmp_path), "--num-workers", "0",
            "--quiet", "--threads", "1", "--model", "lr", *extra]


# ------------------------------------------------------------------ 1. non-finite Adult values
def test_adult_infinite_numerics_are_bad_rows(tmp_path):
    rows = [ROW] * 300 + [ROW.replace("39,", "inf,"), ROW.replace("77516", "1e400")]
    (tmp_path / "adult.data").write_text("\n".join(rows) + "\n")
    (tmp_path / "adult.test").write_text("|1x3 Cross validator\n" + "\n".join(
        [ROW + ".", ROW.replace("<=50K", ">50K") + "."] * 50) + "\n")
    df, report = adult_data.read_adult(tmp_path / "adult.data")
    assert report["bad_rows"] == 2 and [n for n, _ in report["bad_examples"]] == [301, 302]
    assert "age is not a finite number: inf" in report["bad_examples"][0][1]
    assert np.isfinite(df[adult_data.NUMERIC].to_numpy()).all()
    pre = load_script("stage1_adult/02_preprocess.py")
    pre.main(["--data-dir", str(tmp_path), "--out", str(tmp_path / "a.npz"), "--min-count", "1",
              "--max-bad-fraction", "0.05"])
    with np.load(tmp_path / "a.npz") as z:
        assert all(np.isfinite(z[k]).all() for k in z.files)


# ------------------------------------------------------------ 2. huge integers in Criteo files
def test_integers_of_more_than_18_digits_are_bad_rows_never_inf(tmp_path, data):
    lines = (data / "train.txt").read_text().splitlines()[:500]
    fields = lines[7].split("\t")
    fields[1] = "9" * 400
    lines[7] = "\t".join(fields)
    fields[1] = "9" * 19
    lines[8] = "\t".join(fields)
    (tmp_path / "big.txt").write_text("\n".join(lines) + "\n")
    dense, _, _, stream = batches_of([tmp_path / "big.txt"], max_bad_fraction=0.05)
    counts = stream.stats["files"][str(tmp_path / "big.txt")]
    assert counts["bad_rows"] == 2 and counts["rows"] == 498
    assert counts["first_bad"][0].startswith("line 8: an integer field does not parse")
    assert torch.isfinite(dense).all()
    stats = train_stats.fit_stats([tmp_path / "big.txt"])
    assert np.isfinite(stats["mean"]).all() and np.isfinite(stats["std"]).all()


# ------------------------------------------------------------------------------ 3. CRLF files
def test_crlf_and_lf_files_give_identical_batches(tmp_path, data):
    lf = (data / "train.txt").read_bytes()
    (tmp_path / "crlf.txt").write_bytes(lf.replace(b"\n", b"\r\n") + b"\r\n")  # + a blank line
    a, b = batches_of([data / "train.txt"]), batches_of([tmp_path / "crlf.txt"])
    for x, y in zip(a[:3], b[:3]):
        assert torch.equal(x, y)
    assert b[3].stats["bad_rows"] == 0
    empty_c26 = criteo.bucket_of(criteo.hash_strings(25, [""]), 20)[0]
    lines = lf.decode().splitlines()
    assert (b[1][:, 25] == empty_c26).sum() == sum(x.endswith("\t") for x in lines) > 0
    meta = make.main(["--input", str(tmp_path / "crlf.txt"), "--out-dir", str(tmp_path / "sub"),
                      "--split", "time"])
    out = b"".join((tmp_path / "sub" / f"{s}.txt").read_bytes() for s in ["train", "val", "test"])
    assert out == lf and b"\r" not in out  # the subset is written with LF line endings
    assert sum(r["rows"] for r in meta["splits"].values()) == len(lines)


# ------------------------------------------------------------ 4. a data set folder is one set
def test_killed_generation_leaves_the_old_data_set_whole(tmp_path):
    out = tmp_path / "set"
    make.main(["--synthetic", "2000", "--out-dir", str(out), "--workers", "1"])
    before = md5_of(out)
    proc = subprocess.Popen([sys.executable, str(ROOT / "stage2_ctr/01_make_subset.py"),
                             "--synthetic", "3000000", "--out-dir", str(out), "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline:  # kill -9 while the new train.txt is being written
        tmp = list(tmp_path.glob(".set.tmp-*"))
        if tmp and (tmp[0] / "train.txt").exists() and (tmp[0] / "train.txt").stat().st_size:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert time.time() < deadline, "the generator never started writing"
    assert md5_of(out) == before  # the old folder, complete, untouched
    make.main(["--synthetic", "1000", "--out-dir", str(out), "--workers", "1"])
    assert not list(tmp_path.glob(".set.*"))  # the killed run's temporary folder is gone
    meta = json.loads((out / "meta.json").read_text())
    assert sum(s["rows"] for s in meta["splits"].values()) == 1000
    assert sum(len((out / f"{s}.txt").read_text().splitlines())
               for s in ["train", "val", "test"]) == 1000


def test_crash_inside_the_swap_never_mixes_two_data_sets(tmp_path, monkeypatch):
    out = tmp_path / "set"
    make.main(["--synthetic", "1000", "--out-dir", str(out), "--workers", "1"])
    real_replace, calls = os.replace, []

    def replace(src, dst):  # the second rename of the swap "crashes"
        calls.append(src)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_replace(src, dst)
    monkeypatch.setattr(dataset_files.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        dataset_files.DatasetWriter(out).commit()
    monkeypatch.undo()
    assert not out.exists()  # no folder rather than a mix
    make.main(["--synthetic", "1000", "--out-dir", str(out), "--workers", "1"])
    assert not list(tmp_path.glob(".set.*")) and (out / "meta.json").exists()


def test_out_dir_that_is_a_file_or_not_a_data_set_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.md").write_text("mine")
    for out, message in [(tmp_path / "file", "is a file"),
                         (tmp_path / "file" / "sub", "cannot write there"),
                         (tmp_path / "docs", "is not a data set folder")]:
        msg = one_line_exit(make.main, ["--synthetic", "100", "--out-dir", str(out)])
        assert message in msg
    assert (tmp_path / "docs" / "notes.md").read_text() == "mine"


# --------------------------------------------------------------------- 5. stale statistics
def test_stale_statistics_are_refitted_or_refused(tmp_path):
    d = tmp_path / "set"
    make.main(["--synthetic", "3000", "--out-dir", str(d), "--workers", "1"])
    train_ctr.main(train_argv(d, tmp_path, "--run-name", "a"))
    kept = tmp_path / "old.stats.json"  # the statistics of the first data set, kept aside
    kept.write_text((d / "train.txt.stats.json").read_text())
    make.main(["--synthetic", "2400", "--out-dir", str(d), "--workers", "1", "--seed", "1"])
    (d / "train.txt.stats.json").write_text(kept.read_text())  # a stale file next to new data
    train_ctr.main(train_argv(d, tmp_path, "--run-name", "b"))
    fresh = json.loads((d / "train.txt.stats.json").read_text())
    assert fresh["sources"][0]["size"] == (d / "train.txt").stat().st_size  # refitted
    assert fresh["rows"] == len((d / "train.txt").read_text().splitlines())
    assert json.loads(kept.read_text())["rows"] != fresh["rows"]
    msg = one_line_exit(train_ctr.main, train_argv(d, tmp_path, "--stats", str(kept)))
    assert "old.stats.json: fitted on" in msg
    folder = tmp_path / "c.bin"
    binary_cache.write_cache([d / "val.txt"], folder, workers=0, progress=False)
    (d / "val.txt").write_text((d / "val.txt").read_text() * 2)
    with pytest.raises(criteo.CriteoFormatError, match="has changed since: rebuild"):
        binary_cache.BinaryStream(folder, 64)


# ------------------------------------------------------------ 6. bad rows reach metrics.json
def test_trainer_reports_bad_rows_per_split(tmp_path, data, capsys):
    lines = (data / "train.txt").read_text().splitlines()
    lines[3] = "x" + lines[3][1:]
    (tmp_path / "train.txt").write_text("\n".join(lines) + "\n")
    argv = train_argv(data, tmp_path, "--run-name", "r", "--num-workers", "1",
                      train=tmp_path / "train.txt")
    m = train_ctr.main([a for a in argv if a != "--quiet"])
    bad = m["bad_rows"]["train"][str(tmp_path / "train.txt")]
    assert bad["bad_rows"] == 1 and bad["rows"] == len(lines) - 1
    assert bad["first_bad"] == ["line 4: label is not 0/1"]
    assert set(m["bad_rows"]) == {"train", "val", "test"}
    out = capsys.readouterr()
    assert "skipped 1 malformed rows" in out.err + out.out
    saved = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert saved["bad_rows"]["train"][str(tmp_path / "train.txt")]["bad_rows"] == 1


# ------------------------------------------------------------------------ 7. the same file twice
def test_the_same_file_twice_is_refused(tmp_path, data):
    with pytest.raises(criteo.CriteoFormatError, match="given twice"):
        criteo.CriteoStream([data / "val.txt", data / "val.txt"], 64)
    msg = one_line_exit(train_ctr.main, train_argv(data, tmp_path, val=data / "train.txt"))
    assert "is in --train and in --val" in msg


# ------------------------------------------------------------- 8. errors found while reading
def test_errors_inside_loader_workers_are_one_line(tmp_path, data):
    lines = (data / "train.txt").read_text().splitlines()
    bad = lines[:1000] + ["1\t2"] * 30 + lines[1000:]
    (tmp_path / "bad.txt").write_text("\n".join(bad) + "\n")
    stream = criteo.CriteoStream([tmp_path / "bad.txt"], 256)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=1)
    with pytest.raises(criteo.CriteoFormatError) as e:
        list(criteo.iter_batches(loader, 256))
    assert "\n" not in str(e.value) and str(e.value).startswith(str(tmp_path / "bad.txt"))
    assert "30 of" in str(e.value) and "Traceback" not in str(e.value)
    msg = one_line_exit(cache_chapter.main, [str(tmp_path / "bad.txt"), "--out",
                                             str(tmp_path / "b.bin"), "--workers", "2"])
    assert "CriteoFormatError" not in msg and "malformed" in msg


def test_every_input_is_checked_before_training(tmp_path, data):
    no_label = tmp_path / "nolabel.txt"
    no_label.write_text("\n".join(x.split("\t", 1)[1] for x in
                                  (data / "val.txt").read_text().splitlines()) + "\n")
    gz = (tmp_path / "val.txt.gz")
    gz.write_bytes(gzip.compress((data / "val.txt").read_bytes())[:-40])
    (tmp_path / "empty.txt").write_bytes(b"")
    cases = [({"val": no_label}, "malformed"), ({"val": gz}, "truncated or corrupt gzip"),
             ({"test": tmp_path / "none.txt"}, "file not found"),
             ({"test": tmp_path / "empty.txt"}, "file is empty"),
             ({"test": tmp_path}, "is a directory")]
    for kw, message in cases:
        msg = one_line_exit(train_ctr.main, train_argv(data, tmp_path, "--run-name", "x", **kw))
        assert message in msg
        assert not (tmp_path / "x").exists()  # nothing trained, nothing written
    (tmp_path / "broken.json").write_text("{not json")
    msg = one_line_exit(train_ctr.main, train_argv(data, tmp_path, "--stats",
                                                   str(tmp_path / "broken.json")))
    assert "not a statistics file" in msg
    msg = one_line_exit(train_ctr.main, train_argv(data, tmp_path, "--stats",
                                                   str(tmp_path / "nowhere" / "s.json")))
    assert "not found" in msg and not (tmp_path / "nowhere").exists()


def test_resume_checks_the_checkpoint(tmp_path, data, capsys):
    base = train_argv(data, tmp_path, "--run-name", "r", "--ckpt-every", "3", "--max-steps", "4")
    train_ctr.main([a for a in base if a != "--quiet"] + ["--resume"])
    out = capsys.readouterr()
    assert "there is no" in out.out + out.err  # --resume without last.pt: said so
    msg = one_line_exit(train_ctr.main, [a if a != "lr" else "fm" for a in base] + ["--resume"])
    assert "model='lr' (now 'fm')" in msg
    last = tmp_path / "r" / "last.pt"
    last.write_bytes(last.read_bytes()[:200])
    msg = one_line_exit(train_ctr.main, base + ["--resume"])
    assert "last.pt: truncated" in msg
    (tmp_path / "r" / "best.pt.abc123.tmp").write_bytes(b"half")  # left by a kill
    train_ctr.main(base)
    assert not list((tmp_path / "r").glob("*.tmp"))


def test_resume_keeps_the_running_train_loss(tmp_path, data):
    base = train_argv(data, tmp_path, "--epochs", "2", "--ckpt-every", "3", "--model", "fm")
    full = train_ctr.main(base + ["--run-name", "full"])
    train_ctr.main(base + ["--run-name", "cut", "--max-steps", "5", "--patience", "9"])
    (tmp_path / "cut" / "best.pt").unlink()
    resumed = train_ctr.main(base + ["--run-name", "cut", "--resume"])
    assert [h["train_loss"] for h in resumed["history"][-2:]] == pytest.approx(
        [h["train_loss"] for h in full["history"][-2:]], rel=1e-6)


# ------------------------------------------------------------------------------- 9. flags
@pytest.mark.parametrize("argv, message", [
    (["--device", "cpu:7"], "one CPU device"),
    (["--num-workers", "-1"], "--num-workers: must be an integer >= 0"),
    (["--threads", "-1"], "--threads: must be an integer >= 0"),
    (["--mlp", "-5"], "--mlp: layer sizes must be >= 1"),
    (["--mlp", "0"], "--mlp: layer sizes must be >= 1"),
    (["--weight-decay", "-1"], "--weight-decay: must be a number >= 0"),
    (["--max-steps", "-1"], "--max-steps: must be an integer >= 0"),
    (["--eval-every", "-2"], "--eval-every: must be an integer >= 0"),
    (["--patience", "0"], "--patience: must be an integer >= 1"),
])
def test_trainer_flags(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        train_ctr.parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_cuda_suggests_auto(capsys):
    for parse in (train_ctr.parse_args, mtml_chapter.parse_args):
        with pytest.raises(SystemExit):
            parse(["--device", "cuda"])
        assert "no CUDA device" in capsys.readouterr().err


@pytest.mark.parametrize("module, argv, message", [
    ("loader", ["f", "--batch-size", "0"], "--batch-size: must be an integer >= 1"),
    ("loader", ["f", "--chunk-kb", "0"], "--chunk-kb: must be an integer >= 1"),
    ("loader", ["f", "--group", "0"], "--group: must be an integer >= 1"),
    ("loader", ["f", "--num-workers", "-1"], "--num-workers: must be an integer >= 0"),
    ("loader", ["f", "--threads", "0"], "--threads: must be an integer >= 1"),
    ("loader", ["f", "--max-bad-fraction", "-1"], "must be a fraction in [0, 1]"),
    ("mtml", ["--epochs", "0"], "--epochs: must be an integer >= 1"),
    ("mtml", ["--batch-size", "0"], "--batch-size: must be an integer >= 1"),
    ("mtml", ["--lr", "-1"], "--lr: must be a number > 0"),
    ("mtml", ["--dropout", "1.5"], "--dropout: must be a probability in [0, 1)"),
    ("mtml", ["--hidden", "abc"], "--hidden: must be comma-separated layer sizes"),
    ("make", ["--synthetic", "10", "--workers", "0"], "--workers: must be an integer >= 1"),
    ("make", ["--synthetic", "10", "--chunk-rows", "0"], "--chunk-rows: must be an integer >= 1"),
])
def test_chapter_flags(module, argv, message, capsys):
    chapter = {"loader": loader_chapter, "mtml": mtml_chapter, "make": make}[module]
    with pytest.raises(SystemExit) as e:
        chapter.parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_truncated_npz_is_one_line(tiny_npz, tmp_path):
    npz = tmp_path / "cut.npz"
    npz.write_bytes(tiny_npz[0].read_bytes()[:3000])
    (tmp_path / "cut_meta.json").write_text(tiny_npz[0].with_name("adult_meta.json").read_text())
    msg = one_line_exit(mtml_chapter.main, ["--npz", str(npz), "--quiet"])
    assert "truncated or not an npz" in msg


# ------------------------------------------------------------------ 10. a file with no rows
def test_files_of_blank_lines_are_one_line(tmp_path, data):
    blank = tmp_path / "blank.txt"
    blank.write_text("\n\n\r\n\n")
    assert "no data rows" in one_line_exit(loader_chapter.main, [str(blank)])
    assert "no data rows" in one_line_exit(make.main, ["--input", str(blank), "--out-dir",
                                                       str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()
    assert "no data rows" in one_line_exit(train_ctr.main, train_argv(data, tmp_path,
                                                                      train=blank))
    one_val = tmp_path / "one_class.txt"
    one_val.write_text("\n".join(x for x in (data / "val.txt").read_text().splitlines()
                                 if x.startswith("0")) + "\n")
    assert "AUC needs both classes" in one_line_exit(train_ctr.main, train_argv(
        data, tmp_path, val=one_val))


# ---------------------------------------------------------------- 11. a file without permission
def test_unreadable_file_is_one_line(tmp_path, data, monkeypatch):
    real = os.access
    monkeypatch.setattr(criteo.os, "access", lambda p, mode: False if str(p).endswith(
        "val.txt") else real(p, mode))
    msg = one_line_exit(train_ctr.main, train_argv(data, tmp_path))
    assert "val.txt: no permission to read it" in msg


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file")
def test_unreadable_file_as_a_user(tmp_path, data):
    path = tmp_path / "secret.txt"
    path.write_bytes((data / "val.txt").read_bytes())
    path.chmod(0)
    assert "no permission" in one_line_exit(loader_chapter.main, [str(path)])


# --------------------------------------------------------------------------------- minor
def test_adult_directory_in_place_of_the_file(tmp_path):
    (tmp_path / "adult.data").mkdir()
    with pytest.raises(adult_data.DataError, match="adult.data: is a directory"):
        adult_data.read_adult(tmp_path / "adult.data")


def test_small_file_with_two_percent_bad_rows_fails(tmp_path, data):
    lines = (data / "train.txt").read_text().splitlines()[:500]
    for i in range(10):
        lines[i * 40] = "x" + lines[i * 40][1:]
    (tmp_path / "small.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(criteo.CriteoFormatError, match="10 of 500 rows malformed"):
        batches_of([tmp_path / "small.txt"])
    assert batches_of([tmp_path / "small.txt"], max_bad_fraction=0.05)[3].stats["bad_rows"] == 10
