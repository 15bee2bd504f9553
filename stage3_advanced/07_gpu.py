"""Stage 3, step 7: the prepared GPU run - what a GPU changes, measured in one go.

What you learn here: which input path keeps a GPU busy. A text parser delivers ~0.3M rows/s
per core, the binary cache a few million rows/s per core, and a training set resident in GPU
memory (binary_cache.Preloaded) needs no input path at all; how fast a GPU trains a DeepFM is
not measured yet. The script times DeepFM, DNN and DCN-v2 fed by (a) the text loader with N
worker processes, (b) the binary cache read in the training process, (c) rows already in
device memory, in fp32 and with bf16 autocast, at batch 4k-64k; then a dense vs a sparse
embedding table, Stage 1's DataLoader lesson on the device (06_dataloader_tuning's parts b and
d: input paths, and a step split into gather / copy / compute), and torch.compile last.
Each job's row is written as soon as it finishes; a job that fails becomes its row with the
error, and the run goes on. It needs CUDA (envs/check_env.py --require-cuda must pass); only
`--device cpu --quick` runs on a CPU, to check the code path.

Read with it: stage3_advanced/throughput.py (each measurement), stage1_adult/loader_bench.py.
Run:    python stage3_advanced/07_gpu.py                      # on a CUDA machine (not timed on
                                                              # a GPU yet; --max-minutes 7 caps
                                                              # the measuring)
        python stage3_advanced/07_gpu.py --device cpu --quick # the same code path, on the CPU
Needs:  ~30 GB disk (20M rows as text + cache), ~16 GB RAM, ~6 GB GPU memory (estimates).
Writes: results/gpu.md (--quick: runs/quick/gpu.md), runs/gpu.json - after every job
"""
import argparse
import contextlib
import datetime
import io
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: plain imports
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import common  # noqa: E402
from envs import check_env  # noqa: E402
from stage1_adult import loader_bench, mtml  # noqa: E402
from stage2_ctr import binary_cache  # noqa: E402
from stage3_advanced import throughput as tp  # noqa: E402

HERE = Path(__file__).resolve().parent
LOADER_ROW_BYTES = 13 * 4 + 26 * 8 + 4  # a text-loader row: dense f32, sparse int64, label f32
PREFETCH = 2                            # the DataLoader's prefetch_factor: items per worker
WORKER_CAP = 16                         # more parser processes than this feed no GPU faster


def cpus_available():
    """The CPUs this process may run on (os.sched_getaffinity: a container's cpuset, taskset),
    not os.cpu_count(), which counts every CPU of the host."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 2


def shm_fit(workers, batch_sizes, free_bytes):
    """How many loader workers /dev/shm holds: each keeps PREFETCH items of group x batch rows
    (>= 32,768 rows, throughput.train_measure) in shared memory. -> (workers, a line or None)."""
    item = max(max(32768, b) for b in batch_sizes) * LOADER_ROW_BYTES
    fit = int(free_bytes // (PREFETCH * item))
    if fit >= workers:
        return workers, None
    return max(1, fit), (f"note: /dev/shm has {free_bytes / 2**20:,.0f} MB free; {workers} loader "
                         f"workers x {PREFETCH} prefetched items of {item / 2**20:.1f} MB need "
                         f"{workers * PREFETCH * item / 2**20:,.0f} MB, more than fits: using "
                         f"{max(1, fit)} worker(s); give the container more (docker "
                         f"--shm-size=2g) for more")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", type=common.device_arg, default="auto",
                   help="a CUDA device (auto: cuda:0); cpu only with --quick (the code path)")
    p.add_argument("--rows", type=common.positive_int, default=20_000_000)
    p.add_argument("--models", default="deepfm,dnn,dcnv2")
    p.add_argument("--batch-sizes", type=common.int_list, default=[4096, 16384, 65536])
    p.add_argument("--workers", type=common.positive_int, default=None,
                   help=f"text loader workers (default: the CPUs this process may use - 2, at "
                        f"most {WORKER_CAP}, and what /dev/shm holds)")
    p.add_argument("--train-rows", type=common.positive_int, default=2_000_000,
                   help="rows timed per measurement")
    p.add_argument("--max-minutes", type=float, default=7.0,
                   help="stop measuring after this long (what is left is listed as skipped)")
    p.add_argument("--threads", type=common.positive_int, default=None,
                   help="torch CPU threads (default: torch's)")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend of the compile job (eager / aot_eager: the same "
                        "code path without code generation, for a CPU check)")
    p.add_argument("--data-root", default=str(HERE / "data"))
    p.add_argument("--adult-npz", default=str(common.ROOT / "stage1_adult" / "adult_stage1.npz"),
                   help="Stage 1's npz for the DataLoader lesson (made with 02 when missing)")
    p.add_argument("--quick", action="store_true",
                   help="100k rows, DeepFM + DNN, batch 1024, 1 worker, no torch.compile")
    p.add_argument("--out", default=None, help="default results/gpu.md (--quick: runs/quick/)")
    p.add_argument("--runs-dir", default=str(common.RUNS))
    args = common.parse_with_quick(p, argv, dict(rows=100_000, models="deepfm,dnn",
                                                 batch_sizes=[1024], train_rows=16_384,
                                                 workers=1))
    device = common.resolve_device(args.device)
    if device.type != "cuda" and not (args.device == "cpu" and args.quick):
        p.error("this is the GPU run and torch sees no CUDA device here (CUDA_VISIBLE_DEVICES "
                "empty, a CPU wheel, or a driver older than the wheel: `python envs/check_env.py"
                " --require-cuda` says which); only `--device cpu --quick` runs it on the CPU"
                if device.type != "cuda" and args.device == "auto" else
                "--device cpu runs only with --quick (the code path): the full run is for a GPU")
    args.model_list = [m for m in args.models.split(",") if m]
    args.cpus = cpus_available()
    args.gen_workers = min(WORKER_CAP, args.cpus)
    workers = args.workers or max(1, min(WORKER_CAP, args.cpus - 2))
    args.workers, args.shm_note = shm_fit(workers, args.batch_sizes, shm_free_bytes())
    args.out = Path(args.out or common.quick_or_results(args.quick) / "gpu.md")
    return args


def shm_free_bytes():
    try:
        return shutil.disk_usage("/dev/shm").free
    except OSError:  # no /dev/shm: the workers' tensors go through the file system
        return float("inf")


# ----------------------------------------------------------------------------------- phases
def environment(device):
    """Stage 0's check (envs/check_env.py) on this device: its printout and its verdict. A
    failing check (no CUDA, a build without this GPU's arch, a wrong matmul) ends the run here,
    in one line, not in a traceback an hour later."""
    out = io.StringIO()
    argv = ["--device", str(device), "--size", "1024"]
    with contextlib.redirect_stdout(out):
        verdict = check_env.main(argv + (["--require-cuda"] if device.type == "cuda" else []))
    if verdict:
        last = out.getvalue().strip().splitlines()[-1:] or ["(no output)"]
        sys.exit(f"error: envs/check_env.py fails on this machine: {last[0]}")
    info = {"date": datetime.date.today().isoformat(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "python": platform.python_version(),
            "cpus": cpus_available(), "check_env": out.getvalue().strip(),
            "machine": common.machine_line(device)}
    if device.type == "cuda":
        info.update(name=torch.cuda.get_device_name(device),
                    capability=list(torch.cuda.get_device_capability(device)),
                    memory_gib=torch.cuda.get_device_properties(device).total_memory / 2**30)
    else:
        info.update(name=f"CPU ({common.cpu_name()})", capability=None)
    return info


def data(args, device):
    """The big file and its binary cache (made once, with the CPUs this process may use) and
    the whole cache in device memory (the 'device' source)."""
    t0 = time.perf_counter()
    path, _ = tp.ensure_big_file(args.data_root, args.rows, workers=args.gen_workers)
    cache, _ = tp.ensure_binary_cache(path, workers=args.gen_workers)
    resident = binary_cache.read_all(cache)
    on_device = [t.to(device) for t in (resident[0], resident[1].long(), resident[2][:, 0])]
    del resident
    return {"path": path, "cache": cache, "on_device": on_device}, time.perf_counter() - t0


def jobs_of(args):
    """The main grid (model, precision, batch, source), the embedding-table and torch.compile
    ablations, then Stage 1's DataLoader lesson on this device; the compile job last."""
    jobs = [dict(kind="train", model=m, batch=b, source=s, amp=amp, sparse=None, compile=False)
            for m in args.model_list for amp in ("off", "bf16")
            for b in args.batch_sizes for s in ("device", "binary", f"loader-{args.workers}")]
    b = args.batch_sizes[len(args.batch_sizes) // 2]
    jobs += [dict(kind="train", model="deepfm", batch=b, source="device", amp=amp, sparse=True,
                  compile=False) for amp in ("off", "bf16")]
    jobs += [dict(kind="stage1")]
    if not args.quick:  # compiling takes a minute or two on a CPU: not in the quick check
        jobs += [dict(kind="train", model="deepfm", batch=b, source="device", amp="bf16",
                      sparse=None, compile=True)]
    return jobs


def run_job(args, job, device, ctx):
    """One job -> the fields of its row."""
    if job["kind"] == "stage1":
        return {"stage1": stage1_loader_lesson(args.adult_npz, device, args.quick)}
    m = tp.Measure(micro_batch=0, train_rows=args.train_rows, amp=job["amp"],
                   sparse=job["sparse"], compile=job["compile"],
                   compile_backend=args.compile_backend)
    mem = ctx["on_device"] if job["source"] == "device" else None
    r = tp.train_measure(m, job["model"], job["batch"], job["source"], device, path=ctx["path"],
                         mem=mem, cache=ctx["cache"])
    return {"samples_per_s": r["samples_per_s"], "sparse_used": r["sparse"]}


def one_line(e):
    """An exception as the one line a results table can hold."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200] if text else ''}"


def measure(args, device, ctx, jobs, save):
    """Every job in order until --max-minutes. A job that raises becomes its row with the
    error; save(rows) writes the report after every job, so a crash loses nothing done."""
    t0, rows = time.perf_counter(), []
    for job in tqdm(jobs, desc="measuring"):
        if time.perf_counter() - t0 > args.max_minutes * 60:
            rows.append(dict(job, skipped=f"after --max-minutes {args.max_minutes:g}"))
        else:
            try:
                rows.append(dict(job, **run_job(args, job, device, ctx)))
            except Exception as e:  # noqa: BLE001 - the row says what failed, the run goes on
                rows.append(dict(job, error=one_line(e)))
                if device.type == "cuda":
                    torch.cuda.empty_cache()  # an out-of-memory job leaves its blocks cached
            tqdm.write(describe(rows[-1]))
        save(rows)
    return rows


def describe(r):
    if r["kind"] == "stage1":
        what = "stage1 DataLoader lesson"
    else:
        what = (f"{r['model']:<7} {r['amp']:<4} batch {r['batch']:>6,} {r['source']:<10} "
                f"sparse {r.get('sparse_used', r['sparse'])!s:<5} compile {r['compile']!s:<5}")
    if "error" in r or "skipped" in r:
        return f"{what}: {r.get('error') or 'skipped ' + r['skipped']}"
    return what + (f" {r['samples_per_s']:>12,.0f} samples/s" if "samples_per_s" in r else "")


def stage1_loader_lesson(npz, device, quick=False):
    """Stage 1's chapter 06 on this device (stage1_adult/loader_bench.py): the four input
    paths feeding training steps, and one step split into gather / copy / compute."""
    npz = Path(npz)
    if not npz.exists():  # Stage 1's npz, made once by its chapter 02
        subprocess.run([sys.executable, str(common.ROOT / "stage1_adult" / "02_preprocess.py"),
                        "--out", str(npz)], check=True, stdout=subprocess.DEVNULL)
    data, meta = mtml.load_npz(npz)
    paths = {path: loader_bench.input_path_speed(
        data["train"], path, 256, device, loader_bench.model_for(meta, mtml.MTMLConfig(), device),
        repeats=1) for path in mtml.LOADERS}
    steps = loader_bench.device_part(npz, device, (256, 2048) if quick else
                                     (256, 1024, 4096, 16384), mtml.MTMLConfig(),
                                     steps=5 if quick else 20)
    return {"paths": paths, **steps}


# ------------------------------------------------------------------------------------ report
def cell(row):
    """A table cell: samples/s, or why there is none."""
    if row is None:
        return "pending"
    if "error" in row:
        return "failed (below)"
    return "skipped" if "skipped" in row else f"{row['samples_per_s']:,.0f}"


def report(args, env, rows, n_jobs, timings):
    """results/gpu.md from the rows so far: written after every job (the title says how far)."""
    by = {(r["model"], r["batch"], r["source"], r["amp"], r["sparse"], r["compile"]): r
          for r in rows if r["kind"] == "train"}
    cpu = env["capability"] is None
    done = len(rows) == n_jobs
    lines = [f"# GPU run: {env['name']}" + ("" if done else
                                           f" (in progress: {len(rows)} of {n_jobs} jobs)"), "",
             f"{env['date']}; torch {env['torch']} (CUDA {env['cuda']}), Python {env['python']},"
             f" {env['cpus']} CPUs for this process; capability {env['capability']}"
             + (f", {env['memory_gib']:.0f} GiB" if env.get("memory_gib") else "") + ". "
             f"Data: {args.rows:,} synthetic rows (generated and cached in "
             f"{timings['data_s']:.0f} s), {args.train_rows:,} rows timed per measurement; emb "
             f"16, MLP 400-400-400, AdamW (+ RowSparseAdam for sparse tables), tables "
             f"{'sparse' if cpu else 'dense'} unless said.", "", "```", env["check_env"], "```"]
    if args.shm_note:
        lines += ["", args.shm_note]
    lines += ["", "## Samples/s by input path, precision and batch", ""]
    table = [[m, "bf16" if amp == "bf16" else "fp32", f"{b:,}"]
             + [cell(by.get((m, b, s, amp, None, False)))
                for s in ("device", "binary", f"loader-{args.workers}")]
             for m in args.model_list for amp in ("off", "bf16") for b in args.batch_sizes]
    lines += common.markdown_table(["model", "precision", "batch", "in device memory",
                                    "binary cache, main process",
                                    f"text loader, {args.workers} workers"], table)
    b = args.batch_sizes[len(args.batch_sizes) // 2]
    lines += ["", f"## DeepFM: embedding table and torch.compile (in device memory, batch {b:,})",
              ""]
    lines += common.markdown_table(["variant", "samples/s"], [
        [f"{'sparse' if r.get('sparse_used', r['sparse'] or cpu) else 'dense'} table"
         f"{' (forced: --sparse-emb on)' if r['sparse'] else ''}, "
         f"{'bf16' if r['amp'] == 'bf16' else 'fp32'}"
         f"{', torch.compile (' + args.compile_backend + ')' if r['compile'] else ''}", cell(r)]
        for r in rows if r["kind"] == "train" and r["model"] == "deepfm"
        and r["source"] == "device" and r["batch"] == b])
    lines += ["", "## Stage 1's DataLoader lesson on this device (Adult; "
              "stage1_adult/06_dataloader_tuning.py, parts b and d)", ""]
    lesson = next((r for r in rows if r["kind"] == "stage1"), None)
    if lesson and "stage1" in lesson:
        paths, base = lesson["stage1"]["paths"], lesson["stage1"]["paths"]["dataloader"]
        lines += common.markdown_table(["input path, batch 256", "training samples/s"], [
            [k, f"{v:,.0f} ({v / base:.1f}×)"] for k, v in paths.items()])
        lines += [""] + common.markdown_table(
            ["batch", "gather (ms)", "copy pinned non_blocking (ms)", "copy pageable (ms)",
             "device compute (ms)", "full step (ms)", "copy share", "waits for input"],
            [[f"{r['batch']:,}", f"{r['gather_ms']:.3f}", f"{r['copy_pinned_ms']:.3f}",
              f"{r['copy_pageable_ms']:.3f}", f"{r['compute_ms']:.3f}",
              f"{r['full_step_ms']:.3f}", f"{r['copy_share']:.0%}",
              "no" if r["device_bound"] else "yes"] for r in lesson["stage1"]["rows"]])
    else:
        lines += [cell(lesson) if lesson else "pending"]
    failed = [r for r in rows if "error" in r]
    if failed:
        lines += ["", "## Jobs that failed (the run went on)", ""]
        lines += [f"- {describe(r)}" for r in failed]
    skipped = [r for r in rows if "skipped" in r]
    if skipped:
        lines += ["", f"Skipped after --max-minutes {args.max_minutes:g}: "
                  + "; ".join(describe(r).split(":")[0] for r in skipped)]
    lines += ["", f"Command: `{timings['command']}` ({timings['total_s'] / 60:.1f} min so far)"
              if not done else f"Command: `{timings['command']}` "
              f"({timings['total_s'] / 60:.1f} min).", env["machine"]]
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    t0 = time.perf_counter()
    device = common.resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    env = environment(device)
    print(env["check_env"])
    if args.shm_note:
        print(args.shm_note)
    ctx, data_s = data(args, device)
    jobs = jobs_of(args)
    timings = {"data_s": data_s, "command": common.command_line(__file__, argv)}
    json_path = Path(args.runs_dir) / (args.out.stem + ".json")

    def save(rows):  # after every job: the report and the JSON as they stand
        timings["total_s"] = time.perf_counter() - t0
        common.write_text(args.out, report(args, env, rows, len(jobs), timings))
        common.write_json(json_path, {
            "script": "stage3_advanced/07_gpu.py", "device": env["name"], "environment": env,
            "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "jobs": len(jobs), "rows": rows, **timings})

    rows = measure(args, device, ctx, jobs, save)
    print(args.out.read_text())
    print(f"wrote {args.out} and {json_path}")
    return rows


if __name__ == "__main__":
    main()
