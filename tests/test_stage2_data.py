"""Stage 2 data: the Criteo format round trip, the hash, sharding, splits, oracle, bad input."""
import collections
import gzip
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, load_script

from stage2_ctr import binary_cache, criteo, dataset_files, synthetic, train_stats

make = load_script("stage2_ctr/01_make_subset.py")


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """4,000 synthetic rows, split 8:1:1 (and the same rows gzipped)."""
    out = tmp_path_factory.mktemp("synth")
    meta = make.main(["--synthetic", "4000", "--out-dir", str(out), "--chunk-rows", "1000",
                      "--workers", "1"])
    with open(out / "train.txt", "rb") as f, gzip.open(out / "train.txt.gz", "wb") as g:
        g.write(f.read())
    return out, meta


def read_all(paths, **kw):
    stream = criteo.CriteoStream(paths, batch_size=kw.pop("batch_size", 512), **kw)
    batches = list(stream)
    dense, sparse, label = (torch.cat(x) for x in zip(*batches))
    return dense, sparse, label, stream


def parse_bytes(data, n_labels=1):
    return criteo.parse_block(np.frombuffer(data + b"\0" * 8, np.uint8), n_labels)


def test_round_trip_parses_back_the_generators_values():
    gen = synthetic.Generator(synthetic.SyntheticConfig(rows=10, workers=1))
    c = gen.chunk(0, 3000)
    c["dense"][::7, 4] = np.arange(0, 3000, 7) * 33_333_333  # up to 11 digits
    c["dense"][::11, 5] = -np.arange(0, 3000, 11) % 1000      # negatives, as for I2
    data = dataset_files.format_rows(c["labels"], c["dense"], c["dense_missing"],
                                     c["hex_words"], c["ranks"] < 0)
    p = parse_bytes(data)
    assert p["n_bad"] == 0 and len(p["hashes"]) == 3000
    assert (p["label"][:, 0] == c["labels"][:, 0]).all()
    expected = np.where(c["dense_missing"], np.nan, c["dense"].astype(np.float64))
    assert np.array_equal(p["dense_raw"], expected, equal_nan=True)
    assert (c["dense"] < 0).any() and (c["dense"] > 10**10).any()
    for f in [0, 7, 25]:
        text = [w.tobytes().decode() if r >= 0 else ""
                for w, r in zip(c["hex_words"][:, f], c["ranks"][:, f])]
        assert np.array_equal(p["hashes"][:, f], criteo.hash_strings(f, text))


def test_plain_and_gzip_give_identical_batches(synth):
    out, _ = synth
    a = read_all([out / "train.txt"])
    b = read_all([out / "train.txt.gz"])
    for x, y in zip(a[:3], b[:3]):
        assert torch.equal(x, y)
    assert a[0].shape == (a[3].stats["rows"], 13) and a[1].dtype == torch.int64
    assert a[3].stats["rows"] == len(open(out / "train.txt").readlines())
    assert a[3].stats["bad_rows"] == 0


def test_hash_is_stable_across_processes_and_salted_by_field():
    code = ("import sys; sys.path.insert(0, '.'); from stage2_ctr.criteo import hash_strings; "
            "print(hash_strings(3, ['68fd1e64', 'hello world, a long value']).tolist())")
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           cwd=ROOT, env={"PYTHONHASHSEED": str(seed), "PATH": ""})
            for seed in (1, 2)]
    assert runs[0].stdout == runs[1].stdout and runs[0].stdout.strip()
    here = criteo.hash_strings(3, ["68fd1e64", "hello world, a long value"]).tolist()
    assert str(here) == runs[0].stdout.strip()
    assert criteo.hash_strings(4, ["68fd1e64"])[0] != here[0]  # another field, another bucket
    # the vectorized parser agrees with the reference for any string, short or long
    row = "1\t" + "\t" * 13 + "\t".join(["68fd1e64", "hello world, a long value"] + [""] * 24)
    p = parse_bytes((row + "\n").encode())
    assert p["hashes"][0, 0] == criteo.hash_strings(0, ["68fd1e64"])[0]
    assert p["hashes"][0, 1] == criteo.hash_strings(1, ["hello world, a long value"])[0]


def test_missing_values_get_their_own_bucket_per_field():
    row = "0\t" + "\t".join([""] * 13 + [""] * 26) + "\n"
    p = parse_bytes(row.encode())
    assert np.isnan(p["dense_raw"]).all()  # an all-empty row is valid
    assert p["n_bad"] == 0
    empty = np.array([criteo.hash_strings(f, [""])[0] for f in range(26)])
    assert (p["hashes"][0] == empty).all() and len(set(empty.tolist())) == 26
    dense = criteo.transform_dense(p["dense_raw"])
    assert (dense == 0).all()


def test_negatives_huge_integers_and_non_hex_values_are_read():
    ints = ["-3", "-1", "0", "7", "123456789012345", "99999999", "100000000"] + ["1"] * 6
    row = "1\t" + "\t".join(ints + ["not hex!", "ÄÖ"] + ["abc"] * 24) + "\n"
    p = parse_bytes(row.encode())
    assert p["n_bad"] == 0
    assert p["dense_raw"][0, :7].tolist() == [-3, -1, 0, 7, 123456789012345, 99999999, 1e8]
    dense = criteo.transform_dense(p["dense_raw"])
    assert dense[0, 0] == 0 and dense[0, 1] == 0  # negatives clipped to 0 before log1p
    assert np.isclose(dense[0, 3], np.log1p(7))


def test_bad_rows_are_skipped_counted_and_reported(tmp_path, synth):
    out, _ = synth
    lines = open(out / "train.txt").read().split("\n")[:1000]
    lines[10] = lines[10].replace("\t", " ", 1)            # 39 fields
    lines[20] = "2" + lines[20][1:]                         # label not 0/1
    lines[30] = lines[30].split("\t", 2)[0] + "\t12x\t" + lines[30].split("\t", 2)[2]
    path = tmp_path / "bad.txt"
    path.write_text("\n".join(lines) + "\n")
    dense, sparse, label, stream = read_all([path])
    assert stream.stats["bad_rows"] == 3 and stream.stats["rows"] == 997 == len(label)
    first_bad = stream.stats["files"][str(path)]["first_bad"]
    assert [b.split(":")[0] for b in first_bad] == ["line 11", "line 21", "line 31"]
    with pytest.raises(criteo.CriteoFormatError, match=r"bad.txt: 3 of 1000 rows malformed.*"
                                                       r"line 11: expected 40 fields, got 39"):
        read_all([path], max_bad_fraction=0.001)


def test_bad_files_get_one_clear_line(tmp_path, synth):
    out, _ = synth
    (tmp_path / "empty.txt").write_bytes(b"")
    data = (out / "train.txt.gz").read_bytes()
    (tmp_path / "cut.txt.gz").write_bytes(data[: len(data) // 2])
    for path, message in [(tmp_path / "none.txt", "file not found"),
                          (tmp_path, "is a directory"),
                          (tmp_path / "empty.txt", "file is empty")]:
        with pytest.raises(criteo.CriteoFormatError, match=message):
            criteo.CriteoStream([path], 64)
    with pytest.raises(criteo.CriteoFormatError, match=r"cut.txt.gz: truncated or corrupt gzip"):
        read_all([tmp_path / "cut.txt.gz"])
    result = subprocess.run([sys.executable, "stage2_ctr/02_dataloader.py",
                             str(tmp_path / "none.txt")], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 1 and result.stderr.strip().count("\n") == 0
    assert result.stderr.startswith("error: ") and "01_make_subset.py --synthetic" in result.stderr


def test_no_label_files_have_39_columns(tmp_path, synth):
    out, _ = synth
    lines = open(out / "test.txt").read().splitlines()
    (tmp_path / "kaggle_test.txt").write_text("\n".join(x.split("\t", 1)[1] for x in lines) + "\n")
    dense, sparse, label, stream = read_all([tmp_path / "kaggle_test.txt"], n_labels=0)
    ref = read_all([out / "test.txt"])
    assert torch.equal(sparse, ref[1]) and torch.equal(dense, ref[0])
    assert label.shape == (len(lines), 0) and stream.stats["bad_rows"] == 0


@pytest.mark.parametrize("name", ["train.txt", "train.txt.gz"])
def test_shards_cover_every_row_exactly_once(synth, name):
    out, _ = synth
    path = out / name
    whole = b"".join(raw for _, _, raw in criteo.iter_blocks(path, 1 << 12))
    for n_shards in [2, 3, 4]:  # 2 workers x 2 ranks = 4 shards
        parts = [b"".join(raw for _, _, raw in criteo.iter_blocks(path, 1 << 12, k, n_shards))
                 for k in range(n_shards)]
        assert sorted(b"".join(parts).splitlines()) == sorted(whole.splitlines())
        assert all(parts)  # every shard got a share


def test_dataloader_workers_read_disjoint_shares(synth):
    out, _ = synth
    stream = criteo.CriteoStream([out / "train.txt"], 256, chunk_bytes=1 << 14)
    single = torch.cat([s for _, s, _ in stream])
    multi = torch.cat([s for _, s, _ in torch.utils.data.DataLoader(stream, batch_size=None,
                                                                    num_workers=2)])
    assert len(multi) == len(single)
    key = lambda t: sorted(map(tuple, t.tolist()))  # noqa: E731
    assert key(multi) == key(single)


def test_shuffle_buffer_is_seeded_and_keeps_every_row(synth):
    out, _ = synth
    plain = read_all([out / "train.txt"])[1]
    a = read_all([out / "train.txt"], shuffle_buffer=1000, seed=1)[1]
    b = read_all([out / "train.txt"], shuffle_buffer=1000, seed=1)[1]
    assert torch.equal(a, b) and not torch.equal(a, plain)
    assert sorted(map(tuple, a.tolist())) == sorted(map(tuple, plain.tolist()))


def test_splits_are_disjoint_with_the_asked_fractions_and_aligned_oracles(synth):
    out, meta = synth
    rows = {s: open(out / f"{s}.txt").read().splitlines() for s in ["train", "val", "test"]}
    assert sum(len(r) for r in rows.values()) == 4000
    assert abs(len(rows["val"]) - 400) < 80 and abs(len(rows["test"]) - 400) < 80
    assert not set(rows["train"]) & set(rows["val"]) and not set(rows["val"]) & set(rows["test"])
    for s in rows:
        oracle = np.load(out / f"{s}.oracle.npy", allow_pickle=False)
        assert oracle.shape == (len(rows[s]),) and oracle.dtype == np.float32
    labels = np.array([int(r[0]) for r in rows["train"]])
    oracle = np.load(out / "train.oracle.npy")
    # the oracle is the true click probability of that very row
    assert oracle[labels == 1].mean() > oracle[labels == 0].mean() + 0.2
    assert meta["splits"]["train"]["oracle_auc"][0] > 0.8
    assert abs(meta["splits"]["train"]["positive_rate"][0] - 0.25) < 0.05


def test_workers_do_not_change_the_output(tmp_path):
    for w in [1, 2]:
        make.main(["--synthetic", "5000", "--out-dir", str(tmp_path / f"w{w}"), "--chunk-rows",
                   "500", "--workers", str(w)])
    for f in ["train.txt", "test.txt", "val.oracle.npy"]:
        assert (tmp_path / "w1" / f).read_bytes() == (tmp_path / "w2" / f).read_bytes()


def test_two_tasks_and_time_split(tmp_path):
    meta = make.main(["--synthetic", "3000", "--out-dir", str(tmp_path), "--tasks", "2",
                      "--task-corr", "0.9", "--split", "time", "--workers", "1"])
    assert meta["columns"][:3] == ["label", "label2", "I1"]
    assert [meta["splits"][s]["rows"] for s in ["train", "val", "test"]] == [2400, 300, 300]
    assert np.load(tmp_path / "train.oracle.npy").shape == (2400, 2)
    dense, sparse, label, _ = read_all([tmp_path / "train.txt"], n_labels=2)
    assert label.shape == (2400, 2) and dense.shape == (2400, 13)
    assert abs(label[:, 1].mean().item() - 0.1) < 0.04


def test_subset_of_real_format_files(tmp_path, synth):
    out, _ = synth
    meta = make.main(["--input", str(out / "train.txt.gz"), str(out / "val.txt"),
                      "--rows", "2000", "--split", "time", "--out-dir", str(tmp_path)])
    rows = {s: open(tmp_path / f"{s}.txt").read().splitlines() for s in ["train", "val", "test"]}
    assert [len(rows[s]) for s in ["train", "val", "test"]] == [1600, 200, 200]
    source = open(out / "train.txt").read().splitlines()[:2000]
    assert rows["train"] + rows["val"] + rows["test"] == source  # time split keeps the order
    meta = make.main(["--input", str(out / "train.txt"), "--sample-rate", "0.5", "--seed", "3",
                      "--out-dir", str(tmp_path / "s")])
    kept = sum(meta["splits"][s]["rows"] for s in ["train", "val", "test"])
    assert abs(kept - 0.5 * len(source) * 3200 / 2000) < 200


def test_make_subset_without_input_says_what_to_download(capsys):
    with pytest.raises(SystemExit) as e:
        make.parse_args([])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "dac.tar.gz" in err and "--synthetic" in err
    for bad in (["--synthetic", "10", "--task-corr", "2"], ["--synthetic", "10", "--ctr", "0"],
                ["--input", "x", "--sample-rate", "1.5"]):
        with pytest.raises(SystemExit):
            make.parse_args(bad)


def test_fit_stats_standardizes_and_collisions_are_reported(synth):
    out, _ = synth
    stats = train_stats.fit_stats([out / "train.txt"])
    dense = read_all([out / "train.txt"], dense_stats=stats, missing_indicator=True)[0]
    assert dense.shape[1] == 26
    for j in range(13):
        present = dense[:, 13 + j] == 0
        assert abs(dense[present, j].mean().item()) < 1e-3
        assert abs(dense[present, j].std().item() - 1) < 1e-2
        assert (dense[~present, j] == 0).all()
    report = train_stats.collision_report([out / "train.txt"], hash_bits=12)
    # the naive count: every distinct (field, value) hash, its bucket, how many share each
    hashes = set()
    for _, _, raw in criteo.iter_blocks(out / "train.txt", 1 << 20):
        hashes |= set(parse_bytes(raw)["hashes"].ravel().tolist())
    per_bucket = collections.Counter(h >> (64 - 12) for h in hashes)
    shared = sum(c for c in per_bucket.values() if c > 1)
    assert report["distinct_values"] == len(hashes)
    assert report["distinct_buckets"] == len(per_bucket)
    assert report["values_in_shared_buckets"] == pytest.approx(shared / len(hashes))
    assert report["excess_values"] == pytest.approx(1 - len(per_bucket) / len(hashes))
    assert report["values_in_shared_buckets"] > report["excess_values"] > 0
    big = train_stats.collision_report([out / "train.txt"], hash_bits=30)
    assert big["values_in_shared_buckets"] < 0.001


def test_make_subset_missing_input_is_one_line(tmp_path):
    for extra in ([], ["--split", "time"]):
        with pytest.raises(SystemExit) as e:
            make.main(["--input", str(tmp_path / "none.txt"), "--out-dir", str(tmp_path)] + extra)
        assert "none.txt: file not found" in str(e.value) and "\n" not in str(e.value)


# ------------------------------------------------------------------------- the binary cache
cache = load_script("stage2_ctr/07_binary_cache.py")  # the chapter; the code: binary_cache.py


def test_binary_cache_gives_back_the_loaders_batches(synth, tmp_path):
    out, _ = synth
    folder = tmp_path / "train.bin"
    meta = cache.main([str(out / "train.txt"), "--out", str(folder), "--workers", "0"])
    # the cache standardizes with the statistics the trainer fits on the same file
    dense, sparse, label, _ = read_all([out / "train.txt"], dense_stats=cache.trainer_stats(
        [out / "train.txt"], 1))
    assert meta["rows"] == len(label) and not list(tmp_path.glob("*.tmp"))
    batches = list(binary_cache.BinaryStream(folder, 512))
    assert len(batches[0][0]) == 512 and batches[0][1].dtype == torch.int64
    b_dense, b_sparse, b_label = (torch.cat(x) for x in zip(*batches))
    assert torch.equal(b_dense, dense) and torch.equal(b_sparse, sparse)
    assert torch.equal(b_label, label) and b_label.dim() == 1


def test_binary_cache_workers_share_the_batches_and_shuffle_keeps_every_row(synth, tmp_path):
    out, _ = synth
    folder = tmp_path / "train.bin"
    binary_cache.write_cache([out / "train.txt"], folder, workers=2, progress=False)
    whole = torch.cat([s for _, s, _ in binary_cache.BinaryStream(folder, 300)])
    dl = torch.utils.data.DataLoader(binary_cache.BinaryStream(folder, 300, group=2), batch_size=None,
                                     num_workers=2)
    shared = torch.cat([s for _, s, _ in dl])
    shuffled = binary_cache.BinaryStream(folder, 300, shuffle=True, group=1)
    shuffled.set_epoch(1)
    mixed = torch.cat([s for _, s, _ in shuffled])
    key = lambda t: sorted(map(tuple, t.tolist()))  # noqa: E731
    assert len(shared) == len(whole) == len(mixed) > 0
    assert key(shared) == key(whole) == key(mixed) and not torch.equal(mixed, whole)


def test_binary_cache_bad_input_is_one_line(tmp_path, synth):
    with pytest.raises(SystemExit, match="not a binary cache"):
        cache.main(["--read", str(tmp_path / "nothing")])
    folder = tmp_path / "c.bin"
    binary_cache.write_cache([synth[0] / "val.txt"], folder, workers=0, progress=False)
    with open(folder / "sparse.bin", "r+b") as f:  # a cut-off file
        f.truncate(100)
    with pytest.raises(ValueError, match="sparse.bin: expected"):
        binary_cache.BinaryStream(folder, 64)
    with pytest.raises(SystemExit):
        cache.parse_args(["x.txt", "--out", "y", "--hash-bits", "32"])
    with pytest.raises(SystemExit, match="no such statistics file"):
        cache.main([str(synth[0] / "val.txt"), "--out", str(tmp_path / "s.bin"),
                    "--stats", str(tmp_path / "none.json")])
    bad = tmp_path / "bad.txt"
    bad.write_text("not\ta criteo line\n" * 2000)
    with pytest.raises(SystemExit, match="bad.txt: .*malformed"):
        cache.main([str(bad), "--out", str(tmp_path / "bad.bin"), "--workers", "1"])
    assert not (tmp_path / "bad.bin").exists() and not (tmp_path / "bad.bin.tmp").exists()
