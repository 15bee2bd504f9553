"""MovieLens-100k: both file layouts read into the same frame, the click protocol, the genre bag
against a naive loop, every model on the MovieLens schema, the chapter end to end on a tiny
fixture made here (no download), and each bad input as one line."""
import hashlib

import numpy as np
import pytest
import torch
from conftest import ROOT, load_script

from stage2_ctr import movielens
from stage2_ctr.models import MODELS, build_model
from stage2_ctr.models.layers import FieldSchema, FeatureEmbedding

chapter = load_script("stage2_ctr/05_movielens.py")
GENRES = movielens.GENRES


def make_fixture(folder, n_users=30, n_items=40, n_ratings=900, seed=0, layout="recbole"):
    """A tiny MovieLens in either layout, from the same random draw (item 7 is the "unkonwn"
    movie with genre unknown; titles have commas, parentheses and non-ASCII letters)."""
    g = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    users = [(u, int(g.integers(18, 60)), "MF"[u % 2], ["student", "other"][u % 3 == 0],
              f"{10000 + u}") for u in range(1, n_users + 1)]
    items = []
    for i in range(1, n_items + 1):
        genres = ["unknown"] if i == 7 else list(g.choice(GENRES[1:], int(g.integers(1, 4)),
                                                         replace=False))
        items.append((i, "unkonwn" if i == 7 else f"Café, the (part {i})",
                      "unkonwn" if i == 7 else str(1980 + i % 20), genres))
    pairs = g.choice(n_users * n_items, n_ratings, replace=False)  # one rating per pair
    inter = [(int(q // n_items) + 1, int(q % n_items) + 1, int(g.integers(1, 6)), 880000000 + k)
             for k, q in enumerate(pairs)]
    if layout == "recbole":
        (folder / "ml-100k.inter").write_text("user_id:token\titem_id:token\trating:float\t"
                                              "timestamp:float\n" + "".join(
                                                  f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in inter))
        (folder / "ml-100k.user").write_text("user_id:token\tage:token\tgender:token\t"
                                             "occupation:token\tzip_code:token\n" + "".join(
                                                 f"{u}\t{a}\t{s}\t{o}\t{z}\n"
                                                 for u, a, s, o, z in users))
        (folder / "ml-100k.item").write_text("item_id:token\tmovie_title:token_seq\t"
                                             "release_year:token\tclass:token_seq\n" + "".join(
                                                 f"{i}\t{t}\t{y}\t{' '.join(gs)}\n"
                                                 for i, t, y, gs in items))
    else:
        (folder / "u.data").write_text("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in inter))
        (folder / "u.user").write_text("".join(f"{u}|{a}|{s}|{o}|{z}\n" for u, a, s, o, z in
                                               users))
        lines = []
        for i, t, y, gs in items:
            date = "" if y == "unkonwn" else f"01-Jan-{y}"
            flags = "|".join("1" if x in gs else "0" for x in GENRES)
            lines.append(f"{i}|{t} ({y})|{date}||http://x/{i}|{flags}\n")
        (folder / "u.item").write_bytes("".join(lines).encode("latin-1"))
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_fixture(tmp_path_factory.mktemp("ml") / "recbole")


def test_both_layouts_read_into_the_same_frame(tmp_path):
    a = movielens.read_frame(make_fixture(tmp_path / "a", layout="recbole"))
    b = movielens.read_frame(make_fixture(tmp_path / "b", layout="grouplens"))
    assert list(a.columns) == list(b.columns) and len(a) == len(b) == 900
    for col in ["user_id", "item_id", "rating", "timestamp", "age", "gender", "occupation",
                "zip_code", "release_year"]:
        assert a[col].tolist() == b[col].tolist(), col
    assert [sorted(x) for x in a["genres"]] == [sorted(x) for x in b["genres"]]
    unknown = a[a["item_id"] == "7"]
    assert set(unknown["release_year"]) <= {"unkonwn"} and all(
        g == ("unknown",) for g in unknown["genres"])


def test_click_protocol_drops_rating_three(tiny):
    frame = movielens.read_frame(tiny)
    task = movielens.click_task(frame)
    assert len(task) == (frame["rating"] != 3).sum()
    assert (task["label"] == (task["rating"] >= 4)).all() and 3 not in set(task["rating"])
    idx = movielens.split(task, "random", seed=0)
    assert sorted(np.concatenate(list(idx.values()))) == list(range(len(task)))
    by_time = movielens.split(task, "time")
    assert task["timestamp"].iloc[by_time["train"]].max() <= task["timestamp"].iloc[
        by_time["test"]].min()


def test_genre_bag_is_the_mean_of_its_rows():
    schema = FieldSchema(n_dense=0, n_sparse=2, n_buckets=20, bags=(3,))
    emb = FeatureEmbedding(schema, 4)
    sparse = torch.tensor([[1, 5, 10, 11, -1], [2, 6, 12, -1, -1], [3, 7, -1, -1, -1]])
    out = emb(torch.zeros(3, 0), sparse)
    table = emb.table.weight
    for r in range(3):
        ids = [i for i in sparse[r, 2:].tolist() if i >= 0]
        naive = sum(table[i] for i in ids) / len(ids) if ids else torch.zeros(4)
        assert torch.allclose(out[r, 2], naive, atol=1e-6)
        assert torch.allclose(out[r, 0], table[sparse[r, 0]])


@pytest.mark.parametrize("name", MODELS)
def test_every_model_runs_on_the_movielens_schema(tiny, name):
    task = movielens.click_task(movielens.read_frame(tiny))
    sparse, y, schema, _ = movielens.encode(task, movielens.split(task))
    model = build_model(name, schema, emb_dim=4, mlp=(8,), cross_layers=1)
    logits = model(torch.zeros(7, 0), torch.from_numpy(sparse[:7]))
    assert logits.shape == (7,) and torch.isfinite(logits).all()
    assert schema.n_fields == 8 and sparse.shape[1] == 7 + movielens.MAX_GENRES


def test_chapter_quick_end_to_end_on_a_fixture(tiny, tmp_path):
    argv = ["--quick", "--data-dir", str(tiny), "--out", str(tmp_path / "m.md"),
            "--runs-dir", str(tmp_path), "--epochs", "2"]
    chapter.main(argv)
    text = (tmp_path / "m.md").read_text()
    assert "| deepfm |" in text and (tmp_path / "m.png").exists()
    assert (tmp_path / "m.json").exists()
    assert "Command: `python stage2_ctr/05_movielens.py --quick --data-dir " in text
    assert "--epochs 2`" in text and "\nMachine: CPU " in text and "torch " in text


def one_line(argv):
    with pytest.raises(SystemExit) as e:
        chapter.main(argv)
    msg = str(e.value.code)
    assert msg.startswith("error: ") and "\n" not in msg
    return msg


@pytest.mark.parametrize("layout", ["recbole", "grouplens"])
def test_bad_input_is_one_line(tmp_path, layout, capsys):
    inter = "ml-100k.inter" if layout == "recbole" else "u.data"
    folder = make_fixture(tmp_path / "m", layout=layout)
    (folder / inter).unlink()
    assert "not found" in one_line(["--quick", "--data-dir", str(folder)])
    assert "--fetch" in one_line(["--quick", "--data-dir", str(folder)])
    folder = make_fixture(tmp_path / "t", layout=layout)
    text = (folder / inter).read_text()
    (folder / inter).write_text(text[: len(text) // 2].rsplit("\t", 1)[0])  # cut mid-line
    assert f"{inter}:" in one_line(["--quick", "--data-dir", str(folder)])
    folder = make_fixture(tmp_path / "r", layout=layout)
    lines = (folder / inter).read_text().splitlines()
    k = 5  # line 6 of the file in both layouts (recbole's line 1 is its typed header)
    fields = lines[k].split("\t")
    fields[2] = "four"
    lines[k] = "\t".join(fields)
    (folder / inter).write_text("\n".join(lines) + "\n")
    msg = one_line(["--quick", "--data-dir", str(folder)])
    assert f"{inter}:6: rating 'four' is not 1-5" in msg


def test_md5_mismatch_is_a_warning(tiny, monkeypatch):
    warnings = movielens.md5_warnings(tiny)
    assert len(warnings) == 3 and all("differs from the file in recbole" in w for w in warnings)
    same = {name: hashlib.md5((tiny / name).read_bytes()).hexdigest() for name in movielens.MD5}
    monkeypatch.setattr(movielens, "MD5", same)
    assert movielens.md5_warnings(tiny) == []


# ------------------------------------------------ issue 19: repeated lines, bad rows, one line
def edit(path, fn):
    """Rewrite a fixture file through fn(list of lines) -> list of lines."""
    lines = path.read_text(encoding="latin-1").splitlines()
    path.write_bytes(("\n".join(fn(lines)) + "\n").encode("latin-1"))


@pytest.mark.parametrize("layout", ["recbole", "grouplens"])
def test_repeated_lines_keep_the_first_and_are_counted(tmp_path, layout):
    folder = make_fixture(tmp_path / "m", layout=layout)
    names = {"recbole": ("ml-100k.user", "ml-100k.inter"), "grouplens": ("u.user", "u.data")}
    user, inter = (folder / n for n in names[layout])
    head = 1 if layout == "recbole" else 0
    sep = "\t" if layout == "recbole" else "|"
    edit(user, lambda ls: ls + [ls[head]] + [ls[head + 1].replace(f"{sep}M{sep}", f"{sep}F{sep}")
                                             .replace(f"{sep}F{sep}", f"{sep}M{sep}", 0)])
    first = inter.read_text().splitlines()[head]
    edit(inter, lambda ls: ls + ls[head:head + 3] + [first])  # 4 repeated ratings
    said = []
    frame = movielens.read_frame(folder, say=said.append)
    assert len(frame) == 900  # a repeated user line no longer doubles his ratings
    assert any(f"{user}: 2 repeated user id line(s) dropped" in s for s in said), said
    assert any(f"{inter}: 4 repeated rating line(s) dropped" in s and "line 902" in s
               if layout == "recbole" else f"{inter}: 4 repeated rating" in s for s in said)
    assert frame.duplicated(["user_id", "item_id"]).sum() == 0


@pytest.mark.parametrize("layout", ["recbole", "grouplens"])
def test_a_non_numeric_timestamp_is_a_bad_row_with_its_line(tmp_path, layout):
    folder = make_fixture(tmp_path / "m", layout=layout)
    inter = folder / ("ml-100k.inter" if layout == "recbole" else "u.data")

    def stamp(ls):
        for k in (5, 9):
            f = ls[k].split("\t")
            ls[k] = "\t".join(f[:3] + ["soon"])
        return ls
    edit(inter, stamp)
    msg = one_line(["--quick", "--data-dir", str(folder)])
    assert f"{inter}:6: timestamp 'soon' is not a number (and 1 more bad lines)" in msg


def folder_where(tmp_path, case):
    """A fixture broken in one of the ways a first-day user met (recbole layout)."""
    folder = make_fixture(tmp_path / "m")
    inter, user = folder / "ml-100k.inter", folder / "ml-100k.user"
    if case == "unknown user":
        edit(user, lambda ls: [line for line in ls if not line.startswith("3\t")])
    elif case == "no header":
        edit(user, lambda ls: ls[1:])
    elif case == "header only":
        edit(inter, lambda ls: ls[:1])
    elif case == "empty":
        inter.write_text("")
    elif case == "only 4-5":
        edit(inter, lambda ls: ls[:1] + [line for line in ls[1:] if line.split("\t")[2]
                                          in "45"])
    elif case == "too few":
        edit(inter, lambda ls: ls[:13])
    elif case == "data dir is a file":
        folder = tmp_path / "a_file"
        folder.write_text("x")
    return folder


@pytest.mark.parametrize("case, message", [
    ("unknown user", "user_id 3 is not in"),
    ("no header", "ml-100k.user:1: recbole's layout starts with the typed header"),
    ("header only", "ml-100k.inter: no data rows (empty or header only)"),
    ("empty", "ml-100k.inter: no data rows"),
    ("only 4-5", "of 1-2 (3s dropped): a click task needs both labels"),
    ("too few", "AUC needs both labels"),
    ("data dir is a file", "a_file: is a file, not a folder"),
])
def test_bad_movielens_input_is_one_line(tmp_path, case, message):
    assert message in one_line(["--quick", "--data-dir", str(folder_where(tmp_path, case)),
                                "--runs-dir", str(tmp_path / "runs"), "--out",
                                str(tmp_path / "m.md")])


def test_unreadable_file_and_unwritable_data_folder(tmp_path, monkeypatch):
    folder = make_fixture(tmp_path / "m")
    real = movielens.Path.read_text

    def deny(path, *a, **kw):
        if path.name == "ml-100k.item":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, *a, **kw)
    monkeypatch.setattr(movielens.Path, "read_text", deny)
    assert "ml-100k.item: cannot read it (Permission denied)" in one_line(
        ["--quick", "--data-dir", str(folder), "--out", str(tmp_path / "m.md")])
    monkeypatch.undo()

    def fake_pip(cmd, **kw):  # a wheel with the three files, as `pip download` leaves it
        import zipfile
        target = cmd[cmd.index("-d") + 1]
        with zipfile.ZipFile(f"{target}/recbole-1.2.1-py3-none-any.whl", "w") as z:
            for name in movielens.FILES.values():
                z.writestr(f"recbole/dataset_example/ml-100k/{name}", "x")
        return type("Done", (), {"returncode": 0, "stderr": ""})()
    monkeypatch.setattr(movielens.subprocess, "run", fake_pip)
    blocked = tmp_path / "file"
    blocked.write_text("")
    assert "a file stands where a folder of this path belongs" in one_line(
        ["--fetch", "--data-dir", str(blocked / "ml-100k")])


def test_no_network_for_lightgbm_fails_before_any_training(tiny, tmp_path, monkeypatch):
    gbdt = __import__("stage2_ctr.gbdt", fromlist=["gbdt"])
    monkeypatch.setattr(gbdt.subprocess, "run", lambda *a, **kw: type("Done", (), {
        "returncode": 1, "stderr": "ERROR: No matching distribution found for lightgbm"})())
    monkeypatch.setattr(chapter, "tune_and_run", lambda *a: pytest.fail("trained first"))
    msg = one_line(["--models", "fm", "--seeds", "0", "--splits", "random", "--data-dir",
                    str(tiny), "--out", str(tmp_path / "m.md"), "--runs-dir", str(tmp_path)])
    assert "No matching distribution" in msg and "--skip-gbdt" in msg
    assert not (tmp_path / "m.md").exists()


def test_quick_sets_only_the_defaults_the_user_did_not_give():
    args = chapter.parse_args(["--quick", "--seeds", "1,2", "--models", "fm,lr"])
    assert args.seeds == [1, 2] and args.model_list == ["fm", "lr"]
    assert args.split_list == ["random"] and args.skip_gbdt and args.lrs == [3e-3]
    assert chapter.parse_args([]).seeds == [0, 1, 2, 3, 4]


def test_only_the_default_run_writes_the_committed_results():
    results, partial = ROOT / "results", ROOT / "runs" / "partial"
    assert chapter.parse_args([]).out == results / "stage2_movielens.md"
    assert chapter.parse_args(["--threads", "1", "--jobs", "1"]).out.parent == results
    assert chapter.parse_args(["--models", "fm", "--seeds", "0", "--skip-gbdt"]).out == (
        partial / "stage2_movielens.md")
    assert chapter.parse_args(["--quick"]).out.parent == ROOT / "runs" / "quick"


def test_hashed_ids_keep_padding_and_count_the_values_that_share_a_bucket():
    """05_movielens --hashing: every id of the shared table goes to one random bucket (the same
    for every split), padding stays padding, and the collision share is a naive count's."""
    rng = np.random.default_rng(1)
    train = rng.integers(0, 500, size=(300, 4))
    train[:, 3][::3] = -1  # genre padding
    test = rng.integers(0, 500, size=(50, 4))
    hashed, share = movielens.hash_ids({"train": train, "test": test}, 500, 10)
    assert ((hashed["train"] == -1) == (train == -1)).all()
    assert hashed["train"].max() < 2 ** 10 and hashed["test"].min() >= 0
    same = train[:, 0][:, None] == test[:, 0][None, :]  # an id means the same bucket everywhere
    assert (hashed["train"][:, 0][:, None] == hashed["test"][:, 0][None, :])[same].all()
    bucket = {}
    for i, h in zip(train.ravel(), hashed["train"].ravel()):
        if i >= 0:
            bucket[i] = h
    crowded = {h for h in bucket.values() if list(bucket.values()).count(h) > 1}
    assert share == pytest.approx(sum(h in crowded for h in bucket.values()) / len(bucket))
    assert 0 < share < 1
