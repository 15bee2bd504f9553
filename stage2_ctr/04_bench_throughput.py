"""Stage 2, step 5: training throughput of our DeepFM against DeepCTR-Torch and pytorch-fm.

What you learn here: where a CTR training step spends its time on a CPU. The same DeepFM (emb 16,
MLP 400-400-400, 39 fields, data already in memory) is trained by DeepCTR-Torch's keras-like
`fit`, by pytorch-fm's DeepFM in a plain loop, and by this project's model with a dense or a
sparse (SparseAdam) embedding table. A dense Adam step sweeps the whole 2^20 x 16 table and its
two moment buffers every step; a sparse step touches the ~26 x B rows of the batch. The MLP's
matmuls are the rest: we report the share of the machine's sgemm peak the step reaches (peak
measured in the same run).

DeepCTR-Torch and pytorch-fm are installed into a temporary folder for this comparison only
(`pip install --no-deps --target`, next to the torch of this environment); they are never
dependencies of the project.

Run:    python stage2_ctr/04_bench_throughput.py [--rows 200000] [--threads 2]
        python stage2_ctr/04_bench_throughput.py --skip-others      # no pip, ours only
Writes: results/stage2_throughput.md, runs/bench_throughput/metrics.json
Time:   ~5 min on 2 CPU cores (plus the pip install, seconds from a local cache).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
N_DENSE, N_SPARSE, EMB, MLP = 13, 26, 16, (400, 400, 400)
FIELD_VOCAB = 2 ** 20 // N_SPARSE  # per-field vocabulary for the libraries that need one


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=200_000, help="in-memory rows per timed pass")
    p.add_argument("--batch-sizes", default="4096,1024")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the training process")
    p.add_argument("--repeats", type=int, default=3, help="timed passes per config (median)")
    p.add_argument("--skip-others", action="store_true", help="do not install/run the others")
    p.add_argument("--file", default=str(HERE / "data" / "synthetic" / "train.txt"),
                   help="Criteo-format file for the from-disk run (01_make_subset.py output)")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: one config
    p.add_argument("--batch-size", type=int, default=4096, help=argparse.SUPPRESS)
    p.add_argument("--out-dir", default=str(ROOT / "results"))
    p.add_argument("--runs-dir", default=str(ROOT / "runs"))
    return p.parse_args(argv)


def make_data(rows, seed=0):
    """Random in-memory data of the Criteo shape (13 dense, 26 categorical ids)."""
    g = np.random.default_rng(seed)
    dense = g.standard_normal((rows, N_DENSE)).astype(np.float32)
    # Zipf-like ids per field, as in real CTR data
    ids = (np.exp(g.random((rows, N_SPARSE)) * np.log(FIELD_VOCAB)) - 1).astype(np.int64)
    label = (g.random(rows) < 0.25).astype(np.float32)
    return dense, ids, label


def time_passes(step_fn, n_batches, repeats):
    """samples/s of `repeats` passes of n_batches steps after one warm-up pass (median)."""
    for i in range(min(n_batches, 5)):
        step_fn(i)
    speeds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(n_batches):
            step_fn(i)
        speeds.append(time.perf_counter() - t0)
    return speeds


# ------------------------------------------------------------------------- the contenders
def bench_ours(args, sparse, from_disk=False):
    """Our DeepFM on in-memory tensors or, from_disk, fed by the streaming loader (one worker
    process parsing while this one trains) over the same number of rows of --file."""
    from models import build_model
    from train_ctr import load_loader_module, make_optimizers, parse_args as train_args
    dense, ids, label = (torch.from_numpy(a) for a in make_data(args.rows))
    # our loader yields ids already hashed into one shared 2^20 table: offset each field
    ids = ids + torch.arange(N_SPARSE) * FIELD_VOCAB
    model = build_model("deepfm", 2 ** 20, emb_dim=EMB, mlp=list(MLP), sparse=sparse)
    opts = make_optimizers(model, train_args(["--lr", "1e-3"]), sparse)
    b = args.batch_size
    n_batches = args.rows // b

    def train_step(d, i, y):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(d, i), y)
        for o in opts:
            o.zero_grad(set_to_none=True)
        loss.backward()
        for o in opts:
            o.step()

    if not from_disk:
        def step(i):
            s = slice(i * b, (i + 1) * b)
            train_step(dense[s], ids[s], label[s])
        return [n_batches * b / t for t in time_passes(step, n_batches, args.repeats)]
    loader_mod = load_loader_module()
    stream = loader_mod.CriteoStream([args.file], b, 20, group=8, verbose=False)
    for i in range(5):  # warm-up, as time_passes does
        s = slice(i * b, (i + 1) * b)
        train_step(dense[s], ids[s], label[s])
    speeds = []
    for _ in range(args.repeats):
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=1)
        t0, n = time.perf_counter(), 0
        for k, (d, i, y) in enumerate(loader_mod.iter_batches(loader, b)):
            train_step(d, i, y)
            n += len(y)
            if k + 1 >= n_batches:
                break
        speeds.append(n / (time.perf_counter() - t0))
        del loader
    return speeds


def bench_torchfm(args):
    from torchfm.model.dfm import DeepFactorizationMachineModel
    dense, ids, label = make_data(args.rows)
    # pytorch-fm takes categorical fields only: the 13 dense fields enter as 64-bucket ids
    dense_ids = np.clip(((dense + 4) * 8).astype(np.int64), 0, 63)
    x = torch.from_numpy(np.concatenate([dense_ids, ids], 1))
    y = torch.from_numpy(label)
    model = DeepFactorizationMachineModel([64] * N_DENSE + [FIELD_VOCAB] * N_SPARSE, EMB,
                                          MLP, dropout=0.0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    b = args.batch_size
    n_batches = args.rows // b

    def step(i):
        s = slice(i * b, (i + 1) * b)
        loss = torch.nn.functional.binary_cross_entropy(model(x[s]), y[s])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return [n_batches * b / t for t in time_passes(step, n_batches, args.repeats)]


def bench_deepctr(args):
    from deepctr_torch.inputs import DenseFeat, SparseFeat
    from deepctr_torch.models import DeepFM
    dense, ids, label = make_data(args.rows)
    columns = ([SparseFeat(f"C{i}", FIELD_VOCAB, embedding_dim=EMB) for i in range(N_SPARSE)]
               + [DenseFeat(f"I{i}", 1) for i in range(N_DENSE)])
    x = {f"C{i}": ids[:, i] for i in range(N_SPARSE)}
    x.update({f"I{i}": dense[:, i] for i in range(N_DENSE)})
    model = DeepFM(columns, columns, dnn_hidden_units=MLP, dnn_dropout=0.0, device="cpu")
    model.compile("adam", "binary_crossentropy")
    b = args.batch_size
    model.fit(x, label, batch_size=b, epochs=1, verbose=0)  # warm-up
    speeds = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        model.fit(x, label, batch_size=b, epochs=1, verbose=0)
        speeds.append(args.rows / (time.perf_counter() - t0))
    return speeds


def sgemm_peak_gflops(threads, n=2048, repeats=5):
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / min(times) / 1e9


def mlp_flops_per_sample():
    """Multiply-adds of the MLP, x2 for FLOPs, x3 for forward + the two backward matmuls."""
    dims = [(N_DENSE + N_SPARSE) * EMB, *MLP, 1]
    macs = sum(i * o for i, o in zip(dims[:-1], dims[1:]))
    return 2 * macs * 3


def run_one(args):
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    fn = {"ours-sparse": lambda: bench_ours(args, True),
          "ours-sparse, from disk": lambda: bench_ours(args, True, from_disk=True),
          "ours-dense": lambda: bench_ours(args, False),
          "pytorch-fm": lambda: bench_torchfm(args),
          "deepctr-torch": lambda: bench_deepctr(args)}[args.one]
    print(json.dumps({"config": args.one, "samples_per_s": fn()}))


def install_others(folder):
    pip = [sys.executable, "-m", "pip", "install", "-q", "--target", folder]
    # --no-deps: they must use this environment's torch, never pull another one
    subprocess.run(pip + ["--no-deps", "deepctr-torch==0.3.0", "torchfm==0.7.0"], check=True)
    subprocess.run(pip + ["requests"], check=True)  # deepctr_torch imports it at import time


def main(argv=None):
    args = parse_args(argv)
    if args.one:
        return run_one(args)
    t_start = time.perf_counter()
    configs = ["ours-sparse", "ours-dense"]
    if Path(args.file).exists():
        configs.append("ours-sparse, from disk")
    env = dict(os.environ)
    tmp = None
    if not args.skip_others:
        tmp = tempfile.TemporaryDirectory(prefix="ctr_bench_")
        print(f"installing deepctr-torch and torchfm into {tmp.name} (this run only)")
        install_others(tmp.name)
        env["PYTHONPATH"] = tmp.name + os.pathsep + env.get("PYTHONPATH", "")
        configs += ["deepctr-torch", "pytorch-fm"]
    peak = sgemm_peak_gflops(args.threads)
    flops = mlp_flops_per_sample()
    results = {}
    for b in [int(x) for x in args.batch_sizes.split(",")]:
        for config in configs:
            out = subprocess.run([sys.executable, __file__, "--one", config, "--batch-size",
                                  str(b), "--rows", str(args.rows), "--file", args.file,
                                  "--threads",
                                  str(args.threads), "--repeats", str(args.repeats)],
                                 capture_output=True, text=True, env=env)
            if out.returncode != 0:
                raise SystemExit(f"{config} failed: {out.stderr.strip()[-800:]}")
            speeds = json.loads(out.stdout.strip().splitlines()[-1])["samples_per_s"]
            results[f"{config} b{b}"] = {"batch": b, "config": config,
                                         "samples_per_s": statistics.median(speeds),
                                         "all": speeds}
            print(f"batch {b:>5} {config:<14} {statistics.median(speeds):>10,.0f} samples/s",
                  flush=True)
    if tmp:
        tmp.cleanup()

    lines = ["# Stage 2: DeepFM training throughput on this CPU", "",
             f"DeepFM, emb {EMB}, MLP {'-'.join(map(str, MLP))}, 39 fields, 2^20 embedding rows, "
             f"{args.rows:,} rows in memory, {args.threads} threads, median of {args.repeats} "
             f"passes. sgemm peak measured in the same run: {peak:,.0f} GFLOP/s; the MLP is "
             f"{flops / 1e6:.1f} MFLOP per sample (forward + backward).", "",
             "| batch | trainer | samples/s | vs DeepCTR-Torch fit | vs pytorch-fm | "
             "MLP share of sgemm peak |", "|---|---|---|---|---|---|"]
    for key, r in results.items():
        b = r["batch"]
        ref_dc = results.get(f"deepctr-torch b{b}", {}).get("samples_per_s")
        ref_fm = results.get(f"pytorch-fm b{b}", {}).get("samples_per_s")
        lines.append(f"| {b} | {r['config']} | {r['samples_per_s']:,.0f} | "
                     + (f"{r['samples_per_s'] / ref_dc:.2f}×" if ref_dc else "-") + " | "
                     + (f"{r['samples_per_s'] / ref_fm:.2f}×" if ref_fm else "-") + " | "
                     f"{r['samples_per_s'] * flops / 1e9 / peak:.0%} |")
    lines += ["", f"Written by `python stage2_ctr/04_bench_throughput.py --threads {args.threads}"
              f"` in {time.perf_counter() - t_start:.0f} s."]
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "stage2_throughput.md").write_text("\n".join(lines) + "\n")
    run_dir = Path(args.runs_dir) / "bench_throughput"
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.json").write_text(json.dumps(
        {"script": "stage2_ctr/04_bench_throughput.py", "model": "deepfm", "dataset": "random",
         "device": "cpu", "seed": 0, "config": vars(args), "sgemm_peak_gflops": peak,
         "mlp_flops_per_sample": flops, "results": results,
         "wall_s": time.perf_counter() - t_start}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
