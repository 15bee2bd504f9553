"""The measurements of Stage 1's DataLoader chapter (06_dataloader_tuning.py), importable so that
the GPU run (stage3_advanced/07_gpu.py) times exactly the same code on CUDA: the learning rate
per batch size, an input path on its own, a DataLoader setting's start-up and epoch cost, and
a training step split into host gather, host-to-device copy and device compute.

Every timing trains the shared-bottom MLP of mtml.py (SharedBottomMTL, mtml.train_step) on the
Adult npz; nothing here decides a model's numbers, only how fast batches reach it.
"""
import math
import statistics
import time

import torch

import common
from stage1_adult import mtml

LR_RULES = ("sqrt", "linear", "constant")


def lr_for(batch_size, base_lr=1e-3, base_batch=256, rule="sqrt"):
    """The learning rate at another batch size. sqrt: lr * sqrt(B / B0) - the rule for Adam-type
    optimizers (the gradient noise shrinks like 1/sqrt(B); Malladi et al. 2022, "On the SDEs and
    scaling rules for adaptive gradient algorithms"); linear: lr * B / B0 (Goyal et al. 2017,
    for SGD); constant: the same lr at every size."""
    scale = {"sqrt": math.sqrt(batch_size / base_batch), "linear": batch_size / base_batch,
             "constant": 1.0}[rule]
    return base_lr * scale


def model_for(meta, cfg, device):
    """The model of a run of cfg (both tasks), its AdamW and the task weights, on `device`."""
    torch.manual_seed(cfg.seed)
    tasks = mtml.TASKS[cfg.tasks]
    model = mtml.SharedBottomMTL(meta, tasks, cfg.num_encoding, cfg.num_dim, cfg.max_cat_dim,
                                 cfg.hidden, cfg.dropout).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return model, opt, {"income": cfg.wA, "married": cfg.wB}


# ------------------------------------------------------------------------ (b) input paths
def input_path_speed(train, path, batch_size, device, model=None, repeats=3):
    """Samples/s of one epoch through input path `path` (a key of mtml.LOADERS), median of
    `repeats` epochs; with model = (model, opt, weights) every batch also takes a training
    step, without it only the batches are made (and moved to the device)."""
    if path == "device":
        train = {k: v.to(device) for k, v in train.items()}
    make_batches, gen = mtml.LOADERS[path], torch.Generator().manual_seed(0)
    speeds = []
    for _ in range(repeats):
        rows, t0 = 0, time.perf_counter()
        for batch in make_batches(train, batch_size, True, gen):
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            if model is not None:
                mtml.train_step(*model[:2], batch, model[2])
            rows += len(batch["y_income"])
        common.synchronize(device)
        speeds.append(rows / (time.perf_counter() - t0))
    return statistics.median(speeds)


# ------------------------------------------------------------------ (c) DataLoader settings
def _one_thread(_worker_id):
    torch.set_num_threads(1)  # each worker one thread: the cores are the workers'


def settings_loader(train, batch_size, workers=0, pin_memory=False, persistent=False,
                    prefetch=None, whole_batches=False, seed=0):
    """A DataLoader over the training split with the given settings: per-sample indexing and
    collate, or (whole_batches) a BatchSampler that indexes one batch at a time."""
    ds = torch.utils.data.TensorDataset(*train.values())
    gen = torch.Generator().manual_seed(seed)
    extra = {"num_workers": workers, "pin_memory": pin_memory,
             "worker_init_fn": _one_thread if workers else None}
    if workers:
        extra.update(persistent_workers=persistent, prefetch_factor=prefetch or 2)
    if whole_batches:
        sampler = torch.utils.data.BatchSampler(
            torch.utils.data.RandomSampler(ds, generator=gen), batch_size, drop_last=False)
        return torch.utils.data.DataLoader(ds, sampler=sampler, batch_size=None, **extra)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True, generator=gen,
                                       **extra)


def settings_cost(loader, keys, model, device, epochs=3):
    """Train `epochs` epochs from `loader`: the start-up (iter() to the first batch: worker
    processes forked and their first prefetch) and the seconds of each epoch. With
    persistent_workers only the first epoch pays the start-up; otherwise every epoch does."""
    startups, epoch_s, rows = [], [], 0
    for _ in range(epochs):
        t0 = time.perf_counter()
        it = iter(loader)
        first = next(it)
        startups.append(time.perf_counter() - t0)
        for tensors in _chain(first, it):
            batch = {k: v.to(device, non_blocking=True) for k, v in zip(keys, tensors)}
            mtml.train_step(*model[:2], batch, model[2])
            rows += len(batch["y_income"])
        common.synchronize(device)
        epoch_s.append(time.perf_counter() - t0)
        del it
    return {"startup_first_s": startups[0], "startup_later_s": statistics.median(startups[1:]
                                                                                 or startups),
            "first_epoch_s": epoch_s[0], "later_epoch_s": statistics.median(epoch_s[1:]
                                                                           or epoch_s),
            "samples_per_s": rows / sum(epoch_s)}


def _chain(first, it):
    yield first
    yield from it


# ------------------------------------------------------------------ (d) a step on a device
def step_breakdown(train, model, device, batch_size, steps=30, warmup=3):
    """Milliseconds per step of: the host gather (index_select of a random batch, into pinned
    memory on CUDA so that the copy can be asynchronous), the host-to-device copy (pageable
    blocking, pinned non_blocking), the device compute (a step on a batch already there) and
    the full step from host memory (gather + pinned non_blocking copy + step). Each timed with
    the device synchronized, medians over `steps` steps after `warmup`."""
    cuda = device.type == "cuda"
    n = len(train["y_income"])
    gen = torch.Generator().manual_seed(0)
    pinned = {k: torch.empty((batch_size, *v.shape[1:]), dtype=v.dtype,
                             pin_memory=cuda) for k, v in train.items()}
    on_device = {k: v[:batch_size].to(device) for k, v in train.items()}
    times = {"gather_ms": [], "copy_pageable_ms": [], "copy_pinned_ms": [], "compute_ms": [],
             "full_step_ms": []}

    def timed(key, fn):
        common.synchronize(device)
        t0 = time.perf_counter()
        out = fn()
        common.synchronize(device)
        times[key].append((time.perf_counter() - t0) * 1e3)
        return out

    for i in range(warmup + steps):
        idx = torch.randint(0, n, (batch_size,), generator=gen)
        gathered = timed("gather_ms", lambda: {k: torch.index_select(v, 0, idx, out=pinned[k])
                                              for k, v in train.items()})
        pageable = {k: v.clone() for k, v in gathered.items()}
        timed("copy_pageable_ms", lambda: {k: v.to(device) for k, v in pageable.items()})
        timed("copy_pinned_ms", lambda: {k: v.to(device, non_blocking=True)
                                         for k, v in gathered.items()})
        timed("compute_ms", lambda: mtml.train_step(*model[:2], on_device, model[2]))
        timed("full_step_ms", lambda: mtml.train_step(*model[:2], {
            k: torch.index_select(v, 0, idx, out=pinned[k]).to(device, non_blocking=True)
            for k, v in train.items()}, model[2]))
        if i == warmup - 1:
            times = {k: [] for k in times}
    out = {k: statistics.median(v) for k, v in times.items()}
    input_ms = out["gather_ms"] + out["copy_pinned_ms"]
    out.update(batch=batch_size, copy_share=out["copy_pinned_ms"] / out["full_step_ms"],
               input_ms=input_ms, device_bound=out["compute_ms"] >= input_ms,
               samples_per_s=batch_size / out["full_step_ms"] * 1e3)
    return out


def device_part(npz, device, batch_sizes, cfg, steps=30):
    """(d) step_breakdown at every batch size, and the first batch where the input path takes
    longer than the device step (from there on the GPU waits for its input)."""
    data, meta = mtml.load_npz(npz)
    train = data["train"]
    rows = []
    for b in batch_sizes:
        model = model_for(meta, cfg, device)
        rows.append(step_breakdown(train, model, device, min(b, len(train["y_income"])), steps))
    knee = next((r["batch"] for r in rows if not r["device_bound"]), None)
    return {"rows": rows, "input_bound_from_batch": knee}
