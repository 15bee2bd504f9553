"""Stage 2, step 6: where the time goes - the loader against pandas/pyarrow, and our DeepFM's
training step against DeepCTR-Torch and pytorch-fm.

What you learn here: (1) the loader: one pass of numpy over raw bytes beats the C parsers of
pandas and pyarrow because it never builds Python strings or per-column objects, and a
DataLoader worker's per-transfer cost is why the loader ships 8 batches per transfer;
(2) the training step on a CPU: the same DeepFM (emb 16, MLP 400-400-400, 39 fields, data
in memory) with a dense embedding table (Adam sweeps all 2^20 x 16 rows and two moment buffers
every step), with sparse gradients and torch's SparseAdam, and the trainer's default: sparse
gradients and RowSparseAdam (models/optim.py) + fused AdamW - against DeepCTR-Torch's keras-like
`fit` and pytorch-fm's DeepFM in a plain loop. The MLP's matmuls are the rest: the table gives
the share of the machine's matmul peak a step reaches (peak measured in the same run).

The machine is noisy, so contenders run round-robin and the tables give medians; read ratios
measured in the same run, not absolute figures across runs. The harness (baselines, fresh
processes, the other libraries) is stage2_ctr/bench.py; DeepCTR-Torch and pytorch-fm are
installed into a temporary folder for this run only (`pip install --no-deps --target`).

Run:    python stage2_ctr/06_bench_throughput.py --file stage2_ctr/data/bench2m/train.txt
        python stage2_ctr/06_bench_throughput.py --parts train --skip-others   # ours only, no pip
        python stage2_ctr/06_bench_throughput.py --parts loader --file FILE    # the loader only
Writes: results/stage2_loader.md, results/stage2_throughput.md, results/stage2_precision.md,
        runs/bench_{loader,throughput,precision}/metrics.json
Time:   ~35 min on 2 CPU cores with a 2M-row file (loader ~5 min, training ~23 min,
        precision ~5 min).
"""
import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: plain imports
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import common  # noqa: E402
from stage2_ctr import bench, binary_cache, training  # noqa: E402

HERE = Path(__file__).resolve().parent


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--parts", default="loader,train,precision",
                   help="any of loader, train, precision (comma-separated)")
    p.add_argument("--precision-rows", type=common.positive_int, default=24_576,
                   help="precision: in-memory rows per timed pass (bf16 without native support "
                        "is slow: DCN-v2 runs at a few hundred samples/s)")
    p.add_argument("--precision-batch-sizes", type=common.int_list, default=[4096])
    p.add_argument("--precision-repeats", type=common.positive_int, default=3,
                   help="precision: round-robin rounds (median)")
    p.add_argument("--file", default=str(HERE / "data" / "synthetic" / "train.txt"),
                   help="Criteo-format file: the loader bench's input and the from-disk run's")
    p.add_argument("--loader-repeats", type=common.positive_int, default=3,
                   help="loader: runs per configuration, each in a fresh process (median)")
    p.add_argument("--rows", type=common.positive_int, default=200_000,
                   help="training: in-memory rows per timed pass")
    p.add_argument("--batch-sizes", type=common.int_list, default=[4096, 1024])
    p.add_argument("--threads", type=common.positive_int, default=2,
                   help="torch threads of the training process")
    p.add_argument("--repeats", type=common.positive_int, default=5,
                   help="training: round-robin rounds; each times one pass of every contender")
    p.add_argument("--skip-others", action="store_true", help="do not install/run the others")
    p.add_argument("--out-dir", default=str(common.RESULTS))
    p.add_argument("--runs-dir", default=str(common.RUNS))
    args = p.parse_args(argv)
    args.part_list = [x for x in args.parts.split(",") if x]
    if not args.part_list or set(args.part_list) - {"loader", "train", "precision"}:
        p.error("--parts takes loader, train and/or precision")
    if "loader" in args.part_list and not Path(args.file).is_file():
        p.error(f"--file {args.file}: not found (the loader bench reads it; make one with "
                "python stage2_ctr/01_make_subset.py --synthetic 2000000 --val-frac 0 "
                "--test-frac 0 --out-dir stage2_ctr/data/bench2m)")
    return args


# ---------------------------------------------------------------------------- 1. the loader
def loader_part(args):
    size_mb = os.path.getsize(args.file) / 2**20
    print(f"loader: {args.file} ({size_mb:.0f} MiB), {args.loader_repeats} repeats per config, "
          "parse + log1p + hash to arrays, each config in a fresh process")
    results = bench.loader_bench(args.file, args.loader_repeats, progress=tqdm.write)
    base = results["pandas"]["rows_per_s"]
    single = results["loader workers=0"]["rows_per_s"]
    two = results["loader workers=2 group=8"]["rows_per_s"]
    names = {"pandas": "`pandas.read_csv`, 200k-row chunks + `pd.util.hash_array`",
             "pyarrow": "pyarrow streaming CSV reader, same transform",
             "loader workers=0": "this loader, in the training process",
             "loader workers=2 group=1": "this loader, 2 workers, one transfer per batch",
             "loader workers=1 group=8": "this loader, 1 worker, 8 batches per transfer",
             "loader workers=2 group=8": "this loader, 2 workers, 8 batches per transfer"}
    lines = ["# Stage 2: the streaming loader against pandas and pyarrow", "",
             f"{results['pandas']['rows']:,} rows ({size_mb:.0f} MiB, `{Path(args.file).name}`);"
             " every reader does parse + log1p + hash to arrays; each configuration in a fresh "
             f"process, {args.loader_repeats} repeats round-robin, median.", ""]
    lines += common.markdown_table(
        ["reader", "rows/s", "vs pandas", "peak RSS MiB"],
        [[names[c], f"{r['rows_per_s']:,.0f}", f"{r['rows_per_s'] / base:.2f}×",
          f"{r['peak_rss_mb']:,.0f}"] for c, r in results.items()])
    lines += ["", f"2 workers (8 batches per transfer) vs the single process: {two / single:.2f}×."
              " The machine is shared and noisy: absolute rows/s move between runs by ±30%; "
              "the ratios within one run hold.", "",
              f"Written by `python stage2_ctr/06_bench_throughput.py --parts loader --file "
              f"{args.file} --loader-repeats {args.loader_repeats}`."]
    common.write_text(Path(args.out_dir) / "stage2_loader.md", "\n".join(lines) + "\n")
    common.write_json(Path(args.runs_dir) / "bench_loader" / "metrics.json", {
        "script": "stage2_ctr/06_bench_throughput.py", "model": None, "dataset": args.file,
        "device": "cpu", "seed": None, "config": {"repeats": args.loader_repeats,
                                                   "file_mib": size_mb, "cpus": os.cpu_count()},
        "results": results, "ratios": {"loader_vs_pandas": single / base,
                                       "workers2_vs_single": two / single}})
    print("\n".join(lines))
    return results


# -------------------------------------------------------------------- 2. the training step
def train_part(args):
    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    names = ["ours", "ours, torch SparseAdam", "ours, dense table"]
    cache_dir = None
    if Path(args.file).exists():  # the same step fed by each input path of train_ctr.py
        cache_dir = tempfile.TemporaryDirectory(prefix="ctr_bench_cache_")
        cache = Path(cache_dir.name) / "cache"
        print(f"writing a binary cache of {args.file} into {cache} (this run only)")
        binary_cache.write_cache([args.file], cache, workers=1)
        names += ["ours, from disk", "ours, binary cache", "ours, preloaded"]
    tmp = None
    if not args.skip_others:
        tmp = tempfile.TemporaryDirectory(prefix="ctr_bench_")
        print(f"installing deepctr-torch and torchfm into {tmp.name} (this run only)")
        bench.install_others(tmp.name)
        sys.path.insert(0, tmp.name)
        names += ["deepctr-torch", "pytorch-fm"]
    peak = common.matmul_peak_gflops("cpu", "float32", repeats=5)
    results = {}
    for b in args.batch_sizes:
        passes = {name: bench.CONTENDERS[name](args.rows, b, args.file,
                                               cache_dir and cache) for name in names}
        speeds = {name: [] for name in names}
        for _ in tqdm(range(args.repeats), desc=f"batch {b}: rounds", leave=False):
            for name in names:  # round-robin: drift of the machine hits everyone alike
                speeds[name].append(passes[name]())
        del passes
        for name in names:
            results[f"{name} b{b}"] = {"batch": b, "config": name, "all": speeds[name],
                                       "samples_per_s": statistics.median(speeds[name])}
            tqdm.write(f"batch {b:>5} {name:<24} {statistics.median(speeds[name]):>10,.0f} "
                       f"samples/s  (rounds: {', '.join(f'{v:,.0f}' for v in speeds[name])})")
    if tmp:
        sys.path.remove(tmp.name)
        tmp.cleanup()
    if cache_dir:
        cache_dir.cleanup()
    write_train_report(args, results, peak, time.perf_counter() - t_start)
    return results


def write_train_report(args, results, peak, seconds):
    flops = bench.mlp_flops_per_sample()
    lines = ["# Stage 2: DeepFM training throughput on this CPU", "",
             f"DeepFM, emb {bench.EMB}, MLP {'-'.join(map(str, bench.MLP))}, 39 fields, 2^20 "
             f"embedding rows, {args.rows:,} rows in memory, {args.threads} threads, median of "
             f"{args.repeats} round-robin passes. fp32 matmul peak measured in the same run: "
             f"{peak:,.0f} GFLOP/s; the MLP is {flops / 1e6:.1f} MFLOP per sample (forward + "
             "backward).", ""]
    rows = []
    for r in results.values():
        b = r["batch"]
        ref_dc = results.get(f"deepctr-torch b{b}", {}).get("samples_per_s")
        ref_fm = results.get(f"pytorch-fm b{b}", {}).get("samples_per_s")
        ref_ours = results[f"ours b{b}"]["samples_per_s"]
        rows.append([b, r["config"], f"{r['samples_per_s']:,.0f}",
                     f"{r['samples_per_s'] / ref_ours:.0%}",
                     f"{r['samples_per_s'] / ref_dc:.2f}×" if ref_dc else "-",
                     f"{r['samples_per_s'] / ref_fm:.2f}×" if ref_fm else "-",
                     f"{r['samples_per_s'] * flops / 1e9 / peak:.0%}"])
    lines += common.markdown_table(["batch", "trainer", "samples/s", "of ours in memory",
                                    "vs DeepCTR-Torch fit",
                                    "vs pytorch-fm", "MLP share of the matmul peak"], rows)
    lines += ["", f"Written by `python stage2_ctr/06_bench_throughput.py --parts train "
              f"--threads {args.threads} --repeats {args.repeats}` in {seconds:.0f} s."]
    common.write_text(Path(args.out_dir) / "stage2_throughput.md", "\n".join(lines) + "\n")
    common.write_json(Path(args.runs_dir) / "bench_throughput" / "metrics.json", {
        "script": "stage2_ctr/06_bench_throughput.py", "model": "deepfm", "dataset": "random",
        "device": "cpu", "seed": 0, "config": {k: v for k, v in vars(args).items()},
        "matmul_peak_gflops": peak, "mlp_flops_per_sample": flops, "results": results,
        "wall_s": seconds})
    print("\n".join(lines))


# ------------------------------------------------------------------- 3. fp32 against bf16
def precision_part(args):
    """DNN, DeepFM and DCN-v2 with and without bf16 autocast, data in memory, round-robin; the
    matmul peak in both precisions measured in the same run (best of before and after)."""
    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    native = training.cpu_has_native_bf16()
    peaks = {dt: common.matmul_peak_gflops("cpu", dt, n=1024, repeats=5)
             for dt in ("float32", "bfloat16")}
    contenders = bench.precision_contenders()
    results = {}
    for b in args.precision_batch_sizes:
        passes = {name: make(args.precision_rows, b, None) for name, make in contenders.items()}
        speeds = {name: [] for name in passes}
        for _ in tqdm(range(args.precision_repeats), desc=f"batch {b}: rounds", leave=False):
            for name in passes:
                speeds[name].append(passes[name]())
        del passes
        for name, s in speeds.items():
            results[f"{name} b{b}"] = {"batch": b, "config": name, "all": s,
                                       "samples_per_s": statistics.median(s)}
            tqdm.write(f"batch {b:>5} {name:<12} {statistics.median(s):>10,.0f} samples/s")
    for dt in peaks:
        peaks[dt] = max(peaks[dt], common.matmul_peak_gflops("cpu", dt, n=1024, repeats=5))
    cpu = common.cpu_name()
    out = Path(args.out_dir) / "stage2_precision.md"
    kept_rows, kept_notes = earlier_cpus(out, cpu)
    lines = ["# Stage 2: fp32 against bf16 autocast, on each CPU this part has run on", "",
             f"DNN, DeepFM, DCN-v2 (emb {bench.EMB}, MLP {'-'.join(map(str, bench.MLP))}, 3 cross "
             f"layers), rows in memory, median of round-robin passes; each run adds its CPU's "
             "rows and keeps the other CPUs' (the table says which CPU each row came from). "
             "Native bf16 = avx512_bf16 / amx_bf16 in /proc/cpuinfo. The shares count the "
             "model's matmul FLOPs (MLP, and DCN-v2's cross layers) against the matmul peak of "
             "the precision it ran in, measured in the same run (1024^3, best of before and "
             "after). Without native bf16 the bf16 products run on a fallback kernel whose "
             "speed depends on the shape: its 1024^3 'peak' is slower than the model's own "
             "products, hence shares above 100% there.", ""]
    rows = []
    for b in args.precision_batch_sizes:
        for name in bench.PRECISION_MODELS:
            fp, bf = (results[f"{name} {p} b{b}"]["samples_per_s"] for p in ("fp32", "bf16"))
            flops = bench.mlp_flops_per_sample(name=name)
            rows.append([cpu, name, b, f"{fp:,.0f}", f"{bf:,.0f}", f"{bf / fp:.2f}×",
                         f"{fp * flops / 1e9 / peaks['float32']:.0%}",
                         f"{bf * flops / 1e9 / peaks['bfloat16']:.0%}"])
    lines += common.markdown_table(["CPU", "model", "batch", "fp32 samples/s",
                                    "bf16 samples/s", "bf16 / fp32",
                                    "share of the fp32 peak (fp32 run)",
                                    "share of the bf16 peak (bf16 run)"], rows + kept_rows)
    lines += ["", "Runs:", "",
              f"- {cpu} ({'native bf16' if native else 'no native bf16'}): matmul peak fp32 "
              f"{peaks['float32']:,.0f} GFLOP/s, bf16 {peaks['bfloat16']:,.0f} GFLOP/s; "
              f"`python stage2_ctr/06_bench_throughput.py --parts precision --threads "
              f"{args.threads} --precision-rows {args.precision_rows} --precision-batch-sizes "
              f"{','.join(map(str, args.precision_batch_sizes))} --precision-repeats "
              f"{args.precision_repeats}`, {time.perf_counter() - t_start:.0f} s; "
              f"{common.machine_line('cpu', args.threads)}", *kept_notes]
    common.write_text(out, "\n".join(lines) + "\n")
    common.write_json(Path(args.runs_dir) / "bench_precision" / "metrics.json", {
        "script": "stage2_ctr/06_bench_throughput.py", "device": "cpu", "native_bf16": native,
        "matmul_peak_gflops": peaks, "results": results,
        "config": {k: v for k, v in vars(args).items()}})
    print("\n".join(lines))
    return results


def earlier_cpus(path, cpu):
    """The table rows and run notes of other CPUs in an earlier stage2_precision.md, kept when
    this CPU's rows are rewritten. A file from before the CPU column (one CPU per file) is
    labelled with what its text says about that CPU."""
    if not Path(path).exists():
        return [], []
    text = Path(path).read_text()
    rows = [[c.strip() for c in line.strip().strip("|").split("|")]
            for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    header, rows = (rows[0], rows[1:]) if rows else ([], [])
    if header and header[0] != "CPU":  # the one-CPU layout
        label = ("an earlier CPU without native bf16 (name not recorded; AVX2 only)"
                 if "has no native bf16" in text else "an earlier CPU (name not recorded)")
        import re
        peak = re.search(r"fp32 [\d,]+ GFLOP/s, bf16 [\d,]+ GFLOP/s", text)
        note = next((line for line in text.splitlines() if line.startswith("Written by")), "")
        note = (f"matmul peak {peak.group(0)}; " if peak else "") + note
        return [[label] + r for r in rows], [f"- {label}: {note}"] if note else []
    notes = [line for line in text.splitlines() if line.startswith("- ")
             and not line.startswith(f"- {cpu} (")]
    return [r for r in rows if r[0] != cpu], notes


def main(argv=None):
    args = parse_args(argv)
    out = {}
    if "loader" in args.part_list:
        out["loader"] = loader_part(args)
    if "train" in args.part_list:
        out["train"] = train_part(args)
    if "precision" in args.part_list:
        out["precision"] = precision_part(args)
    return out


if __name__ == "__main__":
    main()
