"""Stage 3, step 5: throughput at scale - 20M rows (5 GB) streamed, every Stage 2 model timed.

What you learn here: where the time goes when the data no longer fits in your head (it still
fits on disk): how fast the streaming loader reads a 5 GB file with 1 and 2 worker processes and
how little memory that takes; how training samples/s of each Stage 2 model changes with the
batch size, fed from preloaded tensors vs from the streaming loader (workers parsing while the
main process trains) vs from Stage 2's binary cache (parsed once, read as fixed-width records);
how close the MLP's matmuls come to the machine's matmul peak (samples/s x FLOPs per sample /
peak GFLOP/s, the peak measured in the same run); and why memory follows the batch, not the
file: batches above --micro-batch go through forward/backward in slices whose gradients add up
before one optimizer step (gradient accumulation), so a 32k batch needs the activations of 2k.

Read with it: stage3_advanced/throughput.py (what each measurement does) and, for the step,
stage2_ctr/training.py (make_step: micro-batches and their sparse gradients).
Run:    python stage3_advanced/05_throughput.py                # 20M rows, ~12 min on 2 cores
                                                               # (+1.5 min once: file, cache)
        python stage3_advanced/05_throughput.py --quick        # 100k rows, 2 models, ~30 s
        python stage3_advanced/05_throughput.py --amp bf16     # bf16 autocast (see Stage 2's
                                                               # 06 --parts precision first)
        (the prepared GPU run is 07_gpu.py: it times the same things on CUDA)
Reads:  stage3_advanced/data/big_<rows>/train.txt, generated once (stage2_ctr/01_make_subset.py
        --synthetic <rows> --val-frac 0 --test-frac 0) when missing or incomplete, and its
        binary cache big_<rows>/train.bin/ (stage2_ctr/07_binary_cache.py), made once too.
Writes: results/stage3_throughput.md + .png (with --device cuda: stage3_throughput_cuda.md);
        runs/stage3_throughput/partial_<device>_<rows>.json keeps every finished measurement, so
        an interrupted run picks up where it stopped (--fresh starts over). Result files are
        written atomically: an interrupted run never leaves a half-written table.
"""
import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: plain imports
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import common  # noqa: E402
from stage2_ctr.models import MODELS  # noqa: E402
from stage3_advanced import throughput as tp  # noqa: E402

HERE = Path(__file__).resolve().parent


# --workers sets what is measured here (the loader's worker counts): not a harmless flag
HARMLESS = common.HARMLESS_FLAGS - {"--workers"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=common.positive_int, default=20_000_000,
                   help="rows of the big file")
    p.add_argument("--data-root", default=str(HERE / "data"))
    p.add_argument("--models", nargs="+", choices=MODELS, default=MODELS)
    p.add_argument("--batch-sizes", type=common.positive_int_list,
                   default=[1024, 4096, 16384, 32768])
    p.add_argument("--workers", type=common.positive_int_list, default=[1, 2],
                   help="loader worker counts: each for the loader-only pass; for training, the "
                        "first for every model, the others for --sweep-models only")
    p.add_argument("--sweep-models", nargs="+", default=["lr", "deepfm"], choices=MODELS,
                   help="the models trained with every --workers count (the fastest model, "
                        "whose loader share is highest, and the Stage 2 reference)")
    p.add_argument("--train-rows", type=common.positive_int, default=131_072,
                   help="rows timed per training measurement (at least 4 batches)")
    p.add_argument("--emb-dim", type=common.positive_int, default=16)
    p.add_argument("--hash-bits", type=common.hash_bits, default=20)
    p.add_argument("--device", type=common.device_arg, default="cpu", help="cpu | cuda")
    p.add_argument("--amp", choices=["off", "bf16"], default="off",
                   help="bf16 autocast around every model's forward pass")
    p.add_argument("--micro-batch", type=common.non_negative_int, default=2048,
                   help="batches larger than this run forward/backward in micro-batches of "
                        "this size, gradients summed before one optimizer step (0 = never)")
    p.add_argument("--threads", type=common.positive_int, default=2, help="torch CPU threads")
    p.add_argument("--fresh", action="store_true", help="ignore finished measurements")
    p.add_argument("--quick", action="store_true",
                   help="defaults 100k rows, LR + DeepFM, batches 1024/4096, 1 worker")
    p.add_argument("--out", default=None, help="default results/stage3_throughput.md for the "
                   "default run, *_cuda.md on CUDA (--quick: runs/quick/, other flags: "
                   "runs/partial/; the committed table stays)")
    p.add_argument("--runs-dir", default=str(common.RUNS), help="where the JSON goes")
    args = common.parse_with_quick(p, argv, dict(
        rows=100_000, models=["lr", "deepfm"], batch_sizes=[1024, 4096], workers=[1],
        train_rows=16_384))
    args.batch_list, args.worker_list = args.batch_sizes, args.workers
    args.measure = tp.Measure(args.emb_dim, args.hash_bits, args.micro_batch, args.train_rows,
                              args.amp)
    args.out = str(args.out or common.results_file(argv, args.quick, "stage3_throughput",
                                                   args.device, HARMLESS))
    return args


# ------------------------------------------------------------------------------------ report
def report(args, argv, res, device):
    precision = "bf16 autocast" if args.amp == "bf16" else "fp32"
    peak = res["matmul_gflops"][args.amp]
    lines = [f"# Stage 3: throughput at scale ({res['device_name']})", "",
             f"File: {res['file_rows']:,} rows, {res['file_gb']:.2f} GB (synthetic Criteo "
             f"format). Torch threads: {args.threads}. Training in {precision}; matmul peak "
             "measured in this run (best of before and after the training runs): "
             + ", ".join(f"{'bf16' if k == 'bf16' else 'fp32'} {v:,.0f} GFLOP/s"
                         for k, v in res["matmul_gflops"].items()) + "."]
    lines += loader_table(args, res) + training_table(args, res, peak)
    lines += micro_batch_section(args, res, ["memory", f"loader-{args.worker_list[0]}"])
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
              "", f"Command: `{common.command_line(__file__, argv)}` "
              f"({sum(res['session_s']) / 60:.1f} min over {len(res['session_s'])} "
              "session(s)).", common.machine_line(device, args.threads)]
    return "\n".join(lines) + "\n"


def loader_table(args, res):
    rows = []
    for w in args.worker_list + ["binary"]:
        r = res["done"].get(f"scan|{w}")
        if r:
            name = "binary cache, in the main process" if w == "binary" else f"text loader, {w}"
            rows.append([name, f"{r['rows']:,}", f"{r['rows_per_s']:,.0f}", f"{r['seconds']:.1f}",
                         f"{r['peak_rss_main_mb']:,.0f}", f"{r['peak_rss_worker_mb']:,.0f}"])
    lines = ["", "## Loader only (full pass)", ""] + common.markdown_table(
        ["reader, workers", "rows", "rows/s", "seconds", "peak RSS main MiB",
         "peak RSS per worker MiB"], rows)
    if res.get("binary_cache_s"):
        lines += ["", f"The binary cache was made once in {res['binary_cache_s']:.0f} s "
                  "(stage2_ctr/07_binary_cache.py: one parse of the file, 2 workers)."]
    return lines


def training_table(args, res, peak):
    sources = ["memory"] + [f"loader-{w}" for w in args.worker_list] + ["binary"]
    rows = []
    for m in args.models:
        for b in args.batch_list:
            speeds = [res["done"].get(train_key(args, m, b, s), {}).get("samples_per_s")
                      for s in sources]
            if speeds[0] is None:
                continue
            best = max([s for s in speeds[1:-1] if s] or [0])
            flops = tp.mlp_flops_per_sample(args.emb_dim, model=m)
            share = (f"{speeds[0] * flops / 1e9 / peak:.0%}"
                     if m in ("dnn", "deepfm", "dcn", "dcnv2") else "-")
            r = res["done"].get(train_key(args, m, b, sources[1]), {})
            rss = f"{r.get('peak_rss_main_mb', 0):,.0f}" + (
                f" + {r['private_worker_mb']:,.0f} = "
                f"{r['peak_rss_main_mb'] + r['private_worker_mb']:,.0f}"
                if "private_worker_mb" in r else "")
            batch = f"{b:,}" + (f" ({b // args.micro_batch} x {args.micro_batch:,})"
                                if 0 < args.micro_batch < b else "")
            rows.append([m, batch] + [f"{s:,.0f}" if s else "-" for s in speeds]
                        + [f"{best / speeds[0]:.0%}",
                           f"{speeds[-1] / speeds[0]:.0%}" if speeds[-1] else "-", share, rss])
    return ["", "## Training samples/s (AdamW + RowSparseAdam on CPU, "
            f"emb {args.emb_dim}, MLP {'-'.join(map(str, tp.MLP_SIZES))})", ""
            ] + common.markdown_table(
        ["model", "batch"] + sources + ["best text loader / memory", "binary / memory",
                                        "matmul share of the peak (MLP; DCN-v2: + cross)",
                                        f"loader-{args.worker_list[0]} memory MiB: main peak "
                                        "RSS + worker private = total"], rows)


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
    plt = common.pyplot()
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
    common.save_figure(fig, path)


def sources_of(args, model):
    """Where the batches come from: preloaded tensors, the loader with N workers, the cache."""
    workers = args.worker_list if model in args.sweep_models else args.worker_list[:1]
    return ["memory"] + [f"loader-{w}" for w in workers] + ["binary"]


def train_key(args, model, batch, source, micro_batch=None):
    return tp.train_key(model, batch, source,
                        args.micro_batch if micro_batch is None else micro_batch, args.amp)


def load_partial(path, args):
    """Finished measurements of an earlier, interrupted run with the same file and threads."""
    res = {} if args.fresh or not path.exists() else json.loads(path.read_text())
    if res.get("file_rows") != args.rows or res.get("threads") != args.threads:
        res = {"file_rows": args.rows, "threads": args.threads, "done": {}}
    if res["done"]:
        print(f"resuming: {len(res['done'])} measurements already in {path}")
    return res


def prepare_data(args, res):
    """The big text file and its binary cache, made once; their sizes into res."""
    path, generator_rss = tp.ensure_big_file(args.data_root, args.rows)
    if generator_rss:
        res["rss_generator_mb"] = generator_rss
    cache, cache_seconds = tp.ensure_binary_cache(path)
    if cache_seconds:
        res["binary_cache_s"] = cache_seconds
    res["file_gb"] = path.stat().st_size / 1e9
    return path, cache


def peaks(device, amp):
    """The matmul peak in fp32, and in bf16 when the training runs in it."""
    out = {"off": common.matmul_peak_gflops(device)}
    if amp == "bf16":
        out["bf16"] = common.matmul_peak_gflops(device, "bfloat16")
    return out


@common.one_line_errors()
def main(argv=None):
    args = parse_args(argv)
    for folder, flag in [(Path(args.out).parent, "--out"), (args.runs_dir, "--runs-dir")]:
        common.check_writable(folder, flag)
    t0 = time.perf_counter()
    device = common.resolve_device(args.device)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    partial_path = (Path(args.runs_dir) / "stage3_throughput"
                    / f"partial_{args.device}_{args.rows}.json")
    res = load_partial(partial_path, args)
    n_done_before = len(res["done"])

    def record(key, fn):  # measure once; the partial JSON is rewritten atomically after each
        if key not in res["done"]:
            common.reset_peak_rss()
            res["done"][key] = dict(fn(), peak_rss_main_mb=common.peak_since_reset_mb())
            common.write_json(partial_path, res)
        return res["done"][key]

    path, cache = prepare_data(args, res)
    res["device_name"] = (torch.cuda.get_device_name(device) if device.type == "cuda"
                          else f"CPU, {torch.get_num_threads()} threads")
    before = peaks(device, args.amp)
    # 1. the readers alone, a full pass each
    for w in args.worker_list:
        r = record(f"scan|{w}", lambda: tp.loader_only(path, w))
        print(f"loader only, {w} worker(s): {r['rows_per_s']:,.0f} rows/s over {r['rows']:,}")
    r = record("scan|binary", lambda: tp.binary_only(cache))
    print(f"binary cache only: {r['rows_per_s']:,.0f} rows/s over {r['rows']:,}")
    # 2. training: every model x batch size x source
    mem = tp.preload(path, max(4 * max(args.batch_list), args.train_rows)
                     + 2 * max(args.batch_list))
    jobs = [(m, b, s) for m in args.models for b in args.batch_list
            for s in sources_of(args, m)]
    for m, b, s in tqdm(jobs, desc="training measurements"):
        r = record(train_key(args, m, b, s), lambda: tp.train_measure(
            args.measure, m, b, s, device, path=path, mem=mem, cache=cache))
        tqdm.write(f"{m:<7} batch {b:>6,} {s:<9} {r['samples_per_s']:>10,.0f} samples/s")
    # a single low reading of a peak would put shares above 100%: keep the best of two
    after = peaks(device, args.amp)
    res["matmul_gflops"] = {k: max(before[k], after[k]) for k in before}
    current = [f"scan|{w}" for w in args.worker_list + ["binary"]] + [
        train_key(args, m, b, s) for m, b, s in jobs]
    res["rss_main_mb"] = max(res["done"][k]["peak_rss_main_mb"] for k in current
                             if k in res["done"])
    if device.type == "cuda":
        res["gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
    if len(res["done"]) > n_done_before or not res.get("session_s"):  # measured something
        res.setdefault("session_s", []).append(time.perf_counter() - t0)
    common.write_json(partial_path, res)
    out = Path(args.out)
    table = report(args, argv, res, device)
    common.write_text(out, table)
    plot(args, res, out.with_suffix(".png"))
    print(table)
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
