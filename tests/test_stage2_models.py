"""Stage 2 models and trainer: the layer math against naive loops, overfitting, sparse
gradients, resume, DDP, bad flags."""
import itertools
import json

import pytest
import torch
from conftest import ROOT, load_script, torchrun

from stage2_ctr import train_ctr
from stage2_ctr.models import MODELS, build_model
from stage2_ctr.models.layers import CrossLayerV1, CrossLayerV2, fm_interaction
from stage2_ctr.models.optim import RowSparseAdam, distinct_rows
from stage2_ctr.training import make_optimizers

make = load_script("stage2_ctr/01_make_subset.py")


def test_fm_identity_equals_the_explicit_pairwise_sum():
    emb = torch.randn(5, 7, 3, dtype=torch.float64)
    naive = torch.zeros(5, dtype=torch.float64)
    for i, j in itertools.combinations(range(7), 2):
        naive += (emb[:, i] * emb[:, j]).sum(-1)
    assert torch.allclose(fm_interaction(emb), naive)


def test_cross_layers_equal_their_formulas():
    torch.manual_seed(0)
    x0, x = torch.randn(4, 6), torch.randn(4, 6)
    v1 = CrossLayerV1(6)
    with torch.no_grad():
        v1.b.normal_()
    expected = torch.stack([x0[n] * sum(x[n, k] * v1.w[k] for k in range(6)) + v1.b + x[n]
                            for n in range(4)])
    assert torch.allclose(v1(x0, x), expected, atol=1e-6)
    v2 = CrossLayerV2(6)
    W, b = v2.linear.weight, v2.linear.bias
    expected = torch.stack([torch.stack([x0[n, i] * (sum(W[i, k] * x[n, k] for k in range(6))
                                                     + b[i]) + x[n, i] for i in range(6)])
                            for n in range(4)])
    assert torch.allclose(v2(x0, x), expected, atol=1e-6)


def tiny_batch(n=64, bits=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 13, generator=g), torch.randint(0, 2 ** bits, (n, 26), generator=g),
            torch.randint(0, 2, (n,), generator=g).float())


@pytest.mark.parametrize("name", list(MODELS))
def test_each_model_shape_and_overfits_64_rows(name):
    torch.manual_seed(0)
    dense, sparse, label = tiny_batch()
    model = build_model(name, 2 ** 10, emb_dim=8, mlp=[32, 32], cross_layers=2)
    assert model(dense, sparse).shape == (64,)
    opt = torch.optim.Adam(model.parameters(), lr=0.01 if name != "lr" else 0.1)
    for _ in range(300):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(dense, sparse), label)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05, f"{name} did not overfit 64 rows: loss {loss.item():.3f}"


def test_sparse_gradients_touch_only_the_rows_used():
    dense, sparse, label = tiny_batch(8)
    model = build_model("deepfm", 2 ** 10, emb_dim=4, mlp=[8], sparse=True)
    torch.nn.functional.binary_cross_entropy_with_logits(model(dense, sparse), label).backward()
    grad = model.embedding.table.weight.grad
    assert grad.is_sparse
    touched = set(grad.coalesce().indices()[0].tolist())
    assert touched == set(sparse.flatten().tolist())
    before = model.embedding.table.weight.detach().clone()
    opts = make_optimizers(model, 1e-3)
    for o in opts:
        o.step()
    changed = (model.embedding.table.weight != before).any(1).nonzero().flatten().tolist()
    assert set(changed) == touched


def test_distinct_rows_finds_each_id_once_without_sorting():
    ids = torch.tensor([7, 3, 7, 7, 0, 3, 9])
    rows, where = distinct_rows(ids, torch.empty(10, dtype=torch.int64))
    assert sorted(rows.tolist()) == [0, 3, 7, 9]
    assert torch.equal(rows[where], ids)


@pytest.mark.parametrize("coalesce", [False, True])
def test_row_sparse_adam_matches_torch_sparse_adam(coalesce):
    """Same update as torch.optim.SparseAdam: a k=16 table and a one-column table looked up with
    the same ids (the shared-dedupe path), repeated ids, and a table with no gradient."""
    torch.manual_seed(0)
    ours = [torch.nn.Embedding(50, 16, sparse=True), torch.nn.Embedding(50, 1, sparse=True),
            torch.nn.Embedding(50, 4, sparse=True)]
    ref = [torch.nn.Embedding(50, e.embedding_dim, sparse=True) for e in ours]
    for a, b in zip(ours, ref):
        b.weight.data.copy_(a.weight.data)
    initial = ours[0].weight.detach().clone()
    opt_ours = RowSparseAdam([e.weight for e in ours], lr=0.05)
    opt_ref = torch.optim.SparseAdam([e.weight for e in ref], lr=0.05)
    for step in range(15):
        ids = torch.randint(0, 12, (32, 5))  # few distinct ids: many repeats per batch
        target = torch.randn(32, 5, 16)
        for tables, opt in ((ours, opt_ours), (ref, opt_ref)):
            opt.zero_grad()
            loss = ((tables[0](ids) - target) ** 2).sum() + tables[1](ids).pow(3).sum()
            loss.backward()
            if coalesce:  # what DDP's all-reduce may hand over
                for e in tables[:2]:
                    e.weight.grad = e.weight.grad.coalesce()
            opt.step()
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.weight, b.weight, rtol=1e-5, atol=1e-6)
    moved = (ours[0].weight != initial).any(1)
    assert moved[:12].all() and not moved[12:].any()  # the ids used, and only those
    assert torch.equal(ours[2].weight, ref[2].weight)  # no gradient: untouched


def test_row_sparse_adam_rejects_dense_gradients():
    table = torch.nn.Embedding(10, 2)
    table(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse=True"):
        RowSparseAdam([table.weight]).step()


@pytest.fixture(scope="module")
def ctr_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("ctr")
    make.main(["--synthetic", "6000", "--out-dir", str(out), "--workers", "1"])
    return out


def ctr_argv(data, tmp_path, *extra):
    return ["--train", str(data / "train.txt"), "--val", str(data / "val.txt"), "--test",
            str(data / "test.txt"), "--batch-size", "256", "--hash-bits", "12", "--emb-dim", "4",
            "--mlp", "16,16", "--runs-dir", str(tmp_path), "--num-workers", "0", "--quiet",
            "--threads", "1", *extra]


@pytest.mark.parametrize("model", ["lr", "fm", "dnn", "deepfm", "dcn", "dcnv2"])
def test_train_ctr_end_to_end(ctr_data, tmp_path, model):
    m = train_ctr.main(ctr_argv(ctr_data, tmp_path, "--model", model, "--run-name", "r",
                               "--epochs", "3", "--lr", "0.01", "--patience", "3"))
    saved = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert saved["splits"]["test"]["rows"] == len(open(ctr_data / "test.txt").readlines())
    test = saved["splits"]["test"]
    # 3 epochs on 4.8k rows: every model learns (test AUC 0.62-0.65 measured, oracle 0.87; a
    # model that learns nothing scores ~0.5), and the gap is the oracle's AUC minus the model's
    assert test["auc"] > 0.58
    assert test["auc_gap_to_oracle"] == pytest.approx(test["oracle"]["auc"] - test["auc"])
    for key in ["train_samples_per_s", "parameters", "peak_rss_mb", "wall_s", "config"]:
        assert key in saved
    assert (tmp_path / "r" / "curves.png").exists() and m["steps"] > 0


def test_resume_reproduces_an_uninterrupted_run(ctr_data, tmp_path):
    base = ctr_argv(ctr_data, tmp_path, "--model", "deepfm", "--epochs", "2", "--dropout",
                    "0.1", "--ckpt-every", "5", "--shuffle-buffer", "1000")
    full = train_ctr.main(base + ["--run-name", "full"])
    # "kill" after 12 steps: run with --max-steps 12, then resume to the end
    train_ctr.main(base + ["--run-name", "cut", "--max-steps", "12", "--patience", "99"])
    assert json.loads((tmp_path / "cut" / "metrics.json").read_text())["steps"] == 12
    (tmp_path / "cut" / "best.pt").unlink()
    ckpt = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    assert ckpt["state"]["step"] == 10  # the last checkpoint before the kill
    resumed = train_ctr.main(base + ["--run-name", "cut", "--resume"])
    assert resumed["steps"] == full["steps"]
    assert resumed["splits"]["test"]["auc"] == pytest.approx(full["splits"]["test"]["auc"],
                                                             abs=1e-6)


def test_two_process_ddp_matches_single_process(ctr_data, tmp_path):
    # same global batch (2 ranks x 256 = 512) and steps; the ranks read disjoint halves
    argv = ctr_argv(ctr_data, tmp_path, "--model", "lr", "--epochs", "6", "--lr", "0.02",
                    "--patience", "6")
    single = train_ctr.main(argv + ["--run-name", "single", "--batch-size", "512"])
    runs = ["ddp", "ddp_again"]  # the second only after a native crash (conftest.torchrun)
    torchrun(ROOT / "stage2_ctr/train_ctr.py", lambda k: argv + ["--run-name", runs[k]])
    ddp = next(json.loads((tmp_path / r / "metrics.json").read_text()) for r in runs[::-1]
               if (tmp_path / r / "metrics.json").exists())
    assert ddp["world_size"] == 2
    assert ddp["splits"]["test"]["rows"] == single["splits"]["test"]["rows"]  # gathered
    assert single["splits"]["test"]["auc"] > 0.6
    assert abs(ddp["splits"]["test"]["auc"] - single["splits"]["test"]["auc"]) < 0.02


@pytest.mark.parametrize("argv, message", [
    (["--model", "xgboost"], "invalid choice"),
    (["--batch-size", "0"], "--batch-size: must be an integer >= 1, got '0'"),
    (["--hash-bits", "64"], "--hash-bits: must be in [1, 30]"),
    (["--mlp", "4OO"], "--mlp: must be comma-separated layer sizes"),
    (["--dropout", "1.5"], "--dropout: must be a probability in [0, 1)"),
])
def test_bad_flags_are_argparse_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        train_ctr.parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_missing_data_is_one_line(tmp_path):
    with pytest.raises(SystemExit) as e:
        train_ctr.main(["--train", str(tmp_path / "none.txt"), "--runs-dir", str(tmp_path),
                       "--quiet"])
    assert "none.txt" in str(e.value) and "01_make_subset.py" in str(e.value)


def test_throughput_bench_runs_ours_from_every_input_path(ctr_data, tmp_path):
    load_script("stage2_ctr/06_bench_throughput.py").main(
        ["--parts", "train", "--skip-others", "--rows", "2048", "--repeats", "1",
         "--batch-sizes", "256", "--threads", "1", "--file", str(ctr_data / "train.txt"),
         "--out-dir", str(tmp_path), "--runs-dir", str(tmp_path)])
    table = (tmp_path / "stage2_throughput.md").read_text()
    assert "| ours |" in table and "torch SparseAdam" in table and "dense table" in table
    for source in ("from disk", "binary cache", "preloaded"):
        assert f"| ours, {source} |" in table
    assert "matmul peak" in table and "of ours in memory" in table


def test_loader_bench_compares_with_pandas_in_the_same_run(ctr_data, tmp_path):
    results = load_script("stage2_ctr/06_bench_throughput.py").main(
        ["--parts", "loader", "--file", str(ctr_data / "train.txt"), "--loader-repeats", "1",
         "--out-dir", str(tmp_path), "--runs-dir", str(tmp_path)])["loader"]
    assert {"pandas", "loader workers=0", "loader workers=2 group=8"} <= set(results)
    rows = {r["rows"] for r in results.values()}
    assert rows == {len(open(ctr_data / "train.txt").readlines())}  # every reader read it all
    assert (tmp_path / "bench_loader" / "metrics.json").exists()
    assert "vs pandas" in (tmp_path / "stage2_loader.md").read_text()


def test_precision_bench_reports_both_precisions_against_their_own_peak(tmp_path):
    load_script("stage2_ctr/06_bench_throughput.py").main(
        ["--parts", "precision", "--precision-rows", "1024", "--precision-batch-sizes", "512",
         "--precision-repeats", "1", "--threads", "1", "--out-dir", str(tmp_path),
         "--runs-dir", str(tmp_path)])
    table = (tmp_path / "stage2_precision.md").read_text()
    for model in ("dnn", "deepfm", "dcnv2"):
        assert f"| {model} | 512 |" in table
    assert "fp32" in table and "bf16" in table and "share of the bf16 peak" in table
    assert (tmp_path / "bench_precision" / "metrics.json").exists()
