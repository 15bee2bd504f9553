"""Stage 3, step 8: the sequence blocks against naive loops (padding and masked positions change
nothing, pooling and DIN ignore the order, BST does not), the DIN/DIEN file format (a file
written here trains end to end; one malformed line is counted exactly; unseen ids -> OOV),
MovieLens histories that never hold the row's own or a later rating, gAUC against a per-user
loop, the generator's oracle, and the chapter's --quick run."""
import json

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import ROOT, load_script
from sklearn.metrics import roc_auc_score

from stage2_ctr.models.history import HISTORY_MODELS, HistoryModel, HistorySchema
from stage2_ctr.models.layers import ActivationUnit, BehaviourTransformer, Dice, masked_pool
from stage3_advanced import behaviour, multi_interest

SCHEMA = HistorySchema(n_users=12, n_items=40, n_cats=9, max_len=8, n_side=3)


def batch(n=6, L=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([0, 1, 3, 5, 8, 6][:n])
    filled = torch.arange(L)[None, :] < lengths[:, None]
    ids = lambda hi: torch.randint(2, hi, (n, L), generator=g) * filled  # noqa: E731
    return {"user": torch.randint(1, 12, (n,), generator=g),
            "item": torch.randint(1, 40, (n,), generator=g),
            "cat": torch.randint(1, 9, (n,), generator=g), "hist_item": ids(40),
            "hist_cat": ids(9), "hist_side": torch.randint(1, 3, (n, L), generator=g) * filled}


def model_of(kind, seed=0):
    torch.manual_seed(seed)
    m = HistoryModel(SCHEMA, kind, emb_dim=4, mlp=(8,))
    with torch.no_grad():  # non-zero statistics, so BatchNorm / Dice are not the identity
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm1d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
    return m.eval()


# ----------------------------------------------------------------------- blocks vs loops
def test_masked_pool_and_din_unit_match_loops_and_ignore_masked_values():
    torch.manual_seed(0)
    h, t = torch.randn(4, 5, 6), torch.randn(4, 6)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0], [1, 0, 0, 0, 0]],
                        dtype=torch.bool)
    unit = ActivationUnit(6, hidden=7).eval()
    garbage = torch.where(mask.unsqueeze(-1), h, torch.randn(4, 5, 6) * 100)
    for b in range(4):
        rows = [h[b, j] for j in range(5) if mask[b, j]]
        total = sum(rows, torch.zeros(6))
        torch.testing.assert_close(masked_pool(h, mask, "sum")[b], total)
        torch.testing.assert_close(masked_pool(h, mask)[b], total / max(1, len(rows)))
        w = [unit.net(torch.cat([r, t[b], r - t[b], r * t[b]])[None])[0, 0] for r in rows]
        ref = sum((wj * r for wj, r in zip(w, rows)), torch.zeros(6))
        torch.testing.assert_close(unit(h, t, mask)[b], ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(unit(garbage, t, mask), unit(h, t, mask))
    torch.testing.assert_close(masked_pool(garbage, mask), masked_pool(h, mask))
    bst = BehaviourTransformer(6, max_len=5, heads=2).eval()
    torch.testing.assert_close(bst(garbage, t, mask), bst(h, t, mask), rtol=1e-5, atol=1e-5)


def test_dice_is_its_formula():
    dice = Dice(3).eval()
    with torch.no_grad():
        dice.norm.running_mean.copy_(torch.tensor([0.5, -1.0, 0.0]))
        dice.norm.running_var.copy_(torch.tensor([4.0, 1.0, 0.25]))
        dice.alpha.copy_(torch.tensor([0.1, 0.2, -0.3]))
    s = torch.randn(10, 3)
    p = torch.sigmoid((s - dice.norm.running_mean) / torch.sqrt(dice.norm.running_var + 1e-8))
    torch.testing.assert_close(dice(s), p * s + (1 - p) * dice.alpha * s)


@pytest.mark.parametrize("kind", HISTORY_MODELS)
def test_padding_length_and_masked_positions_change_nothing(kind):
    m, x = model_of(kind), batch()
    with torch.no_grad():
        ref = m(x)
        longer = {k: torch.cat([v, torch.zeros(len(v), 4, dtype=v.dtype)], 1) if v.dim() == 2
                  else v for k, v in x.items()}
        torch.testing.assert_close(m(longer), ref, rtol=1e-5, atol=1e-6)
        pad = x["hist_item"] == 0  # another category / side id behind the padding
        noisy = dict(x, hist_cat=torch.where(pad, 7, x["hist_cat"]),
                     hist_side=torch.where(pad, 2, x["hist_side"]))
        torch.testing.assert_close(m(noisy), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind, order_matters", [("base", False), ("pool", False),
                                                 ("din", False), ("bst", True)])
def test_only_the_order_aware_model_sees_the_order(kind, order_matters):
    m, x = model_of(kind), batch()
    n = (x["hist_item"] > 0).sum(1)
    rev = x.copy()
    for k in ("hist_item", "hist_cat", "hist_side"):  # reverse the filled part of every row
        v = x[k].clone()
        for b in range(len(v)):
            v[b, :n[b]] = v[b, :n[b]].flip(0)
        rev[k] = v
    with torch.no_grad():
        same = torch.allclose(m(rev), m(x), rtol=1e-5, atol=1e-6)
    assert same != order_matters


# ------------------------------------------------------------------------------- the format
def hand_rows(n=150, seed=0):
    """Sequence rows: clicks when the candidate's category is in the history."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        hist = [f"i{rng.integers(30)}" for _ in range(rng.integers(0, 6))]
        cats = [f"c{int(h[1:]) % 5}" for h in hist]
        item = f"i{rng.integers(30)}"
        cat = f"c{int(item[1:]) % 5}"
        out.append([str(int(cat in cats or rng.random() < 0.2)), f"u{i % 40}", item, cat,
                    "\x02".join(hist), "\x02".join(cats)])
    return ["\t".join(r) for r in out]


def write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_a_din_format_file_trains_end_to_end_and_one_bad_line_is_counted(tmp_path, capsys):
    lines = hand_rows(150)
    bad = lines[:40] + ["1\tu1\ti3\tc3\ti1\x02i2\tc1"] + lines[40:]  # 2 item ids, 1 category
    files = [write(tmp_path / "train.txt", bad), write(tmp_path / "val.txt", hand_rows(80, 1)),
             write(tmp_path / "test.txt", hand_rows(80, 2))]
    out = tmp_path / "files.md"
    chapter = load_script("stage3_advanced/08_user_history.py")
    result = chapter.main(["--train", files[0], "--val", files[1], "--test", files[2],
                           "--models", "base,din", "--seeds", "0", "--lrs", "0.01",
                           "--dropouts", "0", "--epochs", "2", "--max-lens", "4",
                           "--out", str(out), "--runs-dir", str(tmp_path / "runs")])
    said = capsys.readouterr().out
    assert f"{files[0]}: 1 bad line(s) skipped (first: line 41: hist_cat has another " \
           "length than hist_item)" in said
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["files_rows"] == {"train": 150, "val": 80, "test": 80}
    for name in ("base", "din"):
        test = saved["files"][name]["runs"][0]["test"]
        assert set(test) >= {"auc", "logloss", "gauc"} and 0 < test["logloss"] < 1
    assert result["files"]["din"]["runs"][0]["test"]["auc"] > 0.6  # the history is the signal
    assert "| din |" in out.read_text()


def test_too_many_bad_lines_is_one_line_and_exit_1(tmp_path):
    lines = hand_rows(50) + ["2\tu1\ti1\tc1\t\t"]  # label 2: 1 of 51 lines is over 1%
    path = write(tmp_path / "t.txt", lines)
    chapter = load_script("stage3_advanced/08_user_history.py")
    with pytest.raises(SystemExit) as e:
        chapter.main(["--train", path, "--val", path, "--test", path,
                      "--out", str(tmp_path / "x.md"), "--runs-dir", str(tmp_path)])
    assert str(e.value) == (f"error: {path}:51: label is not 0 or 1; 1 of 51 lines are bad "
                            "(over 1%): is this the DIN/DIEN sequence format (label, user, "
                            "item, category, item and category history joined by \\x02)?")


def test_unseen_ids_map_to_the_oov_row_and_the_latest_ids_are_kept(tmp_path):
    train = behaviour.read_rows(write(tmp_path / "a.txt", ["1\tu1\ti1\tc1\ti2\x02i3\tc2\x02c3"]))
    test = behaviour.read_rows(write(tmp_path / "b.txt",
                                     ["0\tu9\ti9\tc1\ti2\x02i8\x02i3\x02i1\tc2\x02c8\x02c3\x02c1"]))
    vocab = behaviour.fit_vocab(train)
    x, y = behaviour.encode(test, vocab, max_len=3)
    items = {i: vocab.lookup(vocab.items, [i])[0] for i in ["i1", "i2", "i3"]}
    assert x["user"].tolist() == [1] and x["item"].tolist() == [1]  # unseen -> OOV row 1
    assert x["hist_item"].tolist() == [[1, items["i3"], items["i1"]]]  # i2 (oldest) dropped
    assert y.tolist() == [0.0]


# ---------------------------------------------------------------- MovieLens and the metrics
def test_no_history_holds_its_own_or_a_later_rating():
    rng = np.random.default_rng(0)
    n = 400
    task = pd.DataFrame({"user_id": rng.integers(0, 7, n).astype(str),
                         "timestamp": rng.integers(0, 60, n),  # many ties within a user
                         "item_id": np.arange(n).astype(str), "genres": [("Drama",)] * n,
                         "label": rng.integers(0, 2, n).astype(np.float32)})
    idx = behaviour.movielens_histories(task, max_len=5)
    user, stamp = task["user_id"].to_numpy(), task["timestamp"].to_numpy()
    for i in range(n):  # the naive rule: the same user's 5 latest strictly earlier ratings
        earlier = [j for j in range(n) if user[j] == user[i] and stamp[j] < stamp[i]]
        earlier = sorted(earlier, key=lambda j: (stamp[j], j))[-5:]
        got = [j for j in idx[i] if j >= 0]
        assert got == earlier
        assert all(stamp[j] < stamp[i] and user[j] == user[i] for j in got)
    rows = behaviour.movielens_rows(task, idx)
    assert rows["hist_side"][7] == [str(int(task["label"][j])) for j in idx[7] if j >= 0]


def test_gauc_is_the_impression_weighted_mean_of_per_user_aucs():
    rng = np.random.default_rng(1)
    users, y, p = rng.integers(0, 30, 600), rng.integers(0, 2, 600), rng.random(600).round(2)
    users[:5], y[:5] = 99, 1  # a one-class user
    num = den = skipped = 0
    for u in np.unique(users):
        s = users == u
        if y[s].min() == y[s].max():
            skipped += 1
            continue
        num, den = num + s.sum() * roc_auc_score(y[s], p[s]), den + s.sum()
    got = behaviour.gauc(users, y, p)
    assert got["gauc"] == pytest.approx(num / den, abs=1e-12)
    assert got["skipped"] == skipped and got["users"] == len(np.unique(users)) - skipped


def test_generator_oracle_beats_the_oracle_without_history():
    for regime in multi_interest.REGIMES:
        rows, oracle, meta = multi_interest.generate(regime, 0, users=(300, 100, 200))
        assert meta["oracle"]["test_auc"] > meta["oracle_without_history"]["test_auc"] + 0.2
        assert set(rows["test"]["user"]).isdisjoint(rows["train"]["user"])  # split by user
        assert len(oracle["test"]) == len(rows["test"]) == 200 * 8


def test_quick_run_end_to_end(tmp_path):
    chapter = load_script("stage3_advanced/08_user_history.py")
    out = tmp_path / "q.md"
    result = chapter.main(["--quick", "--users", "300,100,150", "--epochs", "1",
                           "--out", str(out), "--runs-dir", str(tmp_path / "runs")])
    text = out.read_text()
    for name in ("base", "pool", "din", "bst", "oracle (the true p)"):
        assert f"| {name} |" in text
    assert "Command:" in text and "Machine:" in text and out.with_suffix(".png").exists()
    meta = json.loads((tmp_path / "runs" / "user_history" / "attention_seed0" /
                       "meta.json").read_text())
    runs = result["synthetic"]["attention"]["models"]
    assert all(r["runs"][0]["test"]["auc"] < meta["oracle"]["test_auc"] for r in runs.values())
    assert result["attention_example"]["candidates"][0]["weights"]
    assert str(chapter.parse_args([]).out).startswith(str(ROOT / "results"))
    assert str(chapter.parse_args(["--quick"]).out).startswith(str(ROOT / "runs" / "quick"))
