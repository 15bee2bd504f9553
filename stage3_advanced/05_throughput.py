"""Stage 3, step 5: throughput at scale - 20M rows (5 GB) streamed, every Stage 2 model timed.

What you learn here: where the time goes when the data no longer fits in your head (it still
fits on disk): how fast the streaming loader reads a 5 GB file with 1 and 2 worker processes and
how little memory that takes; how training samples/s of each Stage 2 model changes with the
batch size, fed from preloaded tensors vs from the streaming loader (workers parsing while the
main process trains) vs from Stage 2's binary cache (parsed once, read as fixed-width records);
how close the MLP's matmuls come to the machine's sgemm peak (samples/s x FLOPs per sample /
peak GFLOP/s, the peak measured in the same run); and why memory follows the batch, not the
file: batches above --micro-batch go through forward/backward in slices whose gradients add up
before one optimizer step (gradient accumulation), so a 32k batch needs the activations of 2k.

Run:    python stage3_advanced/05_throughput.py                # 20M rows, ~12 min on 2 cores
                                                               # (+1.5 min once: file, cache)
        python stage3_advanced/05_throughput.py --quick        # 100k rows, 2 models, ~30 s
        python stage3_advanced/05_throughput.py --device cuda  # GPU figures -> results/gpu.md
Reads:  stage3_advanced/data/big_<rows>/train.txt, generated once (stage2_ctr/01_make_subset.py
        --synthetic <rows> --val-frac 0 --test-frac 0) when missing or incomplete, and its
        binary cache big_<rows>/train.bin/ (stage2_ctr/05_binary_cache.py), made once too.
Writes: results/stage3_throughput.md + .png (results/gpu.md with --device cuda);
        runs/stage3_throughput/partial_<device>_<rows>.json keeps every finished measurement, so
        an interrupted run picks up where it stopped (--fresh starts over). Result files are
        written atomically: an interrupted run never leaves a half-written table.
"""
import argparse
import ctypes
import gc
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stage3_common import (HERE, ROOT, load_numbered, make_optimizers, n_params,  # noqa: E402
                           pyplot, quick_or_results, save_figure, setup, write_json, write_text)
from models import MODELS, build_model  # noqa: E402
from models.layers import N_FIELDS  # noqa: E402

MLP_SIZES = (400, 400, 400)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=20_000_000, help="rows of the big file")
    p.add_argument("--data-root", default=str(HERE / "data"))
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    p.add_argument("--batch-sizes", default="1024,4096,16384,32768")
    p.add_argument("--workers", default="1,2",
                   help="loader worker counts: each for the loader-only pass; for training, the "
                        "first for every model, the others for --sweep-models only")
    p.add_argument("--sweep-models", nargs="+", default=["lr", "deepfm"], choices=list(MODELS),
                   help="the models trained with every --workers count (the fastest model, "
                        "whose loader share is highest, and the Stage 2 reference)")
    p.add_argument("--train-rows", type=int, default=131_072,
                   help="rows timed per training measurement (at least 4 batches)")
    p.add_argument("--emb-dim", type=int, default=16)
    p.add_argument("--hash-bits", type=int, default=20)
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--micro-batch", type=int, default=2048,
                   help="batches larger than this run forward/backward in micro-batches of "
                        "this size, gradients summed before one optimizer step (0 = never)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--fresh", action="store_true", help="ignore finished measurements")
    p.add_argument("--quick", action="store_true",
                   help="100k rows, LR + DeepFM, batches 1024/4096, 1 worker")
    p.add_argument("--out", default=None, help="default results/stage3_throughput.md, "
                   "results/gpu.md on cuda (--quick: runs/quick/, the committed table stays)")
    p.add_argument("--runs-dir", default=str(ROOT / "runs"), help="where the JSON goes")
    args = p.parse_args(argv)
    if args.quick:
        args.rows, args.models, args.batch_sizes = 100_000, ["lr", "deepfm"], "1024,4096"
        args.workers, args.train_rows = "1", 16_384
    args.batch_list = [int(b) for b in args.batch_sizes.split(",") if b]
    args.worker_list = [int(w) for w in args.workers.split(",") if w]
    if min(args.batch_list) < 1 or min(args.worker_list) < 1:
        p.error("--batch-sizes and --workers must be >= 1")
    if args.micro_batch < 0:
        p.error("--micro-batch must be >= 0 (0 = every batch in one pass)")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device visible to torch")
    if args.out is None:
        args.out = str(quick_or_results(args.quick) / (
            "gpu.md" if args.device.startswith("cuda") else "stage3_throughput.md"))
    return args


def peak_rss_mb():
    """Peak resident memory of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


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


def reset_peak_rss():
    """Linux: hand freed heap back to the OS, then forget this process's peak (VmHWM), so the
    next measurement's peak is its own. Elsewhere a no-op (the peak is then cumulative)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
    except (OSError, AttributeError):
        pass


def peak_since_reset_mb():
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return peak_rss_mb()


# -------------------------------------------------------------------------------------- data
def ensure_big_file(args):
    """Generate the big file once; meta.json is written last, so its presence means complete."""
    folder = Path(args.data_root) / f"big_{args.rows}"
    generator_rss = None
    if not (folder / "meta.json").exists():
        print(f"generating {args.rows:,} rows into {folder} (once)")
        proc = subprocess.Popen([sys.executable, str(ROOT / "stage2_ctr" / "01_make_subset.py"),
                                 "--synthetic", str(args.rows), "--val-frac", "0",
                                 "--test-frac", "0", "--out-dir", str(folder)])
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode:
            sys.exit(f"error: 01_make_subset.py failed (exit {proc.returncode})")
        generator_rss = usage.ru_maxrss / 1024
    return folder / "train.txt", generator_rss


def ensure_binary_cache(cache_mod, path):
    """Stage 2's binary cache of the big file, made once (written as .tmp, renamed at the end)."""
    folder = path.with_name("train.bin")
    if not (folder / "meta.json").exists():
        print(f"caching {path} as fixed-width binary records in {folder} (once)")
        cache_mod.write_cache([path], folder, workers=2)
    return folder


def binary_only(cache_mod, folder, batch_size=4096):
    """One full pass over the binary cache in this process: rows/s."""
    rows, t0 = 0, time.perf_counter()
    stream = cache_mod.BinaryStream(folder, batch_size)
    with tqdm(unit=" rows", unit_scale=True, desc="binary cache") as bar:
        for dense, _, _ in stream:
            rows += len(dense)
            bar.update(len(dense))
    seconds = time.perf_counter() - t0
    return {"rows": rows, "seconds": seconds, "rows_per_s": rows / seconds,
            "peak_rss_worker_mb": 0.0}


def loader_only(loader_mod, path, workers, batch_size=4096):
    """One full pass of the file through CriteoStream + DataLoader: rows/s."""
    stream = loader_mod.CriteoStream([path], batch_size, group=8, verbose=False)
    dl = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers)
    rows, t0, worker_rss = 0, time.perf_counter(), 0.0
    it = iter(dl)
    with tqdm(unit=" rows", unit_scale=True, desc=f"loader, {workers} worker(s)") as bar:
        for k, (dense, _, _) in enumerate(it):
            rows += len(dense)
            bar.update(len(dense))
            if k % 64 == 0:
                worker_rss = max(worker_rss, worker_peak_mb(it))
    seconds = time.perf_counter() - t0
    return {"rows": rows, "seconds": seconds, "rows_per_s": rows / seconds,
            "peak_rss_worker_mb": worker_rss}


def preload(loader_mod, path, rows):
    """The first `rows` rows as tensors (the in-memory baseline)."""
    stream = loader_mod.CriteoStream([path], 65536, verbose=False)
    parts, n = [], 0
    for part in stream:
        parts.append(part)
        n += len(part[0])
        if n >= rows:
            break
    return [torch.cat(t)[:rows] for t in zip(*parts)]


# ---------------------------------------------------------------------------------- training
def make_step(model, device, micro_batch=0):
    """One optimizer step per batch. With micro_batch > 0 a larger batch goes through forward
    and backward in slices of micro_batch rows (gradient accumulation): activation memory is
    that of one slice, not of the batch. Each slice's loss is its summed BCE / batch rows, so
    the gradients add up to the whole batch's mean-loss gradient - the same update, except that
    BatchNorm normalizes each slice by its own statistics ("ghost" batch norm). The slices'
    sparse embedding gradients are set aside and concatenated once (RowSparseAdam sums repeated
    rows anyway): letting autograd add them up re-sorts the growing sum at every slice, which
    cost LR 4x its samples/s at batch 32768 in slices of 2048 here."""
    opts = make_optimizers(model, 1e-3, 0.0)

    def step(dense, sparse, label):
        dense, sparse = dense.to(device, non_blocking=True), sparse.to(device, non_blocking=True)
        label = label.to(device, non_blocking=True)
        for o in opts:
            o.zero_grad(set_to_none=True)
        n = len(label)
        size = micro_batch if 0 < micro_batch < n else n
        sparse_grads = {}
        for i in range(0, n, size):
            logits = model(dense[i:i + size], sparse[i:i + size])
            loss = F.binary_cross_entropy_with_logits(logits, label[i:i + size],
                                                      reduction="sum") / n
            loss.backward()
            if size < n:
                for p in model.parameters():
                    if p.grad is not None and p.grad.is_sparse:
                        sparse_grads.setdefault(p, []).append(p.grad)
                        p.grad = None
        for p, grads in sparse_grads.items():
            p.grad = torch.sparse_coo_tensor(torch.cat([g._indices() for g in grads], dim=1),
                                             torch.cat([g._values() for g in grads]),
                                             grads[0].shape, check_invariants=False)
        for o in opts:
            o.step()
    return step


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_training(step, batches, n_steps, device, warmup=2):
    """Samples/s over n_steps after `warmup` steps (first-call costs excluded)."""
    it = iter(batches)
    for _ in range(warmup):
        step(*next(it))
    sync(device)
    t0, rows = time.perf_counter(), 0
    for _ in range(n_steps):
        batch = next(it)
        step(*batch)
        rows += len(batch[2])
    sync(device)
    return rows / (time.perf_counter() - t0)


def train_measure(args, loader_mod, path, mem, model_name, batch, source, device):
    """source: 'memory' (slices of preloaded tensors), 'loader-N' (N worker processes) or
    'binary' (Stage 2's binary cache, read in this process)."""
    it = None
    if source.startswith("loader"):
        # Workers start (fork) before the model exists: a forked child shares every page its
        # parent has at that moment, and Linux counts them in both RSS figures.
        stream = loader_mod.CriteoStream([path], batch, group=max(1, 32768 // batch),
                                         verbose=False)
        it = iter(torch.utils.data.DataLoader(stream, batch_size=None,
                                              num_workers=int(source.split("-")[1]),
                                              pin_memory=device.type == "cuda"))
    torch.manual_seed(0)
    sparse = device.type == "cpu"  # sparse gradients + RowSparseAdam on CPU (Stage 2's finding)
    model = build_model(model_name, 2 ** args.hash_bits, emb_dim=args.emb_dim,
                        mlp=MLP_SIZES, sparse=sparse).to(device)
    step = make_step(model, device, args.micro_batch)
    n_steps = max(4, args.train_rows // batch)
    extra = {}
    if source == "memory":
        def batches():
            for i in range(0, len(mem[2]) - batch + 1, batch):
                yield tuple(t[i:i + batch] for t in mem)
        speed = time_training(step, batches(), n_steps, device)
    elif source == "binary":  # read in this process: a slice per batch, nothing to parse
        stream = args.cache_mod.BinaryStream(args.cache_folder, batch)
        speed = time_training(step, iter(stream), n_steps, device)
    else:
        speed = time_training(step, loader_mod.iter_batches(it, batch), n_steps, device)
        extra["peak_rss_worker_mb"] = worker_peak_mb(it)
        extra["private_worker_mb"] = worker_private_mb(it)  # sampled at the end: steady state
        del it
    return {"model": model_name, "batch": batch, "source": source, "samples_per_s": speed,
            "params": n_params(model),
            "micro_batch": args.micro_batch if 0 < args.micro_batch < batch else 0, **extra}


def train_key(args, model, batch, source, micro_batch=None):
    """The measurement's name in the partial JSON; micro-batched steps get their own."""
    micro = args.micro_batch if micro_batch is None else micro_batch
    return f"train|{model}|{batch}|{source}" + (f"|micro{micro}" if 0 < micro < batch else "")


def sources_of(args, model):
    """Where the batches come from: preloaded tensors, then the loader with N workers."""
    workers = args.worker_list if model in args.sweep_models else args.worker_list[:1]
    return ["memory"] + [f"loader-{w}" for w in workers] + ["binary"]


def sgemm_peak_gflops(device, n=2048, repeats=20):
    """The best of `repeats` n x n float32 matmuls, in GFLOP/s: the machine's practical peak.
    On a shared machine one measurement can come out low (91 vs 124-127 GFLOP/s here), which
    would put the MLP's share above 100%: main() measures again after the training runs and
    keeps the higher figure."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / min(times) / 1e9


def mlp_flops_per_sample(emb_dim):
    """The MLP's multiply-adds x 2 (FLOPs) x 3 (forward + two backward matmuls)."""
    dims = [N_FIELDS * emb_dim, *MLP_SIZES, 1]
    return 2 * 3 * sum(i * o for i, o in zip(dims[:-1], dims[1:]))


# ------------------------------------------------------------------------------------ report
def report(args, res, device):
    peak = res["sgemm_gflops"]
    flops = mlp_flops_per_sample(args.emb_dim)
    lines = [f"# Stage 3: throughput at scale ({res['device_name']})", "",
             f"File: {res['file_rows']:,} rows, {res['file_gb']:.2f} GB "
             f"(synthetic Criteo format). Torch threads: {args.threads}. sgemm peak measured "
             f"in this run: {peak:,.0f} GFLOP/s.", "", "## Loader only (full pass)", "",
             "| reader, workers | rows | rows/s | seconds | peak RSS main MiB | "
             "peak RSS per worker MiB |",
             "|---|---|---|---|---|---|"]
    for w in args.worker_list + ["binary"]:
        r = res["done"].get(f"scan|{w}")
        if r:
            name = ("binary cache, in the main process" if w == "binary"
                    else f"text loader, {w}")
            lines.append(f"| {name} | {r['rows']:,} | {r['rows_per_s']:,.0f} | "
                         f"{r['seconds']:.1f} | {r['peak_rss_main_mb']:,.0f} | "
                         f"{r['peak_rss_worker_mb']:,.0f} |")
    if res.get("binary_cache_s"):
        lines += ["", f"The binary cache was made once in {res['binary_cache_s']:.0f} s "
                  "(stage2_ctr/05_binary_cache.py: one parse of the file, 2 workers)."]
    sources = ["memory"] + [f"loader-{w}" for w in args.worker_list] + ["binary"]
    lines += ["", "## Training samples/s (AdamW + RowSparseAdam on CPU, "
              f"emb {args.emb_dim}, MLP {'-'.join(map(str, MLP_SIZES))})", "",
              "| model | batch | " + " | ".join(sources)
              + " | best text loader / memory | binary / memory | MLP share of sgemm peak | "
              f"loader-{args.worker_list[0]} memory MiB: main peak RSS + worker private "
              "= total |",
              "|---|---|" + "---|" * len(sources) + "---|---|---|---|"]
    for m in args.models:
        for b in args.batch_list:
            speeds = [res["done"].get(train_key(args, m, b, s), {}).get("samples_per_s")
                      for s in sources]
            if speeds[0] is None:
                continue
            cells = [f"{s:,.0f}" if s else "-" for s in speeds]
            best = max([s for s in speeds[1:-1] if s] or [0])
            binary = f"{speeds[-1] / speeds[0]:.0%}" if speeds[-1] else "-"
            share = (f"{speeds[0] * flops / 1e9 / peak:.0%}" if m in ("dnn", "deepfm", "dcn",
                                                                     "dcnv2") else "-")
            r = res["done"].get(train_key(args, m, b, sources[1]), {})
            rss = f"{r.get('peak_rss_main_mb', 0):,.0f}" + (
                f" + {r['private_worker_mb']:,.0f} = "
                f"{r['peak_rss_main_mb'] + r['private_worker_mb']:,.0f}"
                if "private_worker_mb" in r else "")
            batch = f"{b:,}" + (f" ({b // args.micro_batch} x {args.micro_batch:,})"
                                if 0 < args.micro_batch < b else "")
            lines.append(f"| {m} | {batch} | " + " | ".join(cells)
                         + f" | {best / speeds[0]:.0%} | {binary} | {share} | {rss} |")
    lines += micro_batch_section(args, res, sources[:2])
    gen = res.get("rss_generator_mb")
    lines += ["", "Peak RSS is measured per row (Linux VmHWM reset before each measurement): "
              f"the largest in the main process was {res['rss_main_mb']:,.0f} MiB"
              + (f"; the generator (01_make_subset.py, {res['file_rows']:,} rows) peaked at "
                 f"{gen:,.0f} MiB" if gen else "") + ". A forked worker's RSS (VmHWM, "
              f"{worker_rss_range(res, args)} MiB during training) includes the pages it shares "
              "copy-on-write with the main process, already counted there; the total above "
              "adds only the worker's private pages (USS, from /proc/PID/smaps_rollup at the "
              "end of the measurement)."
              + (f" Peak GPU memory {res['gpu_mb']:,.0f} MiB." if res.get("gpu_mb") else ""),
              "", f"Command: `python stage3_advanced/05_throughput.py"
              f"{' --quick' if args.quick else ''}"
              f"{' --device ' + args.device if device.type != 'cpu' else ''}` "
              f"({sum(res['session_s']) / 60:.1f} min over {len(res['session_s'])} "
              "session(s))."]
    return "\n".join(lines) + "\n"


def worker_rss_range(res, args):
    peaks = [r["peak_rss_worker_mb"] for k, r in res["done"].items()
             if k.startswith("train|") and "peak_rss_worker_mb" in r]
    return f"{min(peaks):,.0f}-{max(peaks):,.0f}" if peaks else "-"


def micro_batch_section(args, res, sources):
    """Batches above --micro-batch: one forward/backward pass vs micro-batches, where the
    partial JSON holds both (run once with --micro-batch 0 to measure the one-pass rows)."""
    rows = []
    for m in args.models:
        for b in args.batch_list:
            for s in sources:
                one = res["done"].get(train_key(args, m, b, s, micro_batch=0))
                micro = res["done"].get(train_key(args, m, b, s))
                if one is None or micro is None or one is micro:
                    continue
                rows.append(f"| {m} | {b:,} | {s} | {one['samples_per_s']:,.0f} | "
                            f"{micro['samples_per_s']:,.0f} | {one['peak_rss_main_mb']:,.0f} | "
                            f"{micro['peak_rss_main_mb']:,.0f} |")
    if not rows:
        return []
    return ["", f"## Large batches: one pass vs micro-batches of {args.micro_batch:,}", "",
            "Activation memory grows with the batch; the table and the gradients do not. "
            "Slicing a batch for forward/backward and summing the gradients before the one "
            "optimizer step keeps the update (BatchNorm aside) and the memory of a small batch. "
            "(The one-pass rows are measurements of `--micro-batch 0` kept in the partial JSON; "
            "where they come from another session of the script than the micro-batched ones, "
            "their samples/s ratio carries that session-to-session noise.)",
            "", "| model | batch | source | samples/s, one pass | samples/s, micro-batches | "
            "peak RSS main MiB, one pass | peak RSS main MiB, micro-batches |",
            "|---|---|---|---|---|---|---|", *rows]


def plot(args, res, path):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, m in enumerate(args.models):
        for source, style in [("memory", "-"), (f"loader-{args.worker_list[0]}", "--"),
                              ("binary", ":")]:
            pts = [(b, res["done"][train_key(args, m, b, source)]["samples_per_s"])
                   for b in args.batch_list if train_key(args, m, b, source) in res["done"]]
            if pts:
                ax.plot(*zip(*pts), style, marker="o", ms=3, color=f"C{i}",
                        label=f"{m} ({source.split('-')[0]})")
    ax.set(xscale="log", yscale="log", xlabel="batch size", ylabel="training samples/s",
           title=f"training throughput, {res['device_name']}\n"
                 "solid: in memory, dashed: text loader (1 worker), dotted: binary cache")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    save_figure(fig, path)


def main(argv=None):
    args = parse_args(argv)
    t0 = time.perf_counter()
    device = torch.device(args.device)
    setup(args.threads, 0)
    loader_mod = load_numbered("stage2_ctr/02_dataloader.py", "criteo_loader")
    partial_path = (Path(args.runs_dir) / "stage3_throughput"
                    / f"partial_{args.device}_{args.rows}.json")
    res = ({} if args.fresh or not partial_path.exists()
           else json.loads(partial_path.read_text()))
    if res.get("file_rows") != args.rows or res.get("threads") != args.threads:
        res = {"file_rows": args.rows, "threads": args.threads, "done": {}}
    if res["done"]:
        print(f"resuming: {len(res['done'])} measurements already in {partial_path}")
    path, generator_rss = ensure_big_file(args)
    if generator_rss:
        res["rss_generator_mb"] = generator_rss
    res["file_gb"] = path.stat().st_size / 1e9
    res["device_name"] = (torch.cuda.get_device_name(device) if device.type == "cuda"
                          else f"CPU, {torch.get_num_threads()} threads")
    if "sgemm_gflops" not in res:  # one peak per results file: the shares stay comparable
        res["sgemm_gflops"] = sgemm_peak_gflops(device)
    print(f"{path}: {args.rows:,} rows, {res['file_gb']:.2f} GB | sgemm peak "
          f"{res['sgemm_gflops']:,.0f} GFLOP/s on {res['device_name']}")

    n_done_before = len(res["done"])

    def record(key, fn):
        if key not in res["done"]:
            reset_peak_rss()
            res["done"][key] = dict(fn(), peak_rss_main_mb=peak_since_reset_mb())
            write_json(partial_path, res)  # atomic: a kill leaves the previous version
        return res["done"][key]

    args.cache_mod = load_numbered("stage2_ctr/05_binary_cache.py", "binary_cache")
    t_cache = time.perf_counter()
    cache_existed = (path.with_name("train.bin") / "meta.json").exists()
    args.cache_folder = ensure_binary_cache(args.cache_mod, path)
    if not cache_existed:
        res["binary_cache_s"] = time.perf_counter() - t_cache
    for w in args.worker_list:
        r = record(f"scan|{w}", lambda: loader_only(loader_mod, path, w))
        print(f"loader only, {w} worker(s): {r['rows_per_s']:,.0f} rows/s over {r['rows']:,}")
    r = record("scan|binary", lambda: binary_only(args.cache_mod, args.cache_folder))
    print(f"binary cache only: {r['rows_per_s']:,.0f} rows/s over {r['rows']:,}")
    mem = preload(loader_mod, path, max(4 * max(args.batch_list), args.train_rows)
                  + 2 * max(args.batch_list))
    jobs = [(m, b, s) for m in args.models for b in args.batch_list
            for s in sources_of(args, m)]
    for m, b, s in tqdm(jobs, desc="training measurements"):
        r = record(train_key(args, m, b, s),
                   lambda: train_measure(args, loader_mod, path, mem, m, b, s, device))
        tqdm.write(f"{m:<7} batch {b:>6,} {s:<9} {r['samples_per_s']:>10,.0f} samples/s")
    res["sgemm_gflops"] = max(res["sgemm_gflops"], sgemm_peak_gflops(device))  # see there
    current = [f"scan|{w}" for w in args.worker_list + ["binary"]] + [
        train_key(args, m, b, s) for m, b, s in jobs]
    res["rss_main_mb"] = max(res["done"][k]["peak_rss_main_mb"] for k in current
                             if k in res["done"])
    if device.type == "cuda":
        res["gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
    if len(res["done"]) > n_done_before or not res.get("session_s"):  # measured something
        res.setdefault("session_s", []).append(time.perf_counter() - t0)
    write_json(partial_path, res)
    out = Path(args.out)
    table = report(args, res, device)
    write_text(out, table)
    plot(args, res, out.with_suffix(".png"))
    print(table)
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
