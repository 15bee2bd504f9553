"""The measurements of Stage 3's throughput chapter (05_throughput.py), importable so that the
GPU run (07_gpu.py) times exactly the same things: the big file and its binary cache, a full
pass of each reader, and training samples/s of one Stage 2 model fed from preloaded tensors,
the streaming text loader or the binary cache. Memory is read from /proc (Linux).
"""
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

import common
from stage2_ctr import binary_cache, criteo
from stage2_ctr.models import build_model, criteo_schema
from stage2_ctr.models.mtl import n_params
from stage2_ctr.training import autocast_for, make_optimizers, make_step

MLP_SIZES = (400, 400, 400)


@dataclass
class Measure:
    """How one training measurement is set up (the same for every model and source)."""
    emb_dim: int = 16
    hash_bits: int = 20
    micro_batch: int = 2048   # batches above this run forward/backward in slices (0: never)
    train_rows: int = 131_072  # rows timed per measurement (at least 4 batches)
    amp: str = "off"          # off | bf16 (autocast around the forward pass)
    sparse: bool = None       # sparse tables + RowSparseAdam (None: on CPU, dense on CUDA)
    compile: bool = False     # torch.compile the model
    compile_backend: str = "inductor"  # eager / aot_eager: the same path without codegen


# ------------------------------------------------------------------------------- memory
def worker_proc_mb(loader_iter, proc_file, fields):
    """Largest, over the live DataLoader workers, of the sum of `fields` (kB) in
    /proc/PID/<proc_file>, in MiB (Linux; the worker list is a private attribute of the
    iterator, so 0 where it is missing)."""
    sizes = []
    for w in getattr(loader_iter, "_workers", []):
        try:
            text = Path(f"/proc/{w.pid}/{proc_file}").read_text()
        except OSError:
            continue
        sizes.append(sum(int(x.split()[1]) for x in text.splitlines()
                         if x.startswith(fields)) / 1024)
    return max(sizes, default=0.0)


def worker_peak_mb(loader_iter):
    """Peak RSS (VmHWM) of the workers. A forked worker's RSS also counts the pages it shares
    copy-on-write with the main process."""
    return worker_proc_mb(loader_iter, "status", ("VmHWM:",))


def worker_private_mb(loader_iter):
    """Private memory (USS: Private_Clean + Private_Dirty) of the workers: the pages a worker
    adds to the machine's use. Its other resident pages are shared with the main process
    (fork) and already counted in the main's RSS."""
    return worker_proc_mb(loader_iter, "smaps_rollup", ("Private_Clean:", "Private_Dirty:"))


# --------------------------------------------------------------------------------- data
def ensure_big_file(data_root, rows, workers=None):
    """Generate the big file once (01_make_subset.py in a child process, so its own peak RSS
    can be read); meta.json is written last, so its presence means complete."""
    folder = Path(data_root) / f"big_{rows}"
    generator_rss = None
    if not (folder / "meta.json").exists():
        print(f"generating {rows:,} rows into {folder} (once)")
        proc = subprocess.Popen([sys.executable, str(common.ROOT / "stage2_ctr" /
                                                     "01_make_subset.py"),
                                 "--synthetic", str(rows), "--val-frac", "0",
                                 "--test-frac", "0", "--out-dir", str(folder)]
                                + (["--workers", str(workers)] if workers else []))
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS
        if os.waitstatus_to_exitcode(status):
            sys.exit(f"error: 01_make_subset.py failed (exit {os.waitstatus_to_exitcode(status)})")
        generator_rss = usage.ru_maxrss / 1024
    return folder / "train.txt", generator_rss


def ensure_binary_cache(path, workers=2):
    """Stage 2's binary cache of the big file, made once (written as .tmp, renamed at the end).
    Returns the folder and the seconds it took (None when it was there)."""
    folder = path.with_name("train.bin")
    if (folder / "meta.json").exists():
        return folder, None
    print(f"caching {path} as fixed-width binary records in {folder} (once)")
    t0 = time.perf_counter()
    binary_cache.write_cache([path], folder, workers=workers)
    return folder, time.perf_counter() - t0


def binary_only(folder, batch_size=4096):
    """One full pass over the binary cache in this process: rows/s."""
    rows, t0 = 0, time.perf_counter()
    with tqdm(unit=" rows", unit_scale=True, desc="binary cache") as bar:
        for dense, _, _ in binary_cache.BinaryStream(folder, batch_size):
            rows += len(dense)
            bar.update(len(dense))
    seconds = time.perf_counter() - t0
    return {"rows": rows, "seconds": seconds, "rows_per_s": rows / seconds,
            "peak_rss_worker_mb": 0.0}


def loader_only(path, workers, batch_size=4096):
    """One full pass of the file through CriteoStream + DataLoader: rows/s."""
    stream = criteo.CriteoStream([path], batch_size, group=8)
    it = iter(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers))
    rows, t0, worker_rss = 0, time.perf_counter(), 0.0
    with tqdm(unit=" rows", unit_scale=True, desc=f"loader, {workers} worker(s)") as bar:
        for k, (dense, _, _) in enumerate(it):
            rows += len(dense)
            bar.update(len(dense))
            if k % 64 == 0:
                worker_rss = max(worker_rss, worker_peak_mb(it))
    seconds = time.perf_counter() - t0
    return {"rows": rows, "seconds": seconds, "rows_per_s": rows / seconds,
            "peak_rss_worker_mb": worker_rss}


def preload(path, rows):
    """The first `rows` rows as tensors (the in-memory baseline)."""
    parts, n = [], 0
    for part in criteo.CriteoStream([path], 65536):
        parts.append(part)
        n += len(part[0])
        if n >= rows:
            break
    return [torch.cat(t)[:rows] for t in zip(*parts)]


# ----------------------------------------------------------------------------- training
def time_training(step, batches, n_steps, device, warmup=2):
    """Samples/s over n_steps after `warmup` steps (first-call costs excluded). The host waits
    for the device only at the two ends of the timed span."""
    it = iter(batches)
    for _ in range(warmup):
        step(*(t.to(device, non_blocking=True) for t in next(it)))
    common.synchronize(device)
    t0, rows = time.perf_counter(), 0
    for _ in range(n_steps):
        batch = next(it)
        step(*(t.to(device, non_blocking=True) for t in batch))
        rows += len(batch[2])
    common.synchronize(device)
    return rows / (time.perf_counter() - t0)


def train_measure(m, model_name, batch, source, device, path=None, mem=None, cache=None):
    """Samples/s of one model at one batch size. source: 'memory' (slices of the preloaded
    host tensors `mem`, copied to the device batch by batch), 'device' (the same rows resident
    in device memory: binary_cache.Preloaded), 'loader-N' (the text loader over `path` with N worker
    processes) or 'binary' (the binary cache folder `cache`, read in this process)."""
    it = None
    if source.startswith("loader"):
        # Workers start (fork) before the model exists: a forked child shares every page its
        # parent has at that moment, and Linux counts them in both RSS figures.
        stream = criteo.CriteoStream([path], batch, group=max(1, 32768 // batch))
        it = iter(torch.utils.data.DataLoader(stream, batch_size=None,
                                              num_workers=int(source.split("-")[1]),
                                              pin_memory=device.type == "cuda"))
    torch.manual_seed(0)
    # sparse gradients + RowSparseAdam on CPU (Stage 2's finding); a dense table by default on
    # CUDA, where sweeping 2^20 rows with fused AdamW is cheap
    sparse = device.type == "cpu" if m.sparse is None else m.sparse
    model = build_model(model_name, criteo_schema(m.hash_bits), emb_dim=m.emb_dim,
                        mlp=MLP_SIZES, sparse=sparse).to(device)
    train_model = torch.compile(model, backend=m.compile_backend) if m.compile else model
    step = make_step(train_model, make_optimizers(model, 1e-3), m.micro_batch,
                     autocast=autocast_for(device, torch.bfloat16 if m.amp == "bf16" else None))
    n_steps = max(4, m.train_rows // batch)
    extra = {}
    if source in ("memory", "device"):
        rows = mem if source == "memory" else [t.to(device) for t in mem]
        batches = (tuple(t[i:i + batch] for t in rows)
                   for i in range(0, len(rows[2]) - batch + 1, batch))
        speed = time_training(step, batches, n_steps, device)
        del rows
    elif source == "binary":  # a slice per batch, nothing to parse
        speed = time_training(step, binary_cache.BinaryStream(cache, batch), n_steps, device)
    else:
        speed = time_training(step, criteo.iter_batches(it, batch), n_steps, device)
        extra["peak_rss_worker_mb"] = worker_peak_mb(it)
        extra["private_worker_mb"] = worker_private_mb(it)  # sampled at the end: steady state
        del it
    return {"model": model_name, "batch": batch, "source": source, "samples_per_s": speed,
            "params": n_params(model), "amp": m.amp, "sparse": sparse, "compile": m.compile,
            "micro_batch": m.micro_batch if 0 < m.micro_batch < batch else 0, **extra}


def train_key(model, batch, source, micro_batch, amp="off"):
    """A measurement's name in the partial JSON; micro-batched and bf16 steps get their own."""
    return (f"train|{model}|{batch}|{source}"
            + (f"|micro{micro_batch}" if 0 < micro_batch < batch else "")
            + ("|bf16" if amp == "bf16" else ""))


def mlp_flops_per_sample(emb_dim, n_fields=criteo_schema().n_fields, model="dnn",
                         cross_layers=3):
    """The matmuls' multiply-adds x 2 (FLOPs) x 3 (forward + two backward matmuls): the MLP,
    and DCN-v2's d x d cross layers."""
    dims = [n_fields * emb_dim, *MLP_SIZES, 1]
    macs = sum(i * o for i, o in zip(dims[:-1], dims[1:]))
    if model == "dcnv2":
        macs += cross_layers * (n_fields * emb_dim) ** 2
    return 2 * 3 * macs
