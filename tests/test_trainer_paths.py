"""The trainer's newer paths - the binary cache, --preload, --resume, DDP, shared run names - and
the CUDA path's defects a CPU can show (issues 19 and 25): nothing lost, nothing hangs, no
silent mix-ups, one line instead of a traceback. Tiny fixtures made here; DDP runs 2 gloo ranks
in subprocesses under a timeout (tests/ddp_ranks.py)."""
import errno
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
from conftest import ROOT, crash_report, ddp_env, free_port, load_script, one_line_exit

import common
from stage2_ctr import binary_cache, criteo, run_state, train_ctr
from stage2_ctr.models import build_model, criteo_schema
from stage2_ctr.models.optim import RowSparseAdam
from stage2_ctr.training import make_optimizers

make = load_script("stage2_ctr/01_make_subset.py")
cache_chapter = load_script("stage2_ctr/07_binary_cache.py")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("paths") / "set"
    make.main(["--synthetic", "3000", "--out-dir", str(out), "--workers", "1"])
    return out


def md5_tree(folder):
    return {str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def argv(d, runs, *extra, train=None, test=None, bits="10"):
    return ["--train", str(train or d / "train.txt"), "--val", str(d / "val.txt"),
            "--test", str(test or d / "test.txt"), "--batch-size", "256", "--hash-bits", bits,
            "--emb-dim", "4", "--mlp", "8", "--runs-dir", str(runs), "--num-workers", "0",
            "--quiet", "--threads", "1", "--model", "fm", *extra]


def make_cache(d, out, *extra):
    cache_chapter.main([str(d / "train.txt"), "--out", str(out), "--hash-bits", "10",
                        "--workers", "0", *extra])
    return out


# ------------------------------------------------- issue 19, 1: 07 never deletes a non-cache
def test_07_never_replaces_a_folder_that_is_not_a_cache(data, tmp_path):
    before = md5_tree(data)
    msg = one_line_exit(cache_chapter.main, [str(data / "train.txt"), "--out", str(data),
                                             "--workers", "0"])
    assert "not a binary cache" in msg and md5_tree(data) == before  # byte for byte
    (tmp_path / "file").write_text("keep me")
    msg = one_line_exit(cache_chapter.main, [str(data / "train.txt"), "--out",
                                             str(tmp_path / "file"), "--workers", "0"])
    assert "is a file" in msg and (tmp_path / "file").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # no FILE.tmp left behind
    first = binary_cache.read_meta(make_cache(data, tmp_path / "c.bin"))
    again = binary_cache.read_meta(make_cache(data, tmp_path / "c.bin"))  # a cache: replaced
    assert first["rows"] == again["rows"] == 2371
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.bin", "file"]


# ------------------------------ issue 19, 2: a resume on a shorter train file ends, one line
def test_resume_on_a_changed_train_file_refuses_instead_of_looping(data, tmp_path):
    lines = (data / "train.txt").read_text().splitlines(keepends=True)
    (tmp_path / "train.txt").write_text("".join(lines))
    base = argv(data, tmp_path, "--ckpt-every", "3", "--epochs", "3", "--patience", "9",
                "--run-name", "r", train=tmp_path / "train.txt")
    train_ctr.main(base + ["--max-steps", "15"])  # 10 batches an epoch: stopped in epoch 2
    (tmp_path / "train.txt").write_text("".join(lines[:1000]))
    signal.alarm(60)  # before the fix: the epoch restarted forever
    try:
        msg = one_line_exit(train_ctr.main, base + ["--resume"])
    finally:
        signal.alarm(0)
    assert "which changed since" in msg and "start a new --run-name" in msg


# ---------------------------------------------------- issue 19, 3 + issue 25, 4: DDP, 2 ranks
def run_ranks(tmp_path, runs, world=2, timeout=150):
    """Every command line of `runs` on `world` gloo ranks; per rank the list of results."""
    port, out = free_port(4), tmp_path / "ranks"  # one port per run
    procs = []
    for rank in range(world):
        env = ddp_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
        procs.append(subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "ddp_ranks.py"), str(out), "--",
             " ; ".join(" ".join(r) for r in runs)], env=env, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True))
    deadline, logs = time.monotonic() + timeout, []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=max(deadline - time.monotonic(), 1))[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail("DDP ranks did not finish in time (a hang)")
    assert all(p.returncode == 0 for p in procs), next(filter(None, map(crash_report, logs)),
                                                       logs)
    return [json.loads((tmp_path / f"ranks.{r}.json").read_text()) for r in range(world)], logs


def uneven_text_batch(path):
    """A batch size at which the two byte-range shards of `path` get 1 and 2 batches."""
    rows = [sum(raw.count(b"\n") for _, _, raw in criteo.iter_blocks(path, 1 << 20, s, 2))
            for s in range(2)]
    assert rows[0] != rows[1]
    return min(rows), rows


def test_ddp_ranks_take_the_same_steps_on_uneven_shards_and_preload_their_half(data, tmp_path):
    cache = make_cache(data, tmp_path / "train.bin")  # 2,371 rows: one block before the fix
    lines = (data / "train.txt").read_text().splitlines(keepends=True)
    (tmp_path / "t.txt").write_text("".join(lines[:999]))  # odd: the shards differ by a row
    batch, shard_rows = uneven_text_batch(tmp_path / "t.txt")
    common_flags = ["--runs-dir", str(tmp_path / "runs"), "--hash-bits", "10", "--emb-dim",
                    "4", "--model", "fm", "--num-workers", "0", "--quiet", "--threads", "1",
                    "--val", str(data / "val.txt"), "--test", str(data / "test.txt")]
    runs = [["--train", str(tmp_path / "t.txt"), "--batch-size", str(batch), "--run-name",
             "text", *[f for f in common_flags if f != "--quiet"]],  # its lines: read below
            ["--train", str(cache), "--batch-size", "256", "--run-name", "cache",
             *common_flags],
            ["--train", str(cache), "--batch-size", "256", "--preload", "device", "--run-name",
             "pre", *common_flags],
            ["--train", str(tmp_path / "t.txt"), "--batch-size", "64", "--preload", "device",
             "--run-name", "pretext", *common_flags]]
    ranks, logs = run_ranks(tmp_path, runs)
    text, cached, pre, pretext = zip(*ranks)
    assert [r["steps"] for r in text] == [1, 1]  # the shorter shard's count, on both ranks
    assert cached[0]["steps"] == cached[1]["steps"] >= 4 and cached[1]["rows"] > 0
    assert [r["preloaded"] for r in pre] == [1185, 1186]  # each rank its half of the cache
    assert sum(r["preloaded"] for r in pretext) == 999  # text: each rank its byte range
    assert pre[0]["samples"] == sum(r["rows"] for r in pre) == 2371  # not counted x world
    assert "every rank takes the same number of steps per epoch" in logs[0]


# -------------------------------------------------- issue 19, 4-7: the cache's recorded facts
def test_a_cache_is_used_only_with_its_own_hash_bits_labels_sources_and_stats(data, tmp_path):
    cache = make_cache(data, tmp_path / "c.bin")
    for extra in ([], ["--preload", "device"]):
        msg = one_line_exit(train_ctr.main, argv(data, tmp_path, *extra, train=cache,
                                                 bits="12"))
        assert "cached at 2^10 buckets" in msg and "--hash-bits 10" in msg
    msg = one_line_exit(train_ctr.main, argv(data, tmp_path, train=cache,
                                             test=data / "train.txt"))
    assert "in --train and in --test (as a source of" in msg
    msg = one_line_exit(train_ctr.main, argv(data, tmp_path, "--stats", "/nonexistent.json",
                                             train=cache))
    assert "not found" in msg
    other = tmp_path / "other.stats.json"
    stats = json.loads(json.dumps(cache_chapter.trainer_stats([data / "train.txt"], 1)))
    stats["mean"][0] += 0.5
    other.write_text(json.dumps(stats))
    msg = one_line_exit(train_ctr.main, argv(data, tmp_path, "--stats", str(other),
                                             train=cache))
    assert "other dense statistics than the cache" in msg
    (tmp_path / "two.txt").write_text("".join(line[:2] + line for line in (
        data / "train.txt").read_text().splitlines(keepends=True)))  # the label twice
    two = tmp_path / "two.bin"
    cache_chapter.main([str(tmp_path / "two.txt"), "--out", str(two), "--hash-bits", "10",
                        "--workers", "0", "--labels", "2"])
    msg = one_line_exit(train_ctr.main, argv(data, tmp_path, train=two))
    assert "a cache of 2 label columns" in msg


def test_cache_and_preload_give_the_text_paths_bad_rows_and_metrics(data, tmp_path, capsys):
    lines = (data / "train.txt").read_text().splitlines()
    fields = lines[7].split("\t")
    fields[1] = "9" * 400
    lines[7] = "\t".join(fields)
    (tmp_path / "train.txt").write_text("\n".join(lines) + "\n")
    cache = make_cache(tmp_path, tmp_path / "train.bin")
    assert "skipped 1 malformed rows" in capsys.readouterr().out  # 07 says it
    assert json.loads((cache / "meta.json").read_text())["bad_rows"][
        str(tmp_path / "train.txt")]["bad_rows"] == 1
    runs = {}
    for name, train, extra in [("text", tmp_path / "train.txt", []), ("cache", cache, []),
                               ("pre", cache, ["--preload", "device"]),
                               ("pretext", tmp_path / "train.txt", ["--preload", "device"])]:
        runs[name] = train_ctr.main(argv(data, tmp_path / "runs", "--run-name", name,
                                         "--epochs", "2", *extra, train=train))
    counts = {n: {k: (v["rows"], v["bad_rows"]) for k, v in m["bad_rows"]["train"].items()}
              for n, m in runs.items()}
    assert counts["text"] == {str(tmp_path / "train.txt"): (len(lines) - 1, 1)}
    assert all(c == counts["text"] for c in counts.values()), counts
    for name in ("cache", "pre", "pretext"):  # the same statistics, batches and numbers
        assert runs[name]["splits"] == runs["text"]["splits"], name


def test_shuffle_changes_the_order_of_a_one_block_cache(data, tmp_path):
    cache = make_cache(data, tmp_path / "c.bin")
    plain = torch.cat([b[1] for b in binary_cache.BinaryStream(cache, 256)])
    mixed = torch.cat([b[1] for b in binary_cache.BinaryStream(cache, 256, shuffle=True)])
    assert not torch.equal(plain, mixed)
    assert sorted(map(tuple, plain.tolist())) == sorted(map(tuple, mixed.tolist()))


# ------------------------------------------------------------------ issue 19, 9: the run lock
def test_a_run_folder_in_use_is_refused_in_one_line(data, tmp_path):
    (tmp_path / "r").mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); f.write('4242'); f.flush(); "
        "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)"),
        str(tmp_path / "r" / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        msg = one_line_exit(train_ctr.main, argv(data, tmp_path, "--run-name", "r"))
        assert "another run (pid 4242) is training in this folder" in msg
    finally:
        holder.kill()
        holder.wait()
    assert train_ctr.main(argv(data, tmp_path, "--run-name", "r"))["steps"] > 0  # freed


# ----------------------------------------------------- issue 19, 11: the oracle of that file
def test_an_edited_split_is_not_scored_against_the_generated_oracle(data, tmp_path):
    lines = (data / "test.txt").read_text().splitlines(keepends=True)
    for name, text in [("cut", "".join(lines[:-10])),
                       ("flip", "".join([("0" if lines[0][0] == "1" else "1") + lines[0][1:]]
                                        + lines[1:]))]:
        d = tmp_path / name
        d.mkdir()
        for f in ("val.txt", "meta.json"):
            (d / f).write_bytes((data / f).read_bytes())
        (d / "test.txt").write_text(text)
        m = train_ctr.main(argv(d, tmp_path, "--run-name", name, train=data / "train.txt"))
        assert "oracle" in m["splits"]["val"] and "oracle" not in m["splits"]["test"], name


# ------------------------------------------------------- issue 19: one line, not a traceback
def test_ctrl_c_during_training_is_one_line_with_the_step(data, tmp_path, monkeypatch):
    real = train_ctr.make_step

    def step_then_ctrl_c(*a, **kw):
        step, n = real(*a, **kw), [0]

        def run(*batch):
            n[0] += 1
            if n[0] == 6:
                os.kill(os.getpid(), signal.SIGINT)
            return step(*batch)
        return run
    monkeypatch.setattr(train_ctr, "make_step", step_then_ctrl_c)
    handler = signal.getsignal(signal.SIGINT)
    msg = one_line_exit(train_ctr.main, argv(data, tmp_path, "--ckpt-every", "2",
                                             "--run-name", "c"))
    assert msg == "error: interrupted at step 5; resume with --resume"
    assert signal.getsignal(signal.SIGINT) is handler  # given back


def test_read_only_data_folder_keeps_counts_and_stats_under_runs(data, tmp_path, monkeypatch):
    d = tmp_path / "ro"
    d.mkdir()
    for f in ("train.txt", "val.txt", "test.txt"):
        (d / f).write_bytes((data / f).read_bytes())
    access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: access(p, mode) and not (
        mode == os.W_OK and os.path.abspath(p) == str(d)))  # root can write anywhere
    before = sorted(p.name for p in d.iterdir())
    m = train_ctr.main(argv(d, tmp_path / "runs", "--min-count", "2"))
    assert sorted(p.name for p in d.iterdir()) == before and m["steps"] > 0
    kept = sorted(p.name.split("_", 1)[1] for p in (tmp_path / "runs" / "data_cache").iterdir())
    assert kept == ["train.txt.counts10.npz", "train.txt.stats.json"]


@pytest.mark.parametrize("case", ["long name", "runs-dir a file", "full disk"])
def test_unwritable_run_folders_are_one_line(data, tmp_path, monkeypatch, case):
    (tmp_path / "afile").write_text("x")
    extra = {"long name": ["--run-name", "x" * 300],
             "runs-dir a file": ["--runs-dir", str(tmp_path / "afile")],
             "full disk": ["--run-name", "full"]}[case]
    if case == "full disk":
        def full(*a, **kw):
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(torch, "save", full)
    msg = one_line_exit(train_ctr.main, argv(data, tmp_path) + extra)
    assert {"long name": "longer than the file system allows", "full disk": "the disk is full",
            "runs-dir a file": "a file stands where a folder"}[case] in msg


@pytest.mark.parametrize("meta", ["{broken", '{"rows": 10}'])
def test_a_broken_cache_meta_is_one_line(data, tmp_path, meta):
    cache = make_cache(data, tmp_path / "c.bin")
    (cache / "meta.json").write_text(meta)
    msg = one_line_exit(train_ctr.main, argv(data, tmp_path, train=cache))
    assert "broken or incomplete meta.json" in msg


# ------------------------------------------------------------- issue 25: the CUDA path, on a CPU
def test_resume_loads_to_the_cpu_and_restores_the_cuda_rng(tmp_path, monkeypatch):
    cfg = train_ctr.TrainConfig(model="fm", hash_bits=8, emb_dim=2)
    model = build_model("fm", criteo_schema(8), emb_dim=2, sparse=True)
    opts = make_optimizers(model, 1e-3)
    cuda = torch.device("cuda", 0)
    gpu_rng, restored = torch.arange(16, dtype=torch.uint8), []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: gpu_rng)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device: restored.append(s))
    data = [{"path": "t", "size": 1, "md5_head_tail": "x"}]
    run_state.save_last(tmp_path / "last.pt", model, opts, {"step": 3}, cfg, cuda, True, data)
    # before the fix: map_location=cuda:0 (no GPU here: an error; on a GPU the CPU RNG state
    # became a CUDA tensor, and torch.set_rng_state raised a TypeError)
    state = run_state.load_last(tmp_path / "last.pt", model, opts, cuda, cfg, True, data)
    assert state == {"step": 3} and torch.equal(restored[0], gpu_rng)
    with pytest.raises(run_state.TrainError, match="sparse .RowSparseAdam. tables, this device"):
        run_state.load_last(tmp_path / "last.pt", model, opts, cuda, cfg, False, data)


def test_more_ranks_than_gpus_or_one_gpu_for_all_is_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for k, v in {"WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(k, v)
    for device in ("auto", "cuda"):
        with pytest.raises(train_ctr.TrainError, match="started 2 ranks on a machine with 1"):
            train_ctr.setup_distributed(device)
    with pytest.raises(train_ctr.TrainError, match="every rank would use the same GPU"):
        train_ctr.setup_distributed("cuda:0")


def test_sparse_tables_under_nccl():
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    with pytest.raises(train_ctr.TrainError, match="NCCL cannot all-reduce sparse"):
        train_ctr.sparse_tables("on", cuda, 2)
    assert train_ctr.sparse_tables("auto", cuda, 2) is False
    assert train_ctr.sparse_tables("auto", cpu, 2) is True
    assert train_ctr.sparse_tables("on", cuda, 1) is True


def test_preload_says_what_it_needs_and_stays_near_it(data, tmp_path):
    lines = (data / "train.txt").read_text().splitlines(keepends=True)
    (tmp_path / "big.txt").write_text("".join(lines) * 80)  # 192k rows, 31 MB on the device
    counts = np.full(1 << 10, 5)
    rare = train_ctr.train_stats.RareFilter(counts, 2, 10)
    rows, on_device, on_host = binary_cache.preload_plan([tmp_path / "big.txt"])
    assert abs(rows - 80 * len(lines)) < 0.05 * rows
    common.reset_peak_rss()
    base = common.peak_since_reset_mb()
    resident = binary_cache.preload([tmp_path / "big.txt"], 256, "cpu", 10, rare_filter=rare)
    peak = common.peak_since_reset_mb() - base
    assert len(resident) == 80 * len(lines)
    estimate = (on_device + on_host) / 2**20  # on the CPU both are host memory
    # before: 982 B/row of host peak with --min-count (~180 MB here), 1.8x the estimate + 8
    assert peak < 1.5 * estimate + 8, (peak, estimate)  # the allocator keeps some slack


def test_row_sparse_adam_needs_no_host_sync_off_the_cpu():
    """On `meta` tensors every data-dependent step (a boolean mask, torch.equal) raises: the
    update off the CPU is all device work. The same update as SparseAdam, both ways."""
    table = torch.nn.Embedding(100, 4, sparse=True, device="meta")
    opt = RowSparseAdam(table.parameters())
    table(torch.randint(0, 100, (32, 26)).to("meta")).sum().backward()
    opt.step()
    for sync_free in (False, True):
        torch.manual_seed(0)
        ours, ref = torch.nn.Embedding(50, 3, sparse=True), torch.nn.Embedding(50, 3, sparse=True)
        ref.load_state_dict(ours.state_dict())
        opts = [RowSparseAdam(ours.parameters(), lr=0.1, sync_free=sync_free),
                torch.optim.SparseAdam(ref.parameters(), lr=0.1)]
        for _ in range(5):
            ids = torch.randint(0, 50, (40,))
            for t, o in zip((ours, ref), opts):
                o.zero_grad()
                (t(ids) ** 2).sum().backward()
                o.step()
        torch.testing.assert_close(ours.weight, ref.weight, rtol=0, atol=1e-6)
