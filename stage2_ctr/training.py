"""A CTR training step, written once: the optimizers (one rule for Stage 2 and Stage 3), the step
itself (with micro-batches for large batches) and prediction over a stream of batches; then the
bookkeeping of a run around it (train_ctr.py): inputs checked before training, the dense
statistics, evaluation (gathered over DDP ranks), checkpoints that refuse a foreign config.

train_ctr.py's loop, the throughput benchmarks (06_bench_throughput.py, Stage 3's
05_throughput.py) and the in-memory loop at the end of this file (fit: Stage 3's experiments,
MovieLens) all build their optimizers here, so "Stage 2's DeepFM" is trained the same way
wherever it appears.
"""
import copy
import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from tqdm import tqdm

import common
from stage2_ctr import criteo
from stage2_ctr.models.optim import RowSparseAdam

# what may change between a run and its --resume (everything else must be equal)
RESUMABLE = {"epochs", "max_steps", "patience", "eval_every", "ckpt_every", "threads", "runs_dir"}


class TrainError(ValueError):
    """A run that cannot start or continue: the message is one line saying why and what to do."""




# ------------------------------------------------------------------------------- precision
def cpu_has_native_bf16():
    """Whether this CPU multiplies bf16 in hardware: the avx512_bf16 or amx_bf16 flags of
    /proc/cpuinfo (Intel Cooper Lake / Sapphire Rapids and later, AMD Zen 4 and later). Without
    them torch converts bf16 to fp32 around every matmul, which is slower than fp32 alone."""
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags"))
    except (OSError, StopIteration):
        return False
    return bool({"avx512_bf16", "amx_bf16"} & set(flags.split()))


def amp_dtype(amp, device):
    """--amp off | bf16 | auto -> torch.bfloat16 or None. auto: bf16 on a CUDA device that
    supports it and on a CPU with native bf16 (cpu_has_native_bf16), fp32 elsewhere."""
    if amp == "off":
        return None
    if amp == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if cpu_has_native_bf16() else None


def autocast_for(device, dtype):
    """A factory of autocast contexts for make_step / predict (None: plain fp32). Under
    autocast the matmuls of the MLP and the cross layers run in bf16; embedding tables,
    BatchNorm, the loss and the optimizer state stay fp32."""
    if dtype is None:
        return None
    return lambda: torch.autocast(device.type, dtype=dtype)


def make_optimizers(model, lr, weight_decay=0.0, decoupled=True):
    """The one optimizer rule of this project:
      - embedding tables built with sparse=True -> RowSparseAdam (lazy Adam: only the rows of
        the batch move; models/optim.py). No weight decay there: a row would decay only on
        the steps that see it.
      - everything else (MLP, cross layers, dense-field vectors, tables without sparse
        gradients) -> AdamW, fused (one kernel for all tensors instead of a loop over them).
    decoupled=False swaps AdamW for Adam with L2 in the gradient (weight_decay * w added to
    the gradient, then scaled by Adam's 1/sqrt(v): the decay a parameter gets depends on its
    gradient history). Both are the same when weight_decay = 0, the CTR default; the README
    of Stage 2 has the validation comparison that picked AdamW."""
    tables = [m.weight for m in model.modules() if isinstance(m, nn.Embedding) and m.sparse]
    table_ids = {id(t) for t in tables}
    rest = [p for p in model.parameters() if id(p) not in table_ids]
    fused = all(p.device.type in ("cpu", "cuda") for p in rest) or None
    dense_opt = torch.optim.AdamW if decoupled else torch.optim.Adam
    opts = [dense_opt(rest, lr=lr, weight_decay=weight_decay, fused=fused)] if rest else []
    if tables:
        opts.append(RowSparseAdam(tables, lr=lr))
    return opts


def make_step(model, optimizers, micro_batch=0, autocast=None):
    """step(dense, sparse, label) -> the batch's mean BCE (a detached tensor on the device: no
    host sync; read it with .item() only when you report it).

    With micro_batch > 0 a larger batch goes through forward and backward in slices of
    micro_batch rows (gradient accumulation): activation memory is that of one slice. Each
    slice's loss is its summed BCE / batch rows, so the gradients add up to the whole batch's
    mean-loss gradient - the same update, except that BatchNorm normalizes each slice by its
    own statistics ("ghost" batch norm). The slices' sparse embedding gradients are set aside
    and concatenated once (RowSparseAdam sums repeated rows anyway): letting autograd add them
    up re-sorts the growing sum at every slice, which cost LR 4x its samples/s at batch 32768
    in slices of 2048. `autocast`: a context manager factory (e.g. bf16 autocast) or None."""
    def forward_loss(dense, sparse, label, reduction):
        if autocast is None:
            logits = model(dense, sparse)
        else:
            with autocast():
                logits = model(dense, sparse)
        return F.binary_cross_entropy_with_logits(logits.float(), label, reduction=reduction)

    def step(dense, sparse, label):
        for o in optimizers:
            o.zero_grad(set_to_none=True)
        n = len(label)
        if not 0 < micro_batch < n:  # one pass over the whole batch
            loss = forward_loss(dense, sparse, label, "mean")
            loss.backward()
        else:
            loss, sparse_grads = 0.0, {}
            for i in range(0, n, micro_batch):
                s = slice(i, i + micro_batch)
                part = forward_loss(dense[s], sparse[s], label[s], "sum") / n
                part.backward()
                loss = loss + part.detach()
                for p in model.parameters():
                    if p.grad is not None and p.grad.is_sparse:
                        sparse_grads.setdefault(p, []).append(p.grad)
                        p.grad = None
            for p, grads in sparse_grads.items():
                p.grad = torch.sparse_coo_tensor(
                    torch.cat([g._indices() for g in grads], dim=1),
                    torch.cat([g._values() for g in grads]), grads[0].shape,
                    check_invariants=False)
        for o in optimizers:
            o.step()
        return loss.detach()
    return step


@torch.no_grad()
def predict(model, batches, device, autocast=None):
    """Probabilities and labels of every batch, collected on the device and copied to the host
    once (a .cpu() per batch would wait for the device every batch)."""
    was_training = model.training
    model.eval()
    probs, labels = [], []
    for dense, sparse, label in batches:
        dense, sparse = dense.to(device, non_blocking=True), sparse.to(device, non_blocking=True)
        if autocast is None:
            logits = model(dense, sparse)
        else:
            with autocast():
                logits = model(dense, sparse)
        probs.append(torch.sigmoid(logits.float()))
        labels.append(label)
    model.train(was_training)
    if not probs:
        return torch.zeros(0).numpy(), torch.zeros(0).numpy()
    return torch.cat(probs).cpu().numpy(), torch.cat(labels).numpy()


# ------------------------------------------------------------------- around the loop
def setup_distributed(device_name):
    """torchrun sets RANK/WORLD_SIZE; one process = one rank. gloo on CPU, nccl on CUDA."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = common.resolve_device(device_name, local)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    rank = dist.get_rank() if dist.is_initialized() else 0
    return rank, (dist.get_world_size() if dist.is_initialized() else 1), device


def train_source(cfg, stats, rare, device):
    """Where the training batches come from: the text loader (workers hand over 8 batches at
    a time and report their bad rows at the end of each pass), a binary cache folder read in
    blocks, or - with --preload device - the whole split resident in device memory."""
    shuffle = cfg.shuffle_buffer > 0
    if cfg.preload == "device":
        return criteo.Preloaded(criteo.read_all(cfg.train if not criteo.is_cache(cfg.train[0])
                                                else cfg.train[0], cfg.hash_bits, stats,
                                                rare_filter=rare),
                                cfg.batch_size, device, shuffle=shuffle, seed=cfg.seed)
    if criteo.is_cache(cfg.train[0]):
        return criteo.BinaryStream(cfg.train[0], cfg.batch_size, shuffle=shuffle,
                                   seed=cfg.seed, rare_filter=rare)
    return criteo.CriteoStream(cfg.train, cfg.batch_size, cfg.hash_bits, stats,
                               shuffle_buffer=cfg.shuffle_buffer, seed=cfg.seed,
                               group=8 if cfg.num_workers else 1, report=True,
                               rare_filter=rare)


def epoch_batches(stream, epoch, num_workers, batch_size, seed, device, reports):
    """The epoch's batches with whether each is the last one (a one-batch lookahead), so the
    loop can evaluate at the end of an epoch from one call site. The DataLoader gets its own
    generator: creating the iterator must not draw from the global RNG that dropout uses, or a
    resumed run would see other dropout masks than the original."""
    stream.set_epoch(epoch)
    if isinstance(stream, criteo.Preloaded):  # batches already on the device, no process
        it = iter(stream)
    else:  # pinned host memory: the copies to a GPU run asynchronously (non_blocking)
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=num_workers,
                                             pin_memory=device.type == "cuda",
                                             generator=torch.Generator().manual_seed(seed))
        it = criteo.iter_batches(loader, batch_size, reports)
    batch = next(it, None)
    while batch is not None:
        following = next(it, None)
        yield batch, following is None
        batch = following


# ------------------------------------------------------------------------------------ the run
def check_inputs(cfg, say):
    """Before any training step: every file readable, no file in two splits, the train files'
    first rows parse, val and test read whole (rows, bad rows, both classes present - AUC needs
    both). The train split may instead be one binary cache folder (07_binary_cache.py), checked
    by opening it. Returns the bad-row counts of val and test."""
    cache = criteo.is_cache(cfg.train[0])
    if cache:
        if len(cfg.train) > 1:
            raise TrainError(f"--train {cfg.train[0]} is a binary cache: give it alone")
        criteo.BinaryStream(cfg.train[0], cfg.batch_size)  # complete, and its sources unchanged
    where = {}
    for split, files in [("train", [] if cache else cfg.train), ("val", cfg.val),
                         ("test", cfg.test)]:
        for path in criteo.check_paths(files):
            other = where.setdefault(path.resolve(), split)
            if other != split:
                raise TrainError(f"{path}: is in --{other} and in --{split}; a model scored on "
                                 "rows it trained on (or tuned on) says nothing - split it first")
    if not cache and criteo.scan(cfg.train, stop_after=1)["rows"] == 0:
        raise TrainError(f"{cfg.train[0]}: no data rows (blank lines only?)")
    bad_rows = {}
    for split, files in [("val", cfg.val), ("test", cfg.test)]:
        s = criteo.scan(files)
        if s["rows"] == 0 or s["positives"][0] in (0, s["rows"]):
            raise TrainError(f"{files[0]}: --{split} has {s['rows']:,} rows and "
                             f"{s['positives'][0]:,.0f} positives; AUC needs both classes")
        bad_rows[split] = s["files"]
        for line in criteo.describe_bad_rows(s["files"]):
            say(f"{split}: {line}")
    return bad_rows


def dense_stats(stats_path, train_files, rank, say):
    """The train split's dense statistics. Given with --stats: read and checked against the
    train files (stale or broken: an error). Else <train>.stats.json, fitted by rank 0 when
    missing, broken or fitted on another version of the train file (with a notice). A binary
    cache has its statistics baked in: those (or None, raw values) are the ones val/test use."""
    if criteo.is_cache(train_files[0]):
        meta = json.loads((Path(train_files[0]) / "meta.json").read_text())
        return meta.get("dense_stats_values")
    if stats_path:
        if not Path(stats_path).is_file():
            raise TrainError(f"--stats {stats_path}: not found; leave --stats out to fit them "
                             f"from the train file, or make it with python stage2_ctr/"
                             f"02_dataloader.py --fit-stats {train_files[0]}")
        return criteo.load_stats(stats_path, train_files)
    path = Path(str(train_files[0]) + ".stats.json")
    if rank == 0:
        try:
            criteo.load_stats(path, train_files) if path.exists() else None
        except criteo.CriteoFormatError as e:
            say(f"{e}: fitting them again")
            path.unlink()
        if not path.exists():
            common.write_json(path, criteo.fit_stats(train_files, 1_000_000))
    if dist.is_initialized():
        dist.barrier()
    return criteo.load_stats(path)


def rare_filter(train_files, hash_bits, min_count, rank, say):
    """criteo.RareFilter from the bucket counts of the train files (None when min_count is 0).
    The counts are cached next to the first train file with the fingerprints of the files
    they were counted on, and recounted when those changed."""
    if not min_count:
        return None
    if criteo.is_cache(train_files[0]):
        counts = criteo.cache_counts(train_files[0], hash_bits)
        return _announce(criteo.RareFilter(counts, min_count, hash_bits), counts, say)
    path = Path(str(train_files[0]) + f".counts{hash_bits}.npz")
    now = json.dumps([criteo.fingerprint(p) for p in criteo.check_paths(train_files)])
    if rank == 0:
        try:
            with np.load(path, allow_pickle=False) as z:
                fresh = str(z["sources"]) == now
        except (OSError, KeyError, ValueError):
            fresh = False
        if not fresh:
            counts = criteo.count_buckets(train_files, hash_bits)

            def write(tmp):
                with open(tmp, "wb") as f:
                    np.savez(f, counts=counts, sources=np.array(now))
            common.atomic_write(path, write)
    if dist.is_initialized():
        dist.barrier()
    with np.load(path, allow_pickle=False) as z:
        counts = z["counts"]
    return _announce(criteo.RareFilter(counts, min_count, hash_bits), counts, say)


def _announce(filt, counts, say):
    say(f"--min-count {filt.min_count}: {int(filt.keep.sum()):,} buckets with >= "
        f"{filt.min_count} rows keep their own row, {filt.share_kept(counts):.1%} of the train "
        "values; the rest go to their field's rare bucket")
    return filt


def evaluate(model, stream, device, autocast=None):
    """AUC and LogLoss over a whole split (with DDP: each rank its shard, then gathered)."""
    p, y = predict(model, stream, device, autocast)
    if dist.is_initialized():
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (p, y))
        p = torch.cat([torch.from_numpy(g[0]) for g in gathered]).numpy()
        y = torch.cat([torch.from_numpy(g[1]) for g in gathered]).numpy()
    return common.auc_logloss(y, p)


def oracle_scores(files):
    """On synthetic data 01_make_subset.py wrote the oracle's scores into meta.json."""
    meta_path = Path(files[0]).parent / "meta.json"
    split = Path(files[0]).name.split(".")[0]
    if len(files) != 1 or not meta_path.exists():
        return None
    r = json.loads(meta_path.read_text()).get("splits", {}).get(split, {})
    if "oracle_auc" not in r:
        return None
    return {"auc": r["oracle_auc"][0], "logloss": r["oracle_logloss"][0]}


def save_last(path, model, optimizers, state, cfg):
    common.torch_save({"model": model.state_dict(), "state": state,
                       "rng": torch.get_rng_state(), "config": asdict(cfg),
                       "optimizers": [o.state_dict() for o in optimizers]}, path)


def load_last(path, model, optimizers, device, cfg):
    """The state of an interrupted run, after checking that last.pt is whole and was written
    with this config (what may differ: RESUMABLE)."""
    try:
        ckpt = torch.load(path, weights_only=True, map_location=device)
        saved = json.loads(json.dumps(ckpt["config"]))
    except Exception as e:  # a truncated file fails inside torch/zip with varying types
        raise TrainError(f"{path}: truncated or not a checkpoint of this trainer "
                         f"({type(e).__name__}); delete it to start over") from None
    now = json.loads(json.dumps(asdict(cfg)))
    differ = [k for k in now if k not in RESUMABLE and saved.get(k) != now[k]]
    if differ:
        raise TrainError(f"--resume: {path} was written with " + ", ".join(
            f"{k}={saved.get(k)!r} (now {now[k]!r})" for k in differ)
            + "; resume with the same settings, or start a new --run-name")
    model.load_state_dict(ckpt["model"])
    for opt, sd in zip(optimizers, ckpt["optimizers"]):
        opt.load_state_dict(sd)
    torch.set_rng_state(ckpt["rng"])
    return ckpt["state"]


# ---------------------------------------------------------------- training on in-memory data
# Data small enough to hold as tensors (Stage 3's experiments, MovieLens in 05): batches are
# slices of preloaded tensors, inputs a dict, outputs (B, T) - one column per task.
class CTRInputs(nn.Module):
    """Adapter: a Stage 2 model takes (dense, sparse); fit() hands a dict of inputs."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        out = self.model(x["dense"], x["sparse"])
        return out if out.dim() == 2 else out.unsqueeze(-1)


def batches(inputs, y, batch_size, generator=None):
    """Slices of preloaded tensors (shuffled when a generator is given): no per-row Python."""
    n = len(y)
    order = torch.randperm(n, generator=generator) if generator is not None else None
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size] if order is not None else slice(start,
                                                                             start + batch_size)
        yield {k: v[idx] for k, v in inputs.items()}, y[idx]


@torch.no_grad()
def predict_in_memory(model, inputs, batch_size=16384):
    """Raw model outputs (B, T) for a whole split."""
    model.eval()
    n = len(next(iter(inputs.values())))
    out = [model({k: v[i:i + batch_size] for k, v in inputs.items()})
           for i in range(0, n, batch_size)]
    model.train()
    return torch.cat(out).float()


def auc_per_task(model, split):
    inputs, y = split
    p = torch.sigmoid(predict_in_memory(model, inputs)).numpy()
    return [float(roc_auc_score(y[:, t].numpy(), p[:, t])) for t in range(y.shape[1])]


def fit(model, train, val, loss_fn, lr=1e-3, weight_decay=0.0, batch_size=256, epochs=20,
        patience=3, seed=0, task_weights=None, desc="train", quiet=False, max_seconds=None):
    """Minibatch training on in-memory tensors; after each epoch the mean validation AUC over
    tasks decides early stopping, and the best epoch's weights are restored.
    loss_fn(outputs (B, T), labels (B, T)) -> per-element losses (B, T)."""
    opts = make_optimizers(model, lr, weight_decay)
    gen = torch.Generator().manual_seed(seed)
    w = torch.tensor(task_weights if task_weights is not None else [1.0] * train[1].shape[1])
    best, history, samples, t_train = (-1.0, 0, None), [], 0, 0.0
    bar = tqdm(range(epochs), desc=desc, disable=quiet, leave=False)
    for epoch in bar:
        t0, n = time.perf_counter(), 0
        loss_sum = torch.zeros((), dtype=torch.float64)  # summed as a tensor: no sync per step
        for x, y in batches(*train, batch_size, gen):
            loss = (loss_fn(model(x), y).mean(0) * w).sum()
            for o in opts:
                o.zero_grad(set_to_none=True)
            loss.backward()
            for o in opts:
                o.step()
            loss_sum += loss.detach()
            n, samples = n + 1, samples + len(y)
        t_train += time.perf_counter() - t0
        loss_sum = loss_sum.item()
        aucs = auc_per_task(model, val)
        history.append({"epoch": epoch + 1, "train_loss": loss_sum / n, "val_auc": aucs})
        bar.set_postfix(loss=f"{loss_sum / n:.4f}", val_auc=" ".join(f"{a:.4f}" for a in aucs))
        score = float(np.mean(aucs))
        if score > best[0]:
            best = (score, epoch + 1, copy.deepcopy(model.state_dict()))
        elif epoch + 1 - best[1] >= patience:
            break
        if max_seconds and t_train > max_seconds:
            break
    model.load_state_dict(best[2])
    return {"best_epoch": best[1], "history": history,
            "train_samples_per_s": samples / max(t_train, 1e-9)}


def bce(logits, y):
    return F.binary_cross_entropy_with_logits(logits, y, reduction="none")
