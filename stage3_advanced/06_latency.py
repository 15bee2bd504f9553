"""Stage 3, step 6: inference latency vs batch size for every Stage 2 model - where is the knee?

What you learn here: serving is a trade between latency (one request, answer now) and throughput
(samples/s). Each Stage 2 model is timed under torch.inference_mode() for batch sizes 1 ... 32768
with 1 and 2 CPU threads: p50/p95/p99 of >= 200 timed calls after warm-up, and samples/s at the
median. Small batches pay a fixed per-call cost (Python, op dispatch, thread wake-up) that does
not shrink with the batch, so samples/s grows almost linearly with the batch until the
arithmetic dominates: that knee is the batch a server should gather requests into. On CUDA the
calls are timed with CUDA events (the GPU runs asynchronously: a host timer alone would measure
the launch, not the work).

Run:    python stage3_advanced/06_latency.py                   # 6 models, threads 1 and 2, ~20 min
        python stage3_advanced/06_latency.py --quick           # DNN + DeepFM, 3 batch sizes, ~20 s
        python stage3_advanced/06_latency.py --compile         # torch.compile each model first
        python stage3_advanced/06_latency.py --device cuda     # GPU figures
Writes: results/stage3_latency.md, results/stage3_latency.png, runs/stage3_latency.json
        (--device cuda: results/stage3_latency_cuda.md/.png/.json; --quick: runs/quick/)
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: plain imports
import common  # noqa: E402
from common import (checked, positive_int, pyplot, quick_or_results, save_figure,  # noqa: E402
                    write_json, write_text)
from stage2_ctr.models import MODELS, build_model, criteo_schema  # noqa: E402
from stage2_ctr.models.mtl import n_params  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    p.add_argument("--batch-sizes", type=positive_int, nargs="+",
                   default=[1, 8, 64, 512, 4096, 32768])
    p.add_argument("--threads", type=positive_int, nargs="+", default=[1, 2],
                   help="torch CPU thread counts to compare (CPU only)")
    p.add_argument("--calls", type=checked(int, lambda v: v >= 200, ">= 200"), default=200,
                   help="timed calls per figure (>= 200, after --warmup calls)")
    p.add_argument("--warmup", type=positive_int, default=10)
    p.add_argument("--emb-dim", type=int, default=8)
    p.add_argument("--hash-bits", type=int, default=20)
    p.add_argument("--mlp", default="256,128",
                   help="MLP of every model. With Stage 2's training size (--emb-dim 16 "
                        "--mlp 400,400,400) each call does ~3.5x the arithmetic and this script "
                        "takes ~40 min: batch 32768 x 200 calls x 2 thread counts")
    p.add_argument("--compile", action="store_true", help="torch.compile each model first")
    p.add_argument("--device", type=common.device_arg, default="cpu",
                   help="cpu | cuda | cuda:N (auto: CUDA when present); a CUDA run writes "
                        "stage3_latency_cuda.md, never the committed CPU table")
    p.add_argument("--quick", action="store_true", help="DNN + DeepFM, batch 1/64/1024, 1 thread")
    p.add_argument("--out", default=None,
                   help="default results/stage3_latency.md; with --quick runs/quick/ (the "
                        "committed table stays)")
    p.add_argument("--runs-dir", default=str(common.RUNS), help="where the JSON goes")
    args = p.parse_args(argv)
    args.device = str(common.resolve_device(args.device))
    cuda = args.device.startswith("cuda")
    if args.out is None:
        args.out = str(quick_or_results(args.quick) /
                       f"stage3_latency{'_cuda' if cuda else ''}.md")
    if args.quick:
        args.models, args.batch_sizes, args.threads = ["dnn", "deepfm"], [1, 64, 1024], [1]
    if cuda:
        args.threads = [torch.get_num_threads()]
    args.mlp_sizes = tuple(int(h) for h in args.mlp.split(",") if h)
    return args


def random_batch(batch, hash_bits, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    schema = criteo_schema(hash_bits)
    dense = torch.randn(batch, schema.n_dense, generator=g)
    sparse = torch.randint(0, schema.n_buckets, (batch, schema.n_sparse), generator=g)
    return dense.to(device), sparse.to(device)


@torch.inference_mode()
def time_calls(model, inputs, calls, warmup, device):
    """Per-call latency in milliseconds: host clock on CPU, CUDA events on the GPU."""
    for _ in range(warmup):
        model(*inputs)
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(calls):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            model(*inputs)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(calls):
            t0 = time.perf_counter_ns()
            model(*inputs)
            times.append((time.perf_counter_ns() - t0) / 1e6)
    return np.array(times)


def measure(args, device):
    rows = []
    jobs = [(t, m, b) for t in args.threads for m in args.models for b in args.batch_sizes]
    models = {}
    for threads, name, batch in tqdm(jobs, desc="latency"):
        torch.set_num_threads(threads)
        if name not in models:
            torch.manual_seed(0)
            model = build_model(name, criteo_schema(args.hash_bits), emb_dim=args.emb_dim,
                                mlp=args.mlp_sizes).to(device).eval()
            models[name] = (torch.compile(model) if args.compile else model, n_params(model))
        model, params = models[name]
        ms = time_calls(model, random_batch(batch, args.hash_bits, device), args.calls,
                        args.warmup, device)
        p50, p95, p99 = np.percentile(ms, [50, 95, 99])
        rows.append({"model": name, "threads": threads, "batch": batch, "calls": len(ms),
                     "p50_ms": p50, "p95_ms": p95, "p99_ms": p99,
                     "samples_per_s": batch / (p50 / 1e3), "params": params})
        tqdm.write(f"{name:<7} threads {threads} batch {batch:>6,}: p50 {p50:8.3f} ms  "
                   f"p99 {p99:8.3f} ms  {rows[-1]['samples_per_s']:>12,.0f} samples/s")
    return rows


def knee(rows, share=0.8):
    """Smallest batch reaching `share` of the best samples/s seen for that model/threads."""
    best = max(r["samples_per_s"] for r in rows)
    return min(r["batch"] for r in rows if r["samples_per_s"] >= share * best)


def report(args, rows, device_name, wall_s):
    lines = [f"# Stage 3: inference latency vs batch size ({device_name})", "",
             f"torch.inference_mode(), random inputs, {args.calls} timed calls per row after "
             f"{args.warmup} warm-up calls{', torch.compile' if args.compile else ''}; "
             f"emb {args.emb_dim}, MLP {'-'.join(map(str, args.mlp_sizes))}, 2^{args.hash_bits}"
             " buckets. samples/s = batch / p50.", "",
             "| model | threads | batch | p50 ms | p95 ms | p99 ms | samples/s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['threads']} | {r['batch']:,} | {r['p50_ms']:.3f} | "
                     f"{r['p95_ms']:.3f} | {r['p99_ms']:.3f} | {r['samples_per_s']:,.0f} |")
    lines += ["", "Knee: the smallest batch reaching 80% of the model's best samples/s "
              "(per thread count):", ""]
    for m in args.models:
        for t in args.threads:
            sub = [r for r in rows if r["model"] == m and r["threads"] == t]
            one = next((r for r in sub if r["batch"] == min(args.batch_sizes)), sub[0])
            best = max(sub, key=lambda r: r["samples_per_s"])
            lines.append(f"- {m}, {t} thread(s): knee at batch {knee(sub):,}; batch "
                         f"{one['batch']} answers in {one['p50_ms']:.2f} ms "
                         f"({one['samples_per_s']:,.0f}/s), batch {best['batch']:,} in "
                         f"{best['p50_ms']:.1f} ms ({best['samples_per_s']:,.0f}/s, "
                         f"{best['samples_per_s'] / one['samples_per_s']:,.0f}x)")
    lines += ["", f"Command: `python stage3_advanced/06_latency.py"
              f"{' --quick' if args.quick else ''}{' --compile' if args.compile else ''}"
              f"{' --device ' + args.device if args.device != 'cpu' else ''}` "
              f"({wall_s / 60:.1f} min).", common.machine_line(args.device)]
    return "\n".join(lines) + "\n"


def plot(args, rows, path):
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for m in args.models:
        for t, style in zip(sorted(args.threads, reverse=True), ["-", "--", ":"]):
            sub = [r for r in rows if r["model"] == m and r["threads"] == t]
            label = f"{m}" + (f", {t} thr" if len(args.threads) > 1 else "")
            ax1.plot([r["batch"] for r in sub], [r["p50_ms"] for r in sub], style, marker="o",
                     ms=3, label=label)
            ax2.plot([r["batch"] for r in sub], [r["samples_per_s"] for r in sub], style,
                     marker="o", ms=3, label=label)
    ax1.set(xscale="log", yscale="log", xlabel="batch size", ylabel="p50 latency (ms)",
            title="latency per call")
    ax2.set(xscale="log", yscale="log", xlabel="batch size", ylabel="samples/s at p50",
            title="throughput")
    ax2.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    save_figure(fig, path)


def main(argv=None):
    args = parse_args(argv)
    t0 = time.perf_counter()
    device = torch.device(args.device)
    device_name = (torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU")
    print(f"{device_name} | models {args.models} | batches {args.batch_sizes} | threads "
          f"{args.threads} | {args.calls} calls each")
    rows = measure(args, device)
    wall = time.perf_counter() - t0
    out = Path(args.out)
    table = report(args, rows, device_name, wall)
    write_text(out, table)
    plot(args, rows, out.with_suffix(".png"))
    write_json(Path(args.runs_dir) / (out.stem + ".json"),
               {"script": "stage3_advanced/06_latency.py",
                "config": {k: v for k, v in vars(args).items() if k != "mlp_sizes"},
                "device": device_name, "rows": rows, "wall_s": wall})
    print(table)
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
