"""The click -> conversion funnel: the generator's funnel invariant and oracle, the reader's
bad-row rule, ESMM's loss against a per-row loop, and stage3_advanced/09_esmm.py end to end."""
import json
import math
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_script

from stage2_ctr import criteo, synthetic
from stage2_ctr.models import criteo_schema
from stage2_ctr.models.esmm import ESMM, CVRView, product_logit
from stage2_ctr.training import bce
from stage3_advanced import funnel

make = load_script("stage2_ctr/01_make_subset.py")


@pytest.fixture(scope="module")
def funnel_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("funnel")
    make.main(["--synthetic", "6000", "--workers", "1", "--tasks", "funnel", "--selection",
               "latent", "--ctr", "0.3", "--ctr2", "0.3", "--out-dir", str(out)])
    return out


def labels_of(path):
    return np.array([[int(v) for v in line.split("\t")[:2]]
                     for line in path.read_text().splitlines()])


def test_no_conversion_without_a_click_exactly(funnel_dir):
    y = np.concatenate([labels_of(funnel_dir / f"{s}.txt") for s in ["train", "val", "test"]])
    assert len(y) == 6000
    assert ((y[:, 1] == 1) & (y[:, 0] == 0)).sum() == 0
    assert 0.2 < y[:, 0].mean() < 0.4 and 0 < y[:, 1].sum() < y[:, 0].sum()
    meta = json.loads((funnel_dir / "meta.json").read_text())
    assert meta["columns"][:2] == ["label", "label2"]
    assert meta["funnel"]["label"] == "click"
    assert meta["funnel"]["oracle_columns"] == synthetic.FUNNEL_ORACLE


def test_oracle_pctcvr_is_pctr_times_pcvr_and_the_quadrature_is_right(funnel_dir):
    o = np.load(funnel_dir / "train.oracle.npy")
    assert o.shape[1] == 5 and o.dtype == np.float32
    assert np.array_equal(o[:, 2], o[:, 0] * o[:, 1])  # exactly, in float32
    # latent selection: the clicked rows convert more than E[pCVR | x] says, never less in mean
    assert o[:, 4].mean() > o[:, 3].mean() + 0.01
    # E[pCVR | x] and P(conv | x, click) against a Monte Carlo over u, for three rows
    gen = synthetic.Generator(synthetic.SyntheticConfig(rows=100, tasks="funnel", ctr=0.3,
                                                        ctr2=0.3, selection="latent"))
    s1 = np.array([-1.0, 0.5, 2.0], np.float32)
    own = np.array([0.3, -0.8, 1.2], np.float32)
    gen.model2 = OwnSignal(own)
    _, oracle = gen.funnel_rows(np.random.default_rng(1), s1, None, None)
    u = np.random.default_rng(0).standard_normal((200_000, 1))
    ctr = 1 / (1 + np.exp(-(s1 + gen.bias + gen.click_latent * u)))
    cvr = 1 / (1 + np.exp(-(gen._mix(s1, own) + gen.bias2 + gen.cfg.latent_std * u)))
    assert np.allclose(oracle[:, 3], cvr.mean(0), atol=3e-3)
    assert np.allclose(oracle[:, 4], (ctr * cvr).mean(0) / ctr.mean(0), atol=3e-3)


class OwnSignal:
    """A stand-in for the CVR's own click model: its signal fixed per row."""

    def __init__(self, own):
        self.own = own

    def logit_parts(self, ranks, z):
        return {"own": self.own}


def test_observables_selection_leaves_the_clicked_rows_unbiased():
    gen = synthetic.Generator(synthetic.SyntheticConfig(rows=100, tasks="funnel", ctr=0.05,
                                                        ctr2=0.05))
    o = gen.chunk(0, 2000)["oracle"]
    assert np.allclose(o[:, 3], o[:, 4], atol=1e-6)


def test_a_conversion_on_an_unclicked_row_is_a_counted_bad_row(funnel_dir, tmp_path):
    lines = (funnel_dir / "val.txt").read_text().splitlines(keepends=True)
    bad_at = next(i for i, line in enumerate(lines) if line.startswith("0\t0\t"))
    lines[bad_at] = "0\t1\t" + lines[bad_at][4:]
    path = tmp_path / "val.txt"
    path.write_text("".join(lines))
    stream = criteo.CriteoStream([path], 256, 12, n_labels=2, funnel=True)
    rows = sum(len(b[0]) for b in stream)
    assert rows == len(lines) - 1 and stream.stats["bad_rows"] == 1
    first = stream.stats["files"][str(path)]["first_bad"]
    assert first == [f"line {bad_at + 1}: conversion (label2) on an unclicked row"]
    plain = criteo.CriteoStream([path], 256, 12, n_labels=2)  # not a funnel file: a valid row
    assert sum(len(b[0]) for b in plain) == len(lines) and plain.stats["bad_rows"] == 0


def test_esmm_loss_equals_a_naive_loop_on_a_tiny_batch():
    torch.manual_seed(0)
    for under, kw in [("towers", {}), ("mmoe", dict(width=8, n_experts=2)),
                      ("ple", dict(width=8, n_shared=1, n_specific=1))]:
        model = ESMM(criteo_schema(8), 4, under, tower=(8,), **kw).eval()
        dense, sparse = torch.randn(6, 13), torch.randint(0, 256, (6, 26))
        y = torch.tensor([[1, 1], [1, 0], [0, 0], [0, 0], [1, 1], [0, 0]], dtype=torch.float32)
        loss = bce(model(dense, sparse), y).mean(0).sum()  # what training.fit minimizes
        ctr_logit, cvr_logit = model.ctr_cvr_logits(dense, sparse).double().T
        naive = 0.0
        for a, b, (click, buy) in zip(ctr_logit.tolist(), cvr_logit.tolist(), y.tolist()):
            pctr, pcvr = 1 / (1 + math.exp(-a)), 1 / (1 + math.exp(-b))
            pctcvr = pctr * pcvr
            naive -= click * math.log(pctr) + (1 - click) * math.log(1 - pctr)
            naive -= buy * math.log(pctcvr) + (1 - buy) * math.log(1 - pctcvr)
        assert loss.item() == pytest.approx(naive / len(y), rel=1e-5)
        assert torch.allclose(CVRView(model)(dense, sparse), cvr_logit.float())


def test_product_logit_is_stable_at_the_extremes():
    a = torch.tensor([-40.0, -5.0, 0.0, 3.0, 40.0], dtype=torch.float64)
    b = torch.tensor([-40.0, 2.0, 0.0, 3.0, 40.0], dtype=torch.float64)
    out = product_logit(a, b)
    assert torch.isfinite(out).all()
    assert torch.allclose(torch.sigmoid(out)[:4], (torch.sigmoid(a) * torch.sigmoid(b))[:4],
                          rtol=1e-6)


def test_the_esmm_chapter_quick_end_to_end(tmp_path):
    chapter = load_script("stage3_advanced/09_esmm.py")
    out = tmp_path / "out" / "esmm.md"
    chapter.main(["--quick", "--make-data", "--rows", "12000", "--regimes", "observables",
                  "--seeds", "0", "--data-root", str(tmp_path / "data"),
                  "--out", str(out), "--runs-dir", str(tmp_path / "runs"), "--threads", "1"])
    text = out.read_text()
    for what in ["## observables", "| esmm |", "| esmm_ple |", "| naive_cvr |",
                 "| best from x |", "## Summary", "| observables, rho 0 |",
                 "| observables, pCTR 0.01 |", "| observables, 0.25 of the impressions |",
                 "Machine: "]:
        assert what in text, what
    assert out.with_suffix(".png").stat().st_size > 10_000
    res = json.loads((tmp_path / "runs" / "esmm_out.json").read_text())
    run = res["results"]["observables"]["0"]["runs"][0]
    assert set(run) == set(chapter.MODELS)
    assert all(0 < run[m]["cvr_auc_entire"] < 1 for m in run if m != "naive_product")
    assert set(run["naive_product"]) == {"ctcvr_auc_entire"}  # its pCVR is naive_cvr's
    # each model against ESMM on the same data set and seeds: CVR, naive_product's CTCVR
    runs = res["results"]["observables"]["0"]["runs"]
    for m, key in [("esmm_ple", "cvr_auc_entire"), ("naive_product", "ctcvr_auc_entire")]:
        diff = np.mean([r[m][key] - r["esmm"][key] for r in runs])
        assert f"| {m} | {key[:-11].upper()} | {diff:+.4f} | {diff:+.4f} |" in text


def test_a_model_scores_the_same_whatever_ran_before_it(funnel_dir):
    """Each model is seeded before it is built: a cell of the results file is reproduced by a
    partial run, whichever jobs ran before it in the full one."""
    chapter = load_script("stage3_advanced/09_esmm.py")
    args = chapter.parse_args(["--quick", "--hash-bits", "12", "--threads", "1"])
    data = funnel.load_funnel(funnel_dir, 12)
    alone = chapter.run_models(args, data, 0, ["naive_cvr"], "alone")
    chapter.run_models(args, data, 1, ["esmm"], "before")
    assert chapter.run_models(args, data, 0, ["naive_cvr"], "after") == alone


def test_a_broken_funnel_data_set_is_one_line(funnel_dir, tmp_path):
    cfg = dict(selection="latent", ctr=0.3, ctr2=0.3, latent_std=2.0, task_corr=0.5,
               cvr_relation="shared")
    folder = funnel.folder_of(tmp_path, 6000, 0, cfg)
    shutil.copytree(funnel_dir, folder)
    oracle = np.load(folder / "val.oracle.npy")
    np.save(folder / "val.oracle.npy", oracle[:-3])
    with pytest.raises(criteo.CriteoFormatError, match=r"val\.oracle\.npy: shape"):
        funnel.load_funnel(folder, 12)
    (folder / "train.txt").unlink()
    with pytest.raises(SystemExit, match="train.txt not found"):
        funnel.ensure_data(tmp_path, 6000, 0, cfg)


def test_the_chapter_names_each_world_and_the_command_that_makes_it(tmp_path):
    """rho's sign picks the CVR relation; a missing data set's message is a command that
    regenerates exactly the files --make-data would write."""
    chapter = load_script("stage3_advanced/09_esmm.py")
    args = chapter.parse_args(["--rows", "2000"])
    cfg = chapter.world(args, "latent", rho=-0.5, ctr=0.01)
    assert (cfg["cvr_relation"], cfg["task_corr"], cfg["ctr"]) == ("opposite", 0.5, 0.01)
    assert chapter.world(args, "observables", rho=0.0)["cvr_relation"] == "independent"
    assert chapter.world(args, "observables")["task_corr"] == 0.9
    with pytest.raises(SystemExit) as stop:
        funnel.ensure_data(tmp_path / "a", 2000, 3, cfg)
    command = shlex.split(str(stop.value).split("`")[1])
    assert command[:2] == ["python", "stage2_ctr/01_make_subset.py"]
    make.main(command[2:] + ["--workers", "1"])
    made = funnel.ensure_data(tmp_path / "b", 2000, 3, cfg, make=True)
    given = Path(command[command.index("--out-dir") + 1])
    assert given.name == made.name
    for name in ["train.txt", "test.txt", "test.oracle.npy"]:
        assert (given / name).read_bytes() == (made / name).read_bytes(), name
