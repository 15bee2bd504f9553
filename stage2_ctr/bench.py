"""The harness of Stage 2's benchmark chapter (06_bench_throughput.py): the baselines and
contenders it times, and how it times them. Nothing here is part of a lesson's code path.

Loader benchmark: the same work (parse + log1p + hash to arrays) by pandas.read_csv, pyarrow's
streaming CSV reader and this project's loader with 0-2 worker processes; every configuration
runs in a fresh process (its peak RSS is its own), repeats go round-robin over the
configurations (drift of a shared machine hits them alike) and the median is reported.

Training benchmark: one DeepFM (emb 16, MLP 400-400-400, 39 fields) trained by this project's
step three ways (RowSparseAdam, torch's SparseAdam, a dense table), fed from disk by the loader,
and by DeepCTR-Torch's `fit` and pytorch-fm's model (installed into a temporary folder for the
run, never project dependencies). Each contender is set up once and returns a function that
times one pass; passes run round-robin.
"""
import multiprocessing
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

import common
from stage2_ctr import binary_cache, criteo
from stage2_ctr.models import build_model, criteo_schema
from stage2_ctr.training import autocast_for, make_optimizers, make_step

N_DENSE, N_SPARSE, EMB, MLP = 13, 26, 16, (400, 400, 400)
FIELD_VOCAB = 2 ** 20 // N_SPARSE  # per-field vocabulary for the libraries that need one


# ------------------------------------------------------------------------- loader benchmark
def baseline_pandas(path, hash_bits, n_labels, chunk_rows=200_000):
    """The textbook way: pandas.read_csv in chunks, then the same log1p + hash per column."""
    import pandas as pd
    names = [f"label{i}" for i in range(n_labels)] + [f"I{i}" for i in range(1, 14)] + \
            [f"C{i}" for i in range(1, 27)]
    rows = 0
    for df in pd.read_csv(path, sep="\t", header=None, names=names, chunksize=chunk_rows,
                          dtype={f"C{i}": str for i in range(1, 27)}):
        dense = np.log1p(np.maximum(df[[f"I{i}" for i in range(1, 14)]].to_numpy(np.float64), 0))
        dense = np.nan_to_num(dense).astype(np.float32)
        sparse = np.stack([pd.util.hash_array(df[f"C{i}"].fillna("").to_numpy(object),
                                              hash_key=f"C{i:015d}") >> (64 - hash_bits)
                           for i in range(1, 27)], 1).astype(np.int64)
        rows += len(dense) + 0 * sparse.shape[0]
    return rows


def baseline_pyarrow(path, hash_bits, n_labels):
    """pyarrow's streaming CSV reader (one core here), same transform; only if installed."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.csv as pacsv
    names = [f"label{i}" for i in range(n_labels)] + [f"I{i}" for i in range(1, 14)] + \
            [f"C{i}" for i in range(1, 27)]
    types = {f"C{i}": pa.string() for i in range(1, 27)}
    types.update({f"I{i}": pa.float64() for i in range(1, 14)})
    reader = pacsv.open_csv(path, read_options=pacsv.ReadOptions(column_names=names,
                                                                 block_size=8 << 20),
                            parse_options=pacsv.ParseOptions(delimiter="\t"),
                            convert_options=pacsv.ConvertOptions(column_types=types))
    rows = 0
    for batch in reader:
        dense = np.stack([batch.column(f"I{i}").to_numpy(zero_copy_only=False)
                          for i in range(1, 14)], 1)
        dense = np.nan_to_num(np.log1p(np.maximum(dense, 0))).astype(np.float32)
        for i in range(1, 27):
            col = batch.column(f"C{i}").to_numpy(zero_copy_only=False)
            pd.util.hash_array(col.astype(object), hash_key=f"C{i:015d}")
        rows += batch.num_rows
    return rows


def loader_pass(path, workers, group, hash_bits, n_labels, batch_size, chunk_kb):
    """Every batch of the file through CriteoStream (+ DataLoader workers): rows."""
    stream = criteo.CriteoStream([path], batch_size, hash_bits, None, n_labels,
                                 chunk_bytes=chunk_kb << 10, group=group)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers)
    return sum(len(b[0]) for b in criteo.iter_batches(loader, batch_size))


def loader_configs():
    configs = ["pandas"]
    try:
        import pyarrow  # noqa: F401
        configs.append("pyarrow")
    except ImportError:
        pass
    return configs + ["loader workers=0", "loader workers=2 group=1", "loader workers=1 group=8",
                      "loader workers=2 group=8"]


def _one_config(queue, config, path, hash_bits, n_labels, batch_size, chunk_kb):
    """In a fresh (spawned) process: run one configuration, report rows/s and peak RSS. A
    spawned process makes 'spawn' its default start method; DataLoader workers are forked on
    Linux everywhere else in this project, so they are forked here too (spawned workers would
    re-import torch and count their start-up as loader time)."""
    if sys.platform.startswith("linux"):
        multiprocessing.set_start_method("fork", force=True)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    if config == "pandas":
        rows = baseline_pandas(path, hash_bits, n_labels)
    elif config == "pyarrow":
        rows = baseline_pyarrow(path, hash_bits, n_labels)
    else:  # "loader workers=W [group=G]"
        opts = dict(kv.split("=") for kv in config.split()[1:])
        rows = loader_pass(path, int(opts["workers"]), int(opts.get("group", 1)), hash_bits,
                           n_labels, batch_size, chunk_kb)
    seconds = time.perf_counter() - t0
    queue.put({"rows": rows, "seconds": seconds, "rows_per_s": rows / seconds,
               "peak_rss_mb": common.peak_rss_mb(children=True)})


def loader_bench(path, repeats=3, hash_bits=20, n_labels=1, batch_size=4096, chunk_kb=1024,
                 progress=None):
    """{config: {rows, rows_per_s (median), all_rows_per_s, peak_rss_mb}}."""
    ctx = multiprocessing.get_context("spawn")
    configs = loader_configs()
    runs = {config: [] for config in configs}
    for r in range(repeats):
        for config in configs:
            queue = ctx.Queue()
            proc = ctx.Process(target=_one_config, args=(queue, config, str(path), hash_bits,
                                                         n_labels, batch_size, chunk_kb))
            proc.start()
            try:
                result = queue.get(timeout=3600)
            finally:
                proc.join()
            if proc.exitcode:
                raise SystemExit(f"error: loader bench config {config!r} failed "
                                 f"(exit {proc.exitcode})")
            runs[config].append(result)
            if progress:
                progress(f"round {r + 1}/{repeats} {config:<26} {result['rows_per_s']:>12,.0f} "
                         "rows/s")
    return {config: {"rows": r[0]["rows"],
                     "rows_per_s": statistics.median(x["rows_per_s"] for x in r),
                     "all_rows_per_s": [x["rows_per_s"] for x in r],
                     "peak_rss_mb": max(x["peak_rss_mb"] for x in r)}
            for config, r in runs.items()}


# ----------------------------------------------------------------------- training benchmark
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


def ours(rows, b, table="row", name="deepfm", amp=None):
    """This project's model (DeepFM unless `name`) and step. table: 'row' (the trainer's
    default: RowSparseAdam + fused AdamW), 'torch-sparse' (SparseAdam + unfused Adam), 'dense'
    (one AdamW over everything, the table included). amp: None (fp32) or torch.bfloat16."""
    dense, ids, label = (torch.from_numpy(a) for a in make_data(rows))
    # our loader yields ids already hashed into one shared 2^20 table: offset each field
    ids = ids + torch.arange(N_SPARSE) * FIELD_VOCAB
    torch.manual_seed(0)
    model = build_model(name, criteo_schema(20), emb_dim=EMB, mlp=MLP,
                        sparse=table != "dense")
    if table == "torch-sparse":
        tables = [model.embedding.table.weight, model.linear.weight.weight]
        rest = [p for p in model.parameters() if all(p is not t for t in tables)]
        opts = [torch.optim.Adam(rest, lr=1e-3), torch.optim.SparseAdam(tables, lr=1e-3)]
    else:
        opts = make_optimizers(model, 1e-3)
    step = make_step(model, opts, autocast=autocast_for(torch.device("cpu"), amp))

    def step_i(i):
        s = slice(i * b, (i + 1) * b)
        step(dense[s], ids[s], label[s])
    for i in range(5):
        step_i(i)
    return lambda: timed_pass(step_i, rows // b, b)


def ours_from_disk(rows, b, path):
    """The default step fed by the streaming loader (one worker process parsing `path` while
    this one trains) over the same number of rows. As in a long run, the worker's start-up is
    not timed: the pass starts after its first item (8 batches) has been trained on."""
    torch.manual_seed(0)
    model = build_model("deepfm", criteo_schema(20), emb_dim=EMB, mlp=MLP, sparse=True)
    step = make_step(model, make_optimizers(model, 1e-3))
    stream = criteo.CriteoStream([path], b, 20, group=8)

    def one_pass():
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=1)
        batches = criteo.iter_batches(loader, b)
        for _, batch in zip(range(8), batches):  # the worker's start and first item, untimed
            step(*batch)
        speed = timed_batches(step, batches, rows // b, path)
        del batches, loader
        return speed
    one_pass()  # warm-up (first-touch of the table, the page cache of the file)
    return one_pass


def timed_batches(step, batches, n_batches, source):
    """samples/s of `step` over the next n_batches (dense, ids, label) of an iterator."""
    t0, n = time.perf_counter(), 0
    for _, (d, i, y) in zip(range(n_batches), batches):
        step(d, i, y)
        n += len(y)
    if n == 0:
        raise SystemExit(f"{source}: too few rows for a timed pass of {n_batches} batches")
    return n / (time.perf_counter() - t0)


def ours_from_cache(rows, b, cache, preload=False):
    """The default step fed from a binary cache folder (binary_cache.BinaryStream, read in this
    process: nothing to parse), or with preload=True from the same rows loaded once into memory
    and batched by a shuffled permutation (binary_cache.Preloaded, what `train_ctr.py --preload
    device` does). Timed over the same number of rows as the in-memory contender."""
    torch.manual_seed(0)
    model = build_model("deepfm", criteo_schema(20), emb_dim=EMB, mlp=MLP, sparse=True)
    step = make_step(model, make_optimizers(model, 1e-3))
    if preload:
        source = binary_cache.Preloaded(binary_cache.read_all(cache), b, "cpu", shuffle=True)
    else:
        source = binary_cache.BinaryStream(cache, b)

    def one_pass():
        return timed_batches(step, iter(source), rows // b, cache)
    one_pass()  # warm-up (first-touch of the table, the page cache of the arrays)
    return one_pass


def torchfm(rows, b):
    from torchfm.model.dfm import DeepFactorizationMachineModel
    dense, ids, label = make_data(rows)
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
    return lambda: timed_pass(step_i, rows // b, b)


def deepctr(rows, b):
    from deepctr_torch.inputs import DenseFeat, SparseFeat
    from deepctr_torch.models import DeepFM
    dense, ids, label = make_data(rows)
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
        return rows / (time.perf_counter() - t0)
    return one_pass


# every contender: (rows, batch, the Criteo text file, its binary cache folder) -> one timed pass
CONTENDERS = {"ours": lambda rows, b, path, cache: ours(rows, b, "row"),
              "ours, torch SparseAdam": lambda rows, b, path, cache: ours(rows, b, "torch-sparse"),
              "ours, dense table": lambda rows, b, path, cache: ours(rows, b, "dense"),
              "ours, from disk": lambda rows, b, path, cache: ours_from_disk(rows, b, path),
              "ours, binary cache": lambda rows, b, path, cache: ours_from_cache(rows, b, cache),
              "ours, preloaded": lambda rows, b, path, cache: ours_from_cache(rows, b, cache,
                                                                              preload=True),
              "deepctr-torch": lambda rows, b, path, cache: deepctr(rows, b),
              "pytorch-fm": lambda rows, b, path, cache: torchfm(rows, b)}


PRECISION_MODELS = ["dnn", "deepfm", "dcnv2"]


def precision_contenders():
    """'<model> fp32' and '<model> bf16' for the models with an MLP: the same step, with and
    without bf16 autocast around the forward pass."""
    out = {}
    for name in PRECISION_MODELS:
        out[f"{name} fp32"] = lambda rows, b, path, name=name: ours(rows, b, "row", name)
        out[f"{name} bf16"] = lambda rows, b, path, name=name: ours(rows, b, "row", name,
                                                                    torch.bfloat16)
    return out


def install_others(folder):
    """DeepCTR-Torch and pytorch-fm into `folder` for this run only."""
    pip = [sys.executable, "-m", "pip", "install", "-q", "--target", folder]
    # --no-deps: they must use this environment's torch, never pull another one
    subprocess.run(pip + ["--no-deps", "deepctr-torch==0.3.0", "torchfm==0.7.0"], check=True)
    subprocess.run(pip + ["requests"], check=True)  # deepctr_torch imports it at import time


def mlp_flops_per_sample(n_fields=N_DENSE + N_SPARSE, emb=EMB, hidden=MLP, name="deepfm",
                         cross_layers=3):
    """Multiply-adds of the matmuls, x2 for FLOPs, x3 for forward + the two backward matmuls:
    the MLP, and for DCN-v2 its d x d cross layers too."""
    dims = [n_fields * emb, *hidden, 1]
    macs = sum(i * o for i, o in zip(dims[:-1], dims[1:]))
    if name == "dcnv2":
        macs += cross_layers * (n_fields * emb) ** 2
    return 2 * 3 * macs
