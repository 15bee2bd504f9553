"""The one-epoch chapter (stage2_ctr/08_one_epoch.py) and the trainer options it uses:
--reinit-emb resets exactly the embedding tables and their optimizer state, the optimizers of
--optimizer train, --evals-per-epoch places its validations, and the chapter runs end to end."""
import json

import pytest
import torch

from conftest import load_script
from stage2_ctr import one_epoch, synthetic
from stage2_ctr.models import build_model, criteo_schema
from stage2_ctr.train_ctr import TrainConfig, train
from stage2_ctr.training import make_optimizers, make_step, reset_embeddings


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on a shared CPU: a second intra-op thread only waits for the first."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _batch(n=64, bits=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 13, generator=g), torch.randint(0, 2 ** bits, (n, 26), generator=g),
            torch.randint(0, 2, (n,), generator=g).float())


@pytest.mark.parametrize("sparse", [True, False])
def test_reinit_resets_exactly_the_tables_and_their_optimizer_state(sparse):
    torch.manual_seed(0)
    model = build_model("deepfm", criteo_schema(10), emb_dim=4, mlp=(8,), sparse=sparse)
    opts = make_optimizers(model, 1e-2)
    step = make_step(model, opts)
    for s in range(3):
        step(*_batch(seed=s))
    tables = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Embedding)}
    assert len(tables) == 2  # the FM/deep part's table and the first-order weights
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = dict(model.named_parameters())
    states_before = {(i, id(p)): {k: (v.clone() if torch.is_tensor(v) else v) for k, v in
                                  o.state[p].items()} for i, o in enumerate(opts) for p in o.state}
    assert any(k[1] in {id(params[t]) for t in tables} for k in states_before)
    assert reset_embeddings(model, opts) == 2
    after = model.state_dict()
    for k in before:
        if k in tables:
            assert not torch.equal(before[k], after[k]), k
        else:
            assert torch.equal(before[k], after[k]), f"{k} changed"
    emb = next(v for k, v in after.items() if k in tables and v.shape[1] > 1)
    lin = next(v for k, v in after.items() if k in tables and v.shape[1] == 1)
    assert abs(emb.std().item() - 0.01) < 0.001 and torch.count_nonzero(lin) == 0
    table_ids = {id(params[k]) for k in tables}
    for i, o in enumerate(opts):
        for p in params.values():
            if id(p) in table_ids:
                assert p not in o.state, "a table kept its optimizer state"
            elif (i, id(p)) in states_before:
                kept = o.state[p]
                assert all(torch.equal(kept[k], v) if torch.is_tensor(v) else kept[k] == v
                           for k, v in states_before[(i, id(p))].items()), "state changed"
    step(*_batch(seed=9))  # and training goes on from there


@pytest.mark.parametrize("kind", ["adagrad", "sgd"])
def test_other_optimizers_lower_the_loss(kind):
    torch.manual_seed(0)
    model = build_model("deepfm", criteo_schema(10), emb_dim=4, mlp=(8,), sparse=True)
    step = make_step(model, make_optimizers(model, 0.05, kind=kind))
    batch = _batch(256)
    losses = [step(*batch).item() for _ in range(30)]
    assert losses[-1] < losses[0] - 0.05


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("oe") / "data"
    synthetic.make_synthetic(synthetic.SyntheticConfig(rows=5000, seed=0), folder)
    return folder


def test_trainer_evals_per_epoch_reinit_and_best_epoch(tiny, tmp_path, capsys):
    cfg = TrainConfig(model="deepfm", train=[str(tiny / "train.txt")], val=[str(tiny / "val.txt")],
                      test=[str(tiny / "test.txt")], epochs=2, batch_size=500, hash_bits=12,
                      mlp=(16,), emb_dim=4, evals_per_epoch=4, reinit_emb=True, patience=99,
                      num_workers=0, threads=1, runs_dir=str(tmp_path), run_name="r")
    m = train(cfg)
    out = capsys.readouterr().out
    h = m["history"]
    assert [x["step"] for x in h] == [2, 4, 6, 8, 10, 12, 14, 16]  # 8 batches per epoch
    assert [x["epoch"] for x in h] == [1] * 4 + [2] * 4
    assert [x["epoch_end"] for x in h] == [False, False, False, True] * 2
    assert m["best_epoch"] == next(x["epoch"] for x in h if x["step"] == m["best_step"])
    assert f"(epoch {m['best_epoch']} of the 2 run)" in out
    assert json.loads((tmp_path / "r" / "metrics.json").read_text())["best_epoch"] == \
        m["best_epoch"]
    pts = one_epoch.curve(h)
    assert [round(p[0], 2) for p in pts] == [0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0]
    s = one_epoch.shape_of(h)
    assert s["drop"] == pytest.approx(h[3]["val_auc"] - h[4]["val_auc"])


def test_chapter_quick_end_to_end(tmp_path, monkeypatch):
    import common
    from test_movielens import make_fixture
    ml = make_fixture(tmp_path / "ml", n_users=40, n_items=50, n_ratings=1500)
    monkeypatch.setattr(common, "RUNS", tmp_path / "runs")
    # each trainer run's own curves.png is not the chapter's output: half the test's time
    from stage2_ctr import train_ctr
    monkeypatch.setattr(train_ctr, "plot_curves", lambda history, path: None)
    chapter = load_script("stage2_ctr/08_one_epoch.py")
    parts = chapter.main(["--quick", "--data-dir", str(tmp_path / "d"), "--runs-dir",
                          str(tmp_path / "runs"), "--movielens-dir", str(ml)])
    text = (tmp_path / "runs" / "quick" / "stage2_one_epoch.md").read_text()
    for title in ["demo's data", "dot regime", "MovieLens", "What makes the drop", "probe",
                  "The fix"]:
        assert title in text, title
    assert (tmp_path / "runs" / "quick" / "stage2_one_epoch.png").stat().st_size > 1000
    assert len(parts["curves"]["deepfm"]) == 2 and len(parts["fix"]["deepfm"]["reinit"]) == 2
    assert "Machine: CPU" in text and "08_one_epoch.py --quick" in text


def test_summary_names_the_best_epoch_and_the_chapter(tmp_path):
    import summary
    run = tmp_path / "ctr_deepfm_s0"
    run.mkdir()
    history = [{"step": 79, "val_auc": 0.7864, "epoch": 1, "epoch_end": True},
               {"step": 158, "val_auc": 0.7491, "epoch": 2, "epoch_end": True}]
    (run / "metrics.json").write_text(json.dumps({
        "script": "stage2_ctr/train_ctr.py", "model": "deepfm", "device": "cpu",
        "splits": {"test": {"auc": 0.79, "logloss": 0.45}}, "train_samples_per_s": 1.0,
        "best_step": 79, "best_epoch": 1, "history": history}))
    lines = summary.main(["--runs-dir", str(tmp_path), "--data-dir", str(tmp_path)])
    line = next(x for x in lines if "best epoch" in x)
    assert "best epoch 1 of 2" in line and "0.7864 -> 0.7491" in line
    assert "stage2_ctr/08_one_epoch.py" in line


def test_reinit_refuses_tables_it_cannot_draw_afresh():
    model = torch.nn.Sequential(build_model("fm", criteo_schema(8), emb_dim=2),
                                torch.nn.Embedding(5, 2))
    with pytest.raises(ValueError, match="cannot be drawn afresh"):
        reset_embeddings(model, [])
