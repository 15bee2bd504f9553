"""Stage 3, step 7: the prepared GPU run - what a GPU changes, measured in one go.

What you learn here: which input path keeps a GPU busy. A GPU trains a DeepFM at millions of
samples/s; a text parser delivers ~0.3M rows/s per core, the binary cache a few million rows/s
per core, and a training set resident in GPU memory (binary_cache.Preloaded) needs no input path at
all. The script times DeepFM, DNN and DCN-v2 fed by (a) the text loader with N worker processes,
(b) the binary cache read in the training process, (c) rows already in device memory, in fp32
and with bf16 autocast, at batch 4k-64k; then a dense vs a sparse embedding table, torch.compile
on vs off, and Stage 1's DataLoader lesson (per-sample DataLoader vs slicing) on the device.

Read with it: stage3_advanced/throughput.py (each measurement), binary_cache.Preloaded.
Run:    python stage3_advanced/07_gpu.py                      # on a CUDA machine: < 8 min on an
                                                              # H100/H200 with 16 cores
        python stage3_advanced/07_gpu.py --device cpu --quick # the same code path, on the CPU
Writes: results/gpu.md (--quick: runs/quick/gpu.md), runs/gpu.json
"""
import argparse
import contextlib
import datetime
import io
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: plain imports
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import common  # noqa: E402
from envs import check_env  # noqa: E402
from stage1_adult import mtml  # noqa: E402
from stage2_ctr import binary_cache  # noqa: E402
from stage3_advanced import throughput as tp  # noqa: E402

HERE = Path(__file__).resolve().parent


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", type=common.device_arg, default="auto")
    p.add_argument("--rows", type=common.positive_int, default=20_000_000)
    p.add_argument("--models", default="deepfm,dnn,dcnv2")
    p.add_argument("--batch-sizes", type=common.int_list, default=[4096, 16384, 65536])
    p.add_argument("--workers", type=common.positive_int, default=None,
                   help="text loader workers (default: the CPU cores - 2)")
    p.add_argument("--train-rows", type=common.positive_int, default=2_000_000,
                   help="rows timed per measurement")
    p.add_argument("--max-minutes", type=float, default=7.0,
                   help="stop measuring after this long (what is left is listed as skipped)")
    p.add_argument("--threads", type=common.positive_int, default=None,
                   help="torch CPU threads (default: torch's)")
    p.add_argument("--data-root", default=str(HERE / "data"))
    p.add_argument("--adult-npz", default=str(common.ROOT / "stage1_adult" / "adult_stage1.npz"),
                   help="Stage 1's npz for the DataLoader lesson (made with 02 when missing)")
    p.add_argument("--quick", action="store_true",
                   help="100k rows, DeepFM + DNN, batch 1024, no torch.compile")
    p.add_argument("--out", default=None, help="default results/gpu.md (--quick: runs/quick/)")
    p.add_argument("--runs-dir", default=str(common.RUNS))
    args = p.parse_args(argv)
    if args.quick:
        args.rows, args.models, args.batch_sizes = 100_000, "deepfm,dnn", [1024]
        args.train_rows, args.workers = 16_384, 1
    args.model_list = [m for m in args.models.split(",") if m]
    args.workers = args.workers or max(1, (os.cpu_count() or 2) - 2)
    args.out = Path(args.out or common.quick_or_results(args.quick) / "gpu.md")
    return args


# ----------------------------------------------------------------------------------- phases
def environment(device):
    """The device check of Stage 0 (its printout), and what the report's header says."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        check_env.main(["--device", device.type, "--size", "1024"])
    info = {"date": datetime.date.today().isoformat(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "python": platform.python_version(),
            "cpus": os.cpu_count(), "check_env": out.getvalue().strip()}
    if device.type == "cuda":
        info.update(name=torch.cuda.get_device_name(device),
                    capability=list(torch.cuda.get_device_capability(device)),
                    memory_gib=torch.cuda.get_device_properties(device).total_memory / 2**30)
    else:
        info.update(name=f"CPU ({platform.processor() or platform.machine()})", capability=None)
    return info


def data(args, device):
    """The big file and its binary cache (made once, with every core), the whole cache in
    device memory and the first rows as pinned host tensors (the 'memory' source)."""
    t0 = time.perf_counter()
    path, _ = tp.ensure_big_file(args.data_root, args.rows, workers=os.cpu_count())
    cache, _ = tp.ensure_binary_cache(path, workers=min(16, os.cpu_count() or 2))
    resident = binary_cache.read_all(cache)
    n_host = min(len(resident[0]), args.train_rows + 4 * max(args.batch_sizes))
    host = [t[:n_host].long() if t.dtype == torch.int32 else t[:n_host] for t in resident]
    host[2] = host[2][:, 0]
    if device.type == "cuda":
        host = [t.pin_memory() for t in host]
    on_device = [t.to(device) for t in (resident[0], resident[1].long(), resident[2][:, 0])]
    return path, cache, host, on_device, time.perf_counter() - t0


def jobs_of(args):
    """(model, batch, source, amp, sparse, compile): the main grid, then the two ablations."""
    jobs = [(m, b, s, amp, None, False) for m in args.model_list for amp in ("off", "bf16")
            for b in args.batch_sizes for s in ("device", "binary", f"loader-{args.workers}")]
    b = args.batch_sizes[len(args.batch_sizes) // 2]
    jobs += [("deepfm", b, "device", amp, True, False) for amp in ("off", "bf16")]
    if not args.quick:  # compiling takes a minute or two on a CPU: not in the quick check
        jobs += [("deepfm", b, "device", "bf16", None, True)]
    return jobs


def measure(args, device, path, cache, host, on_device):
    """Every job, in order, until --max-minutes: samples/s per (model, batch, source, ...)."""
    t0, rows, skipped = time.perf_counter(), [], []
    for model, batch, source, amp, sparse, compiled in tqdm(jobs_of(args), desc="measuring"):
        job = dict(model=model, batch=batch, source=source, amp=amp, sparse=sparse,
                   compile=compiled)
        if time.perf_counter() - t0 > args.max_minutes * 60:
            skipped.append(job)
            continue
        m = tp.Measure(micro_batch=0, train_rows=args.train_rows, amp=amp, sparse=sparse,
                       compile=compiled)
        mem = on_device if source == "device" else host
        r = tp.train_measure(m, model, batch, source, device, path=path, mem=mem, cache=cache)
        rows.append(dict(job, samples_per_s=r["samples_per_s"], sparse=r["sparse"]))
        tqdm.write(f"{model:<7} {amp:<4} batch {batch:>6,} {source:<10} sparse {r['sparse']!s:<5}"
                   f" compile {compiled!s:<5} {r['samples_per_s']:>12,.0f} samples/s")
    return rows, skipped


def stage1_loader_lesson(npz, device, threads):
    """Stage 1's lesson on the device: two epochs with the per-sample DataLoader vs slices."""
    npz = Path(npz)
    if not npz.exists():  # Stage 1's npz, made once by its chapter 02
        subprocess.run([sys.executable, str(common.ROOT / "stage1_adult" / "02_preprocess.py"),
                        "--out", str(npz)], check=True, stdout=subprocess.DEVNULL)
    out = {}
    for loader in ("dataloader", "slice"):
        cfg = mtml.MTMLConfig(npz=str(npz), loader=loader, epochs=2, patience=2,
                              device=str(device), threads=threads or torch.get_num_threads())
        out[loader] = mtml.run(cfg, quiet=True)["train_samples_per_s"]
    return out


# ------------------------------------------------------------------------------------ report
def report(args, env, rows, skipped, lesson, timings):
    by = {(r["model"], r["batch"], r["source"], r["amp"], r["sparse"], r["compile"]): r
          for r in rows}
    dense_default = rows[0]["sparse"] if rows else None
    lines = [f"# GPU run: {env['name']}", "",
             f"{env['date']}; torch {env['torch']} (CUDA {env['cuda']}), Python {env['python']},"
             f" {env['cpus']} CPU cores; capability {env['capability']}"
             + (f", {env['memory_gib']:.0f} GiB" if env.get("memory_gib") else "") + ". "
             f"Data: {args.rows:,} synthetic rows (generated and cached in "
             f"{timings['data_s']:.0f} s, with every core), {args.train_rows:,} rows timed per "
             f"measurement; emb 16, MLP 400-400-400, AdamW (+ RowSparseAdam for sparse tables), "
             f"tables {'sparse' if dense_default else 'dense'} unless said.", "",
             "```", env["check_env"], "```", "",
             "## Samples/s by input path, precision and batch", ""]
    table = []
    for m in args.model_list:
        for amp in ("off", "bf16"):
            for b in args.batch_sizes:
                cells = [by.get((m, b, s, amp, dense_default, False), {}).get("samples_per_s")
                         for s in ("device", "binary", f"loader-{args.workers}")]
                table.append([m, "bf16" if amp == "bf16" else "fp32", f"{b:,}"]
                             + [f"{c:,.0f}" if c else "skipped" for c in cells])
    lines += common.markdown_table(["model", "precision", "batch", "in device memory",
                                    "binary cache, main process",
                                    f"text loader, {args.workers} workers"], table)
    lines += ["", "## DeepFM: embedding table and torch.compile (in device memory)", ""]
    lines += common.markdown_table(["variant", "samples/s"], [
        [f"{'sparse' if r['sparse'] else 'dense'} table, {'bf16' if r['amp'] == 'bf16' else 'fp32'}"
         f"{', torch.compile' if r['compile'] else ''}, batch {r['batch']:,}",
         f"{r['samples_per_s']:,.0f}"] for r in rows if r["model"] == "deepfm"
        and r["source"] == "device" and r["batch"] == args.batch_sizes[len(args.batch_sizes) // 2]])
    lines += ["", "## Stage 1's DataLoader lesson on this device (Adult, batch 256, 2 epochs)", ""]
    if lesson:
        lines += common.markdown_table(["loader", "train samples/s"], [
            ["TensorDataset + DataLoader (per sample)", f"{lesson['dataloader']:,.0f}"],
            ["slices of preloaded tensors", f"{lesson['slice']:,.0f} "
                                            f"({lesson['slice'] / lesson['dataloader']:.1f}×)"]])
    if skipped:
        lines += ["", f"Skipped after --max-minutes {args.max_minutes:g}: "
                  + "; ".join(f"{j['model']} {j['amp']} {j['batch']} {j['source']}"
                              for j in skipped)]
    flags = f" --device {args.device} --quick" if args.quick else ""
    lines += ["", f"Written by `python stage3_advanced/07_gpu.py{flags}` in "
              f"{timings['total_s'] / 60:.1f} min."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    t0 = time.perf_counter()
    device = common.resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    env = environment(device)
    print(env["check_env"])
    path, cache, host, on_device, data_s = data(args, device)
    rows, skipped = measure(args, device, path, cache, host, on_device)
    del on_device
    lesson = stage1_loader_lesson(args.adult_npz, device, args.threads)
    timings = {"data_s": data_s, "total_s": time.perf_counter() - t0}
    text = report(args, env, rows, skipped, lesson, timings)
    common.write_text(args.out, text)
    common.write_json(Path(args.runs_dir) / (args.out.stem + ".json"), {
        "script": "stage3_advanced/07_gpu.py", "device": env["name"], "environment": env,
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "rows": rows, "skipped": skipped, "stage1_loader": lesson, **timings})
    print(text)
    print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
