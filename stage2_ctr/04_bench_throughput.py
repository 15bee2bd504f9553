"""Stage 2, step 5: training throughput of our DeepFM against DeepCTR-Torch and pytorch-fm.

What you learn here: where a CTR training step spends its time on a CPU. The same DeepFM (emb 16,
MLP 400-400-400, 39 fields, data already in memory) is trained by DeepCTR-Torch's keras-like
`fit`, by pytorch-fm's DeepFM in a plain loop, and by this project's model three ways: with a
dense embedding table (Adam sweeps all 2^20 x 16 rows and their two moment buffers every step),
with sparse gradients and torch's SparseAdam, and the trainer's default: sparse gradients and
RowSparseAdam (models/optim.py, the same update without sorting the ids) + fused Adam for the
MLP. The MLP's matmuls are the rest: we report the share of the machine's sgemm peak the step
reaches (peak measured in the same run).

The machine is noisy, so the contenders run round-robin: every round times one pass of each,
and the table gives the median over rounds (drift hits every contender alike).

DeepCTR-Torch and pytorch-fm are installed into a temporary folder for this comparison only
(`pip install --no-deps --target`, next to the torch of this environment); they are never
dependencies of the project.

Run:    python stage2_ctr/04_bench_throughput.py [--rows 200000] [--threads 2] [--repeats 5]
        python stage2_ctr/04_bench_throughput.py --skip-others      # no pip, ours only
Writes: results/stage2_throughput.md, runs/bench_throughput/metrics.json
Time:   ~20 min on 2 CPU cores (plus the pip install, seconds from a local cache).
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
from tqdm import tqdm

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
    p.add_argument("--repeats", type=int, default=5,
                   help="round-robin rounds; each times one pass of every contender (median)")
    p.add_argument("--skip-others", action="store_true", help="do not install/run the others")
    p.add_argument("--file", default=str(HERE / "data" / "synthetic" / "train.txt"),
                   help="Criteo-format file for the from-disk run (01_make_subset.py output)")
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


def timed_pass(step_fn, n_batches, rows_per_batch):
    """samples/s of one pass of n_batches steps."""
    t0 = time.perf_counter()
    for i in range(n_batches):
        step_fn(i)
    return n_batches * rows_per_batch / (time.perf_counter() - t0)


# ------------------------------------------------------------------------- the contenders
# Each contender is set up once (model, optimizer, data, a few warm-up steps) and returns a
# function that runs one timed pass over --rows rows and returns samples/s.
def ours(args, b, table="row"):
    """table: 'row' (the trainer's default), 'torch-sparse' (SparseAdam + unfused Adam),
    'dense' (one Adam over everything)."""
    from models import build_model
    from train_ctr import make_optimizers, parse_args as train_args
    dense, ids, label = (torch.from_numpy(a) for a in make_data(args.rows))
    # our loader yields ids already hashed into one shared 2^20 table: offset each field
    ids = ids + torch.arange(N_SPARSE) * FIELD_VOCAB
    torch.manual_seed(0)
    model = build_model("deepfm", 2 ** 20, emb_dim=EMB, mlp=list(MLP), sparse=table != "dense")
    if table == "torch-sparse":
        tables = [model.embedding.table.weight, model.linear.weight.weight]
        rest = [p for p in model.parameters() if all(p is not t for t in tables)]
        opts = [torch.optim.Adam(rest, lr=1e-3), torch.optim.SparseAdam(tables, lr=1e-3)]
    else:
        opts = make_optimizers(model, train_args(["--lr", "1e-3"]), table == "row")
    step = train_step_of(model, opts)

    def step_i(i):
        s = slice(i * b, (i + 1) * b)
        step(dense[s], ids[s], label[s])
    for i in range(5):
        step_i(i)
    return lambda: timed_pass(step_i, args.rows // b, b)


def train_step_of(model, opts):
    def train_step(d, i, y):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(d, i), y)
        for o in opts:
            o.zero_grad(set_to_none=True)
        loss.backward()
        for o in opts:
            o.step()
    return train_step


def ours_from_disk(args, b):
    """The default trainer fed by the streaming loader (one worker process parsing --file while
    this one trains) over the same number of rows. As in a long run, the worker's start-up is
    not timed: the pass starts after its first item (8 batches) has been trained on."""
    from models import build_model
    from train_ctr import load_loader_module, make_optimizers, parse_args as train_args
    torch.manual_seed(0)
    model = build_model("deepfm", 2 ** 20, emb_dim=EMB, mlp=list(MLP), sparse=True)
    step = train_step_of(model, make_optimizers(model, train_args(["--lr", "1e-3"]), True))
    loader_mod = load_loader_module()
    stream = loader_mod.CriteoStream([args.file], b, 20, group=8, verbose=False)

    def one_pass():
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=1)
        batches = loader_mod.iter_batches(loader, b)
        for _, batch in zip(range(8), batches):  # the worker's start and first item, untimed
            step(*batch)
        t0, n = time.perf_counter(), 0
        for k, (d, i, y) in enumerate(batches):
            step(d, i, y)
            n += len(y)
            if k + 1 >= args.rows // b:
                break
        del batches, loader
        if n == 0:
            raise SystemExit(f"{args.file}: too few rows for a timed pass at batch {b}")
        return n / (time.perf_counter() - t0)
    one_pass()  # warm-up (first-touch of the table, the page cache of the file)
    return one_pass


def torchfm(args, b):
    from torchfm.model.dfm import DeepFactorizationMachineModel
    dense, ids, label = make_data(args.rows)
    # pytorch-fm takes categorical fields only: the 13 dense fields enter as 64-bucket ids
    dense_ids = np.clip(((dense + 4) * 8).astype(np.int64), 0, 63)
    x = torch.from_numpy(np.concatenate([dense_ids, ids], 1))
    y = torch.from_numpy(label)
    torch.manual_seed(0)
    model = DeepFactorizationMachineModel([64] * N_DENSE + [FIELD_VOCAB] * N_SPARSE, EMB,
                                          MLP, dropout=0.0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step_i(i):
        s = slice(i * b, (i + 1) * b)
        loss = torch.nn.functional.binary_cross_entropy(model(x[s]), y[s])
        opt.zero_grad()
        loss.backward()
        opt.step()
    for i in range(5):
        step_i(i)
    return lambda: timed_pass(step_i, args.rows // b, b)


def deepctr(args, b):
    from deepctr_torch.inputs import DenseFeat, SparseFeat
    from deepctr_torch.models import DeepFM
    dense, ids, label = make_data(args.rows)
    columns = ([SparseFeat(f"C{i}", FIELD_VOCAB, embedding_dim=EMB) for i in range(N_SPARSE)]
               + [DenseFeat(f"I{i}", 1) for i in range(N_DENSE)])
    x = {f"C{i}": ids[:, i] for i in range(N_SPARSE)}
    x.update({f"I{i}": dense[:, i] for i in range(N_DENSE)})
    torch.manual_seed(0)
    model = DeepFM(columns, columns, dnn_hidden_units=MLP, dnn_dropout=0.0, device="cpu")
    model.compile("adam", "binary_crossentropy")
    warm = {k: v[:5 * b] for k, v in x.items()}
    model.fit(warm, label[:5 * b], batch_size=b, epochs=1, verbose=0)

    def one_pass():
        t0 = time.perf_counter()
        model.fit(x, label, batch_size=b, epochs=1, verbose=0)
        return args.rows / (time.perf_counter() - t0)
    return one_pass


def write_atomic(path, text):
    """Write to a temporary file beside `path`, then rename: a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


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


def install_others(folder):
    pip = [sys.executable, "-m", "pip", "install", "-q", "--target", folder]
    # --no-deps: they must use this environment's torch, never pull another one
    subprocess.run(pip + ["--no-deps", "deepctr-torch==0.3.0", "torchfm==0.7.0"], check=True)
    subprocess.run(pip + ["requests"], check=True)  # deepctr_torch imports it at import time


CONTENDERS = {"ours": lambda a, b: ours(a, b, "row"),
              "ours, torch SparseAdam": lambda a, b: ours(a, b, "torch-sparse"),
              "ours, dense table": lambda a, b: ours(a, b, "dense"),
              "ours, from disk": ours_from_disk,
              "deepctr-torch": deepctr,
              "pytorch-fm": torchfm}


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    names = ["ours", "ours, torch SparseAdam", "ours, dense table"]
    if Path(args.file).exists():
        names.append("ours, from disk")
    tmp = None
    if not args.skip_others:
        tmp = tempfile.TemporaryDirectory(prefix="ctr_bench_")
        print(f"installing deepctr-torch and torchfm into {tmp.name} (this run only)")
        install_others(tmp.name)
        sys.path.insert(0, tmp.name)
        names += ["deepctr-torch", "pytorch-fm"]
    peak = sgemm_peak_gflops(args.threads)
    flops = mlp_flops_per_sample()
    results = {}
    for b in [int(x) for x in args.batch_sizes.split(",")]:
        passes = {name: CONTENDERS[name](args, b) for name in names}
        speeds = {name: [] for name in names}
        for _ in tqdm(range(args.repeats), desc=f"batch {b}: rounds", leave=False):
            for name in names:  # round-robin: drift of the machine hits everyone alike
                speeds[name].append(passes[name]())
        del passes
        for name in names:
            results[f"{name} b{b}"] = {"batch": b, "config": name, "all": speeds[name],
                                       "samples_per_s": statistics.median(speeds[name])}
            print(f"batch {b:>5} {name:<24} {statistics.median(speeds[name]):>10,.0f} "
                  f"samples/s  (rounds: {', '.join(f'{v:,.0f}' for v in speeds[name])})",
                  flush=True)
    if tmp:
        sys.path.remove(tmp.name)
        tmp.cleanup()

    lines = ["# Stage 2: DeepFM training throughput on this CPU", "",
             f"DeepFM, emb {EMB}, MLP {'-'.join(map(str, MLP))}, 39 fields, 2^20 embedding rows, "
             f"{args.rows:,} rows in memory, {args.threads} threads, median of {args.repeats} "
             f"round-robin passes. sgemm peak measured in the same run: {peak:,.0f} GFLOP/s; the MLP is "
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
              f" --repeats {args.repeats}` in {time.perf_counter() - t_start:.0f} s."]
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(out_dir / "stage2_throughput.md", "\n".join(lines) + "\n")
    run_dir = Path(args.runs_dir) / "bench_throughput"
    run_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(run_dir / "metrics.json", json.dumps(
        {"script": "stage2_ctr/04_bench_throughput.py", "model": "deepfm", "dataset": "random",
         "device": "cpu", "seed": 0, "config": vars(args), "sgemm_peak_gflops": peak,
         "mlp_flops_per_sample": flops, "results": results,
         "wall_s": time.perf_counter() - t_start}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
