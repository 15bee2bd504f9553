"""The trainer's step without host syncs, its three input paths (text, binary cache, resident in
device memory), bf16 autocast, and the prepared GPU run's CPU path end to end."""
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import load_script

from stage2_ctr import binary_cache, criteo, train_ctr, train_stats, training
from stage2_ctr.models import build_model, criteo_schema

make = load_script("stage2_ctr/01_make_subset.py")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("src") / "set"
    make.main(["--synthetic", "5000", "--out-dir", str(out), "--workers", "1"])
    binary_cache.write_cache([out / "train.txt"], out / "train.bin", hash_bits=12, workers=0,
                             progress=False)
    return out


def argv(d, tmp_path, *extra, train=None):
    return ["--train", str(train or d / "train.txt"), "--val", str(d / "val.txt"),
            "--test", str(d / "test.txt"), "--batch-size", "256", "--hash-bits", "12",
            "--emb-dim", "4", "--mlp", "16", "--runs-dir", str(tmp_path), "--num-workers", "0",
            "--quiet", "--threads", "1", *extra]


def test_the_sync_free_loop_makes_the_same_update_as_a_per_step_loss_item_loop(data, tmp_path):
    """A plain loop as the trainer had it (loss.item() each step) against train_ctr's loop, which
    never reads the loss between evaluations: the same parameters after 10 steps."""
    train_ctr.main(argv(data, tmp_path, "--model", "deepfm", "--max-steps", "10", "--amp", "off",
                        "--ckpt-every", "10", "--run-name", "r", "--patience", "9"))
    ours = torch.load(tmp_path / "r" / "last.pt", weights_only=True)["model"]
    torch.manual_seed(0)
    model = build_model("deepfm", criteo_schema(12), emb_dim=4, mlp=(16,), sparse=True)
    opts = training.make_optimizers(model, 1e-3)
    stats = train_stats.load_stats(str(data / "train.txt") + ".stats.json")
    for i, (dense, sparse, label) in enumerate(criteo.CriteoStream([data / "train.txt"], 256, 12,
                                                                   stats)):
        if i == 10:
            break
        loss = F.binary_cross_entropy_with_logits(model(dense, sparse), label)
        for o in opts:
            o.zero_grad()
        loss.backward()
        for o in opts:
            o.step()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(ours[name], value, rtol=0, atol=0, msg=name)


def test_cache_and_device_resident_data_give_the_text_loaders_batches(data):
    text = list(criteo.CriteoStream([data / "train.txt"], 256, 12))  # the cache has no stats
    cache = list(binary_cache.BinaryStream(data / "train.bin", 256))
    resident = list(binary_cache.Preloaded(binary_cache.read_all(data / "train.bin"), 256, "cpu"))
    from_text = list(binary_cache.Preloaded(binary_cache.read_all([data / "train.txt"], 12), 256, "cpu"))
    assert len(text) == len(cache) == len(resident) == len(from_text)
    for batches in (cache, resident, from_text):
        for a, b in zip(text, batches):
            for x, y in zip(a, b):
                assert torch.equal(x, y)
    shuffled = binary_cache.Preloaded(binary_cache.read_all(data / "train.bin"), 256, "cpu", shuffle=True)
    first, again = list(shuffled), list(shuffled)
    assert torch.equal(first[0][1], again[0][1])  # same seed and epoch: same order
    shuffled.set_epoch(1)
    assert not torch.equal(list(shuffled)[0][1], first[0][1])
    key = lambda bs: sorted(map(tuple, torch.cat([b[1] for b in bs]).tolist()))  # noqa: E731
    assert key(first) == key(text)  # a permutation of the same rows


def test_trainer_from_cache_and_from_device_memory_matches_the_text_run(data, tmp_path):
    runs = {}
    for name, extra in [("text", []), ("cache", ["--train", str(data / "train.bin")]),
                        ("device", ["--train", str(data / "train.bin"), "--preload", "device"]),
                        ("text_device", ["--preload", "device"])]:
        a = argv(data, tmp_path, "--model", "fm", "--epochs", "2", "--run-name", name)
        if extra[:1] == ["--train"]:
            i = a.index("--train")
            a[i + 1] = extra[1]
            extra = extra[2:]
        runs[name] = train_ctr.main(a + extra)
    # the cache holds unstandardized dense values (made without --stats): compare the cache
    # runs with each other, the text runs with each other
    assert runs["text"]["splits"] == runs["text_device"]["splits"]
    assert runs["cache"]["splits"] == runs["device"]["splits"]
    saved = json.loads((tmp_path / "device" / "metrics.json").read_text())
    assert saved["config"]["preload"] == "device"


def test_bf16_autocast_trains_to_the_same_auc(data, tmp_path):
    m = {amp: train_ctr.main(argv(data, tmp_path, "--model", "dnn", "--epochs", "2", "--lr",
                                  "0.005", "--amp", amp, "--run-name", amp))
         for amp in ("off", "bf16")}
    assert abs(m["off"]["splits"]["test"]["auc"] - m["bf16"]["splits"]["test"]["auc"]) < 0.02
    assert training.amp_dtype("bf16", torch.device("cpu")) is torch.bfloat16
    assert training.amp_dtype("off", torch.device("cpu")) is None
    auto = training.amp_dtype("auto", torch.device("cpu"))
    assert auto is (torch.bfloat16 if training.cpu_has_native_bf16() else None)


def test_gpu_script_cpu_quick_path_writes_its_report(tmp_path, tiny_npz):
    gpu = load_script("stage3_advanced/07_gpu.py")
    rows = gpu.main(["--device", "cpu", "--quick", "--data-root", str(tmp_path / "data"),
                     "--adult-npz", str(tiny_npz[0]), "--out", str(tmp_path / "quick" / "gpu.md"),
                     "--runs-dir", str(tmp_path)])
    text = (tmp_path / "quick" / "gpu.md").read_text()
    assert "in device memory" in text and "DataLoader lesson" in text and "bf16" in text
    assert {r.get("source") for r in rows} >= {"device", "binary", "loader-1"}
    assert not [r for r in rows if "error" in r]  # every job of the quick run measured
    assert gpu.parse_args(["--device", "cpu", "--quick"]).out.parts[-2:] == ("quick", "gpu.md")


def test_forced_bf16_on_a_cpu_without_bf16_instructions_says_so(data, tmp_path, monkeypatch,
                                                                 capsys):
    monkeypatch.setattr(train_ctr, "cpu_has_native_bf16", lambda: False)
    args = [a for a in argv(data, tmp_path, "--model", "lr", "--max-steps", "2", "--amp",
                            "bf16", "--run-name", "notice") if a != "--quiet"]
    train_ctr.main(args)
    out = capsys.readouterr()
    assert "--amp bf16 on a CPU without bf16 instructions" in out.out + out.err


@pytest.mark.parametrize("native, used", [(True, "bf16"), (False, "fp32")])
def test_amp_auto_is_the_default_and_metrics_record_what_ran(data, tmp_path, monkeypatch,
                                                             native, used):
    """Issue 23 item 3: bf16 where the CPU multiplies it natively (2x on avx512_bf16, 0.06x
    without: results/stage2_precision.md), and metrics.json says which precision ran."""
    assert train_ctr.TrainConfig().amp == "auto"
    monkeypatch.setattr(training, "cpu_has_native_bf16", lambda: native)
    m = train_ctr.main(argv(data, tmp_path, "--model", "lr", "--max-steps", "2",
                            "--run-name", f"auto_{used}"))
    assert m["config"]["amp"] == "auto" and m["precision"] == used
    assert json.loads((tmp_path / f"auto_{used}" / "metrics.json").read_text())[
        "precision"] == used
