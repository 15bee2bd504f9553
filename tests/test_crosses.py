"""Stage 2's crosses: each planted regime's oracle against a naive per-row loop, the lowrank
generator pinned to its files before the regimes existed, the probe and the comparison end to
end in their quick modes."""
import hashlib
import itertools
import json

import numpy as np
import pytest
from conftest import load_script

from stage2_ctr import synthetic, train_ctr

make = load_script("stage2_ctr/01_make_subset.py")
# md5 of `01_make_subset.py --synthetic 3000 --workers 1` as written before the regimes existed
LOWRANK_MD5 = {"train.txt": "fba6c072872ad9b8d65b14a5936ec445",
               "val.txt": "059b7074d02eb36b0c16a85b6eec966e",
               "test.txt": "6ec95ba2c51e4e69d5f8a47fa4883c4f"}
# The oracle is float32 computed through numpy's exp and BLAS, whose last bits depend on the CPU's
# SIMD path and the numpy build (its md5 differed between two EPYCs): pinned by value instead.
LOWRANK_ORACLE = {"sum": 574.9407, "first": [0.3742804, 0.0367527, 0.0444808, 0.0902105]}


def test_lowrank_files_are_byte_identical_to_the_original_generator(tmp_path):
    make.main(["--synthetic", "3000", "--workers", "1", "--out-dir", str(tmp_path)])
    for name, md5 in LOWRANK_MD5.items():
        assert hashlib.md5((tmp_path / name).read_bytes()).hexdigest() == md5, name
    oracle = np.load(tmp_path / "train.oracle.npy")
    assert oracle.shape == (2371,)
    assert oracle.sum(dtype=np.float64) == pytest.approx(LOWRANK_ORACLE["sum"], abs=1e-3)
    assert oracle[:4] == pytest.approx(LOWRANK_ORACLE["first"], abs=1e-6)
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["generator"]["interactions"] == "lowrank"


def naive_logit_parts(m, ranks, z):
    """The planted parts, one row at a time, straight from the definitions."""
    out = []
    for r, x in zip(ranks, z):
        idx = [m.vocab[f] if r[f] < 0 else r[f] for f in range(26)]
        first = sum(m.w_cat[f][idx[f]] for f in range(26)) + sum(m.w_dense[j] * x[j]
                                                                  for j in range(13))
        if m.interactions == "lowrank":
            vecs = [m.v_cat[f][idx[f]] for f in m.pair_fields] + [m.v_dense[j] * x[j]
                                                                   for j in range(13)]
            pair = sum(float(a @ b) for a, b in itertools.combinations(vecs, 2))
            third = sum(m.gamma * m.e_cat[a][idx[a]] * m.e_cat[b][idx[b]] * m.e_cat[c][idx[c]]
                        for a, b, c in m.triples)
            out.append([first, pair, third])
        elif m.interactions == "dot":
            dot = sum(float(m.dot_vectors[a][idx[a]] @ m.dot_vectors[b][idx[b]])
                      for a, b in m.dot_pairs)
            out.append([first, dot])
        else:
            blocks = [m.fp_cat[f][idx[f]] for f in m.fp_fields] + [m.fp_dense[j] * x[j]
                                                                    for j in range(13)]
            d = synthetic.FIELDPAIR_DIM
            quad = sum(float(blocks[i] @ m.fp_matrix[i * d:(i + 1) * d, j * d:(j + 1) * d]
                             @ blocks[j]) for i, j in itertools.combinations(range(len(blocks)), 2))
            out.append([first, quad])
    return np.array(out)


@pytest.mark.parametrize("regime", synthetic.REGIMES)
def test_each_regimes_oracle_equals_a_naive_loop(regime):
    m = synthetic.ClickModel(3, interactions=regime)
    ranks, _, _, z = m.draw_features(np.random.default_rng(1), 40)
    parts = m.logit_parts(ranks, z)
    fast = np.stack([parts[k] for k in parts], 1)
    np.testing.assert_allclose(fast, naive_logit_parts(m, ranks, z), rtol=2e-4, atol=2e-4)
    if regime == "dot":  # the id fields draw only their DOT_VALUES values, equally often
        assert all(ranks[:, f].max() < synthetic.DOT_VALUES for f in m.dot_fields)
        side = np.setdiff1d(np.arange(26), m.dot_fields)
        assert (ranks[:, side] < 0).mean() > 0.8


def test_regime_meta_records_what_each_part_is_worth(tmp_path):
    meta = make.main(["--synthetic", "6000", "--workers", "1", "--interactions", "fieldpair",
                      "--out-dir", str(tmp_path)])
    test = meta["splits"]["test"]
    assert meta["generator"]["interactions"] == "fieldpair"
    assert set(test["oracle_auc_without"]) == {"first_order", "field_pair"}
    assert all(v < test["oracle_auc"][0] for v in test["oracle_auc_without"].values())


def test_the_probe_quick_mode_writes_its_table(tmp_path):
    probe = load_script("stage2_ctr/04_can_an_mlp_multiply.py")
    rows = probe.main(["--quick", "--out", str(tmp_path / "p.md"), "--runs-dir", str(tmp_path)])
    text = (tmp_path / "p.md").read_text()
    assert "best MLP - dot" in text and (tmp_path / "p.png").exists()
    assert {r["model"] for r in rows} == {"dot", "mlp 64", "mlp 256"}
    assert all(r["test_rmse"] >= r["floor"] - 0.05 for r in rows)  # nothing beats the truth


def test_compare_quick_covers_the_regimes_data_seeds_and_reads_runs_back(tmp_path):
    compare = load_script("stage2_ctr/03_compare_models.py")
    argv = ["--quick", "--rows", "6000", "--models", "fm,dnn", "--mlp", "16",
            "--parts", "models,hash_bits", "--jobs", "1", "--out-dir", str(tmp_path),
            "--data-dir", str(tmp_path), "--runs-dir", str(tmp_path)]
    compare.main(argv)
    table = (tmp_path / "stage2_models.md").read_text()
    assert "## dot" in table and "## fieldpair" in table and "expected: fm - dnn" in table
    assert "per data set" in table and "| model | data seed 0 | data seed 1 |" in table
    assert "What collisions cost" in table and "| 12 |" in table and "| 16 |" in table
    assert "read back" not in table and (tmp_path / "stage2_models.png").exists()
    assert "Machine: CPU" in table and "--quick --rows 6000" in table
    compare.main(argv)
    assert "10 of the 10 runs were read back" in (tmp_path / "stage2_models.md").read_text()
    compare.main(argv + ["--min-count", "5"])  # another config: trained again, not read back
    assert "read back" not in (tmp_path / "stage2_models.md").read_text()


def test_a_regenerated_data_set_or_a_broken_record_is_retrained(tmp_path):
    """Issue 19 item 10: the recorded data fingerprints must equal today's; a metrics.json
    without scores or history is not a finished run (no traceback)."""
    from stage2_ctr import compare
    data = tmp_path / "d"
    make.main(["--synthetic", "3000", "--workers", "1", "--out-dir", str(data)])
    cfg = train_ctr.TrainConfig(model="lr", train=[str(data / "train.txt")],
                                val=[str(data / "val.txt")], test=[str(data / "test.txt")],
                                num_workers=0, runs_dir=str(tmp_path), run_name="r")
    train_ctr.train(cfg, quiet=True)
    assert compare.finished_run(cfg) is not None
    make.main(["--synthetic", "3000", "--workers", "1", "--seed", "1", "--out-dir", str(data)])
    assert compare.finished_run(cfg) is None  # same config, other rows: trained again
    train_ctr.train(cfg, quiet=True)
    record = json.loads((tmp_path / "r" / "metrics.json").read_text())
    for broken in ({k: v for k, v in record.items() if k != "splits"}, {**record, "history": []}):
        (tmp_path / "r" / "metrics.json").write_text(json.dumps(broken))
        assert compare.finished_run(cfg) is None


def test_expected_wins_need_the_margin_and_three_seed_stds():
    compare = load_script("stage2_ctr/03_compare_models.py")
    rows = [{"model": "dnn", "auc": [0.80, 0.80, 0.80]}, {"model": "fm", "auc": [0.81, 0.81, 0.81]},
            {"model": "deepfm", "auc": [0.801, 0.803, 0.809]}]
    wins = compare.expected_wins("dot", rows)
    assert wins[0].startswith("fm - dnn = +0.0100") and wins[0].endswith("holds")
    assert wins[1].startswith("deepfm - dnn") and wins[1].endswith("does not hold")
