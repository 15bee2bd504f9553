"""Issue 19 outside the Stage 2 trainer, and the --device flag of issue 23: every chapter's flags
take checked types, --quick sets only the defaults the user did not give, the committed results
are written only by a chapter's default run (with its exact command and machine), an output
path that cannot be written is one line before any work, a full disk at the end is one line,
a NaN metric is an error line instead of a table, and --device cuda on this CPU machine is one
line. Tiny inputs made here; nothing trains longer than a second."""
import errno
import json

import pytest
import torch
from conftest import ROOT, load_script, one_line_exit

import common
from stage1_adult import adult_data
from stage2_ctr import training

CHAPTERS = {name: f"{name}.py" for name in [
    "stage1_adult/02_preprocess", "stage1_adult/03_train_mtml", "stage1_adult/04_mtml_tradeoff",
    "stage1_adult/05_what_matters", "stage2_ctr/04_can_an_mlp_multiply",
    "stage2_ctr/05_movielens", "stage3_advanced/01_mtl_adult",
    "stage3_advanced/02_task_correlation", "stage3_advanced/03_mtl_ctr",
    "stage3_advanced/04_imbalance", "stage3_advanced/05_throughput"]}
WITH_DEVICE = ["stage1_adult/03_train_mtml", "stage1_adult/04_mtml_tradeoff",
               "stage1_adult/05_what_matters", "stage2_ctr/04_can_an_mlp_multiply", "stage2_ctr/05_movielens",
               "stage3_advanced/01_mtl_adult", "stage3_advanced/02_task_correlation",
               "stage3_advanced/03_mtl_ctr", "stage3_advanced/04_imbalance",
               "stage3_advanced/05_throughput"]
S3 = "stage3_advanced/0"


def chapter(name):
    return load_script(CHAPTERS[name])


def argparse_error(name, argv, capsys):
    with pytest.raises(SystemExit) as e:
        chapter(name).parse_args(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and len([x for x in err.splitlines() if "error:" in x]) == 1, err
    return err


# --------------------------------------------------------------------- checked flag types
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("name", WITH_DEVICE)
def test_device_cuda_on_a_cpu_machine_is_one_line(name, capsys):
    assert "no CUDA device visible to torch" in argparse_error(name, ["--device", "cuda"],
                                                                capsys)


@pytest.mark.parametrize("name, argv, message", [
    (f"{S3}1_mtl_adult", ["--threads", "0"], "--threads: must be an integer >= 1"),
    (f"{S3}1_mtl_adult", ["--epochs", "0"], "--epochs: must be an integer >= 1"),
    (f"{S3}1_mtl_adult", ["--seeds", ","], "--seeds: must be comma-separated seeds"),
    (f"{S3}1_mtl_adult", ["--seeds", "x"], "--seeds: must be comma-separated seeds"),
    (f"{S3}1_mtl_adult", ["--batch-size", "0"], "--batch-size: must be an integer >= 1"),
    (f"{S3}1_mtl_adult", ["--dropout", "1.5"], "--dropout: must be a probability in [0, 1)"),
    (f"{S3}1_mtl_adult", ["--bottom-width", "-4"], "--bottom-width: must be an integer >= 2"),
    (f"{S3}1_mtl_adult", ["--tower", "x"], "--tower: must be comma-separated layer sizes"),
    (f"{S3}1_mtl_adult", ["--lr", "-1"], "--lr: must be a number > 0"),
    (f"{S3}2_task_correlation", ["--train-rows", "0"], "--train-rows: must be an integer >= 1"),
    (f"{S3}2_task_correlation", ["--test-rows", "1"], "--test-rows: must be an integer >= 2"),
    (f"{S3}2_task_correlation", ["--threads", "0"], "--threads: must be an integer >= 1"),
    (f"{S3}2_task_correlation", ["--seeds", ","], "--seeds: must be comma-separated seeds"),
    (f"{S3}2_task_correlation", ["--epochs", "0"], "--epochs: must be an integer >= 1"),
    (f"{S3}3_mtl_ctr", ["--hash-bits", "40"], "--hash-bits: must be an integer in [1, 30]"),
    (f"{S3}3_mtl_ctr", ["--batch-size", "0"], "--batch-size: must be an integer >= 1"),
    (f"{S3}3_mtl_ctr", ["--seeds", "x"], "--seeds: must be comma-separated seeds"),
    (f"{S3}4_imbalance", ["--ctr", "1.5"], "--ctr: must be a rate in (0, 1)"),
    (f"{S3}4_imbalance", ["--epochs", "0"], "--epochs: must be an integer >= 1"),
    (f"{S3}4_imbalance", ["--threads", "0"], "--threads: must be an integer >= 1"),
    (f"{S3}5_throughput", ["--batch-sizes", "0"], "--batch-sizes: must be comma-separated"),
    (f"{S3}5_throughput", ["--workers", ","], "--workers: must be comma-separated"),
    (f"{S3}5_throughput", ["--micro-batch", "-1"], "--micro-batch: must be an integer >= 0"),
    ("stage2_ctr/04_can_an_mlp_multiply", ["--ks", "0"], "--ks: must be comma-separated"),
    ("stage2_ctr/04_can_an_mlp_multiply", ["--rows-per-id", "0"], "--rows-per-id: must be"),
    ("stage2_ctr/04_can_an_mlp_multiply", ["--seed", "-1"], "--seed: must be an integer >= 0"),
    ("stage2_ctr/05_movielens", ["--seeds", ","], "--seeds: must be comma-separated seeds"),
    ("stage2_ctr/05_movielens", ["--dropouts", "1.5"], "--dropouts: must be comma-separated"),
    ("stage2_ctr/05_movielens", ["--models", "x"], "--models from"),
    ("stage1_adult/04_mtml_tradeoff", ["--wB", "-1"], "--wB: must be comma-separated"),
    ("stage1_adult/05_what_matters", ["--loader-repeats", "0"], "must be an integer >= 1"),
])
def test_bad_flags_are_one_argparse_line(name, argv, message, capsys):
    assert message in argparse_error(name, argv, capsys)


# ------------------------------------------------------ --quick and where results are written
@pytest.mark.parametrize("name, argv, given, quick", [
    ("stage2_ctr/04_can_an_mlp_multiply", ["--ks", "8"], {"ks": [8]}, {"ids": 150}),
    (f"{S3}1_mtl_adult", ["--seeds", "3"], {"seeds": [3]}, {"epochs": 6}),
    (f"{S3}1_mtl_adult", ["--epochs", "2"], {"epochs": 2}, {"seeds": [0, 1]}),
    (f"{S3}2_task_correlation", ["--train-rows", "500"], {"train_rows": 500},
     {"seeds": [0, 1], "epochs": 8}),
    (f"{S3}3_mtl_ctr", ["--rows", "1000"], {"rows": 1000}, {"seeds": [0], "epochs": 2}),
    (f"{S3}4_imbalance", ["--seeds", "1,2"], {"seeds": [1, 2]}, {"rows": 40_000}),
    (f"{S3}5_throughput", ["--rows", "5000"], {"rows": 5000}, {"models": ["lr", "deepfm"]}),
])
def test_quick_sets_only_the_defaults_the_user_did_not_give(name, argv, given, quick):
    args = chapter(name).parse_args(["--quick"] + argv)
    assert {k: getattr(args, k) for k in given} == given
    assert {k: getattr(args, k) for k in quick} == quick


@pytest.mark.parametrize("name, stem, partial_flags", [
    ("stage2_ctr/04_can_an_mlp_multiply", "stage2_mlp_dot", ["--ks", "4"]),
    (f"{S3}1_mtl_adult", "stage3_mtl_adult", ["--seeds", "0"]),
    (f"{S3}2_task_correlation", "stage3_task_correlation", ["--models", "mmoe"]),
    (f"{S3}3_mtl_ctr", "stage3_mtl_ctr", ["--corrs", "0.9"]),
    (f"{S3}4_imbalance", "stage3_imbalance", ["--datasets", "adult"]),
    (f"{S3}5_throughput", "stage3_throughput", ["--workers", "1"]),
])
def test_only_a_default_run_writes_the_committed_table(name, stem, partial_flags):
    parse = chapter(name).parse_args
    assert str(parse(["--threads", "1", "--runs-dir", "x"]).out) == str(
        ROOT / "results" / f"{stem}.md")
    assert str(parse(partial_flags).out) == str(ROOT / "runs" / "partial" / f"{stem}.md")
    assert str(parse(["--quick"]).out) == str(ROOT / "runs" / "quick" / f"{stem}.md")


def test_stage1_sweeps_write_results_only_by_default():
    for name in ["stage1_adult/04_mtml_tradeoff", "stage1_adult/05_what_matters"]:
        parse = chapter(name).parse_args
        assert parse(["--threads", "1"]).out_dir == ROOT / "results"
        assert parse(["--seeds", "0"]).out_dir == ROOT / "runs" / "partial"


def test_results_files_name_the_exact_command_and_the_machine(tiny_npz, tmp_path):
    argv = ["--npz", str(tiny_npz[0]), "--wB", "1", "--seeds", "0", "--epochs", "1",
            "--threads", "1", "--runs-dir", str(tmp_path), "--out-dir", str(tmp_path)]
    chapter("stage1_adult/04_mtml_tradeoff").main(argv)
    text = (tmp_path / "stage1_tradeoff.md").read_text()
    assert ("Command: `python stage1_adult/04_mtml_tradeoff.py " + " ".join(argv) + "`") in text
    assert "\nMachine: CPU " in text and f"torch {torch.__version__}" in text
    assert json.loads((tmp_path / "stage1_tradeoff" / "metrics.json").read_text())["command"]


# ------------------------------------------------------------- outputs that cannot be written
def out_argv(name, path):
    return ["--out", str(path / "a.npz")] if name == "stage1_adult/02_preprocess" else [
        "--runs-dir", str(path)]


@pytest.mark.parametrize("case", ["a file on the path", "a name over 255 bytes", "read-only"])
@pytest.mark.parametrize("name", list(CHAPTERS))
def test_unwritable_outputs_are_one_line_before_any_work(name, case, tmp_path, monkeypatch):
    blocker = tmp_path / "runs"
    blocker.write_text("a file, not a folder")
    path = {"a file on the path": blocker / "sub", "read-only": tmp_path / "ok",
            "a name over 255 bytes": tmp_path / ("n" * 300)}[case]
    if case == "read-only":  # root writes anywhere: make the folder refuse the probe file
        def refuse(*a, **kw):
            raise OSError(errno.EROFS, "Read-only file system")
        monkeypatch.setattr(common.tempfile, "mkstemp", refuse)
    msg = one_line_exit(chapter(name).main, out_argv(name, path))
    assert "cannot write here" in msg
    assert {"a file on the path": "a file stands where a folder", "read-only": "not writable",
            "a name over 255 bytes": "longer than the file system allows"}[case] in msg


def test_a_full_disk_at_the_end_is_one_line(tiny_adult, tiny_npz, tmp_path, monkeypatch):
    def full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(common.os, "replace", full)
    msg = one_line_exit(chapter("stage1_adult/02_preprocess").main,
                   ["--data-dir", str(tiny_adult), "--out", str(tmp_path / "a.npz"),
                    "--min-count", "3"])
    assert f"{tmp_path / 'a.npz'}: cannot write here: the disk is full" in msg
    msg = one_line_exit(chapter("stage1_adult/03_train_mtml").main,
                   ["--npz", str(tiny_npz[0]), "--epochs", "1", "--threads", "1", "--quiet",
                    "--runs-dir", str(tmp_path)])
    assert "metrics.json: cannot write here: the disk is full" in msg
    assert not list(tmp_path.rglob("*.tmp"))


# ----------------------------------------------------------------------- NaN is not a table
def test_a_nan_metric_is_an_error_line_not_a_table(tmp_path):
    out = tmp_path / "dot.md"
    msg = one_line_exit(chapter("stage2_ctr/04_can_an_mlp_multiply").main,
                   ["--ks", "4", "--rows-per-id", "8", "--widths", "8", "--ids", "20",
                    "--epochs", "2", "--lr", "1e12", "--threads", "1", "--out", str(out),
                    "--runs-dir", str(tmp_path)])
    assert "the test RMSE came out NaN or infinite for k 4, 8 rows per id, dot" in msg
    assert not out.exists()


def test_fit_stops_on_a_nan_loss_with_one_line_and_trains_on_the_given_device():
    torch.manual_seed(0)
    x = {"a": torch.randn(64, 3)}
    y = (torch.rand(64, 1) < 0.5).float()
    model = torch.nn.Sequential(torch.nn.Linear(3, 1))
    with pytest.raises(training.FitError, match="the training loss is nan at epoch 1"):
        training.fit(lambda_model(model), (x, y), (x, y), lambda z, t: z * float("nan"),
                     quiet=True, device="cpu")
    runs = []
    for device in (None, "cpu"):
        torch.manual_seed(0)
        m = lambda_model(torch.nn.Sequential(torch.nn.Linear(3, 1)))
        runs.append(training.fit(m, (x, y), (x, y), training.bce, epochs=2, quiet=True,
                                 device=device)["history"])
    assert runs[0] == runs[1]  # device "cpu" = where the model already was: the same run


def lambda_model(net):
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x["a"])
    return Model()


def test_require_finite_names_what_is_nan():
    common.require_finite({"a": [0.5, 0.7]}, "AUC")
    with pytest.raises(SystemExit, match="AUC came out NaN or infinite for b: no table"):
        common.require_finite({"a": 0.5, "b": [0.1, float("nan")]}, "AUC")


# ------------------------------------------------------------------------- other tracebacks
def test_summary_names_a_partial_metrics_file(tmp_path, capsys):
    run = tmp_path / "stage1_both_ple_tokens_wA1_wB1_s0"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps({"script": "stage1_adult/03_train_mtml.py",
                                                  "splits": {"val": {}}}))
    (tmp_path / "ctr_x").mkdir()
    (tmp_path / "ctr_x" / "metrics.json").write_text('{"model": "lr", "splits"')
    (tmp_path / "stage3_mtl_adult.json").write_text(json.dumps({"runs": [{"tasks": [1, 2]}]}))
    lines = load_script("summary.py").main(["--runs-dir", str(tmp_path), "--data-dir",
                                            str(tmp_path)])
    text = "\n".join(lines)
    assert "metrics.json lacks 'test'; rerun the command that wrote it" in text
    assert "ctr_x/metrics.json is not readable JSON (cut short?)" in text
    assert "stage3_mtl_adult.json lacks 'arch'; rerun" in text


@pytest.mark.parametrize("how, message", [
    ("extra column", "(300 of 300 rows have 16): an extra or missing column on every row?"),
    ("tabs", "(300 of 300 rows have 1): tab-separated? the UCI files separate fields with"),
])
def test_adult_with_an_extra_column_or_tabs_is_one_line(tmp_path, how, message):
    rows = (ROOT / "stage1_adult" / "data" / "adult.data").read_text().splitlines()[:300]
    rows = [r + ", extra" if how == "extra column" else r.replace(", ", "\t") for r in rows]
    (tmp_path / "adult.data").write_text("\n".join(rows) + "\n")
    with pytest.raises(adult_data.DataError, match="no row has the 15 comma-separated") as e:
        adult_data.read_adult(tmp_path / "adult.data")
    assert message in str(e.value)


def test_a_synthetic_set_with_an_empty_split_is_one_line_and_nothing_is_swapped_in(tmp_path):
    make = load_script("stage2_ctr/01_make_subset.py")
    msg = one_line_exit(make.main, ["--synthetic", "1", "--out-dir", str(tmp_path / "one"),
                               "--workers", "1"])
    assert "one: the train and test splits got no rows (1 rows in all); ask for more rows" in msg
    assert not (tmp_path / "one").exists() and not list(tmp_path.iterdir())
    make.main(["--synthetic", "300", "--out-dir", str(tmp_path / "set"), "--workers", "1"])
    before = {p.name: p.read_bytes() for p in (tmp_path / "set").iterdir()}
    msg = one_line_exit(make.main, ["--synthetic", "5", "--out-dir", str(tmp_path / "set"),
                               "--workers", "1"])
    assert "the test split got no rows (5 rows in all)" in msg
    assert {p.name: p.read_bytes() for p in (tmp_path / "set").iterdir()} == before
