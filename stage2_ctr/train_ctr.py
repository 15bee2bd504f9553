"""Stage 2, the trainer: one CTR model (LR, FM, DNN, DeepFM, DCN, DCN-v2) on Criteo-format data.

What you learn here: the whole CTR training loop by hand - a streaming loader feeding hashed ids,
one 2^20-row embedding table trained with sparse gradients (RowSparseAdam touches only the rows
of the batch), LogLoss + AUC on validation, early stopping, checkpoints you can resume from, and
DDP across processes with the same script (torchrun). On synthetic data the oracle's scores are
printed next to the model's, so you see how far from the best possible each model is.

This file reads top to bottom: config, data (every input checked before the first step), model
and optimizers, the loop (one evaluate-and-checkpoint site), the report.
Read with it: stage2_ctr/models/layers.py and the model you train, stage2_ctr/training.py (the
optimizers and the step), stage2_ctr/criteo.py (the loader, chapter 02), stage2_ctr/
train_stats.py (dense statistics, rare values), stage2_ctr/binary_cache.py (chapter 07) and
stage2_ctr/run_state.py (the run folder's lock, last.pt for --resume).
Run:    python stage2_ctr/train_ctr.py --model deepfm
        python stage2_ctr/train_ctr.py --model dcn --cross-layers 3 --epochs 2 --device cuda
        torchrun --nproc_per_node 2 stage2_ctr/train_ctr.py --model deepfm     # DDP (gloo on CPU)
        torchrun --nnodes 2 --node_rank R --master_addr HOST --master_port 29500 \\
                 --nproc_per_node 8 stage2_ctr/train_ctr.py ...                 # several machines
Reads:  --train/--val/--test (default: stage2_ctr/data/synthetic/*.txt from 01_make_subset.py)
Writes: runs/<name>/metrics.json (with the config), curves.png, best.pt (best on val), last.pt
Time:   the demo (DeepFM, 160k training rows, 2 epochs) ~20 s on 2 CPU cores.
"""
import argparse
import hashlib
import json
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: plain imports
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from tqdm import tqdm  # noqa: E402

import common  # noqa: E402
from stage2_ctr import binary_cache, criteo, train_stats  # noqa: E402
from stage2_ctr.models import MODELS, build_model, criteo_schema  # noqa: E402
from stage2_ctr.run_state import (RunLock, TrainError, all_ranks,  # noqa: E402
                                  in_step_with_other_ranks, load_last, save_last)
from stage2_ctr.training import (OPTIMIZERS, amp_dtype, autocast_for,  # noqa: E402
                                 cpu_has_native_bf16, make_optimizers, make_step, predict,
                                 reset_embeddings)

DATA = Path(__file__).resolve().parent / "data" / "synthetic"
# ------------------------------------------------------------------------------------ config
@dataclass
class TrainConfig:
    """Everything that decides a run's numbers. Written verbatim into metrics.json; a finished
    run is reused (03_compare_models.py) only when its whole recorded config is equal. A new
    field must default to the behaviour runs had before it: older records lack it."""
    model: str = "deepfm"
    train: list = field(default_factory=lambda: [str(DATA / "train.txt")])
    val: list = field(default_factory=lambda: [str(DATA / "val.txt")])
    test: list = field(default_factory=lambda: [str(DATA / "test.txt")])
    stats: str = None           # dense statistics JSON; None: <train>.stats.json, fitted once
    device: str = "auto"
    epochs: int = 1
    max_steps: int = 0          # 0: no limit
    batch_size: int = 4096
    lr: float = 1e-3
    emb_dim: int = 16
    hash_bits: int = 20
    min_count: int = 0          # values seen fewer times in train -> their field's rare bucket
    mlp: tuple = (400, 400, 400)
    cross_layers: int = 3
    dropout: float = 0.0
    weight_decay: float = 0.0   # dense parameters only (AdamW; see training.make_optimizers)
    decoupled_wd: bool = True   # False: Adam with L2 in the gradient (for the comparison only)
    optimizer: str = "adam"     # adam | adagrad | sgd (momentum 0.9): training.make_optimizers
    reinit_emb: bool = False    # re-draw the embedding tables (+ their optimizer state) per epoch
    sparse_emb: str = "auto"    # sparse gradients + RowSparseAdam for the tables (auto: CPU)
    amp: str = "auto"           # off | bf16 | auto: bf16 where the device multiplies it natively
    #                             (results/stage2_precision.md: faster on avx512_bf16, 0.06x without)
    preload: str = "none"       # none | device: the whole train split in device memory
    compile: bool = False
    num_workers: int = 1
    shuffle_buffer: int = 0
    eval_every: int = 0         # 0: validate at the end of each epoch
    evals_per_epoch: int = 0    # N > 1: also validate N - 1 times evenly inside each epoch
    patience: int = 2
    ckpt_every: int = 0
    threads: int = 0
    seed: int = 0
    run_name: str = None
    runs_dir: str = str(common.RUNS)


def parse_args(argv=None):
    """The command line -> (TrainConfig, resume, quiet). Every flag defaults to the dataclass."""
    d = TrainConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=MODELS, default=d.model)
    p.add_argument("--train", nargs="+", default=d.train,
                   help="training file(s), or one binary cache folder (07_binary_cache.py)")
    p.add_argument("--val", nargs="+", default=d.val, help="validation file(s)")
    p.add_argument("--test", nargs="+", default=d.test, help="test file(s)")
    p.add_argument("--stats", default=d.stats,
                   help="dense statistics JSON (default <train>.stats.json, fitted if missing)")
    p.add_argument("--device", type=common.device_arg, default=d.device,
                   help="auto | cpu | cuda | cuda:N")
    p.add_argument("--epochs", type=common.positive_int, default=d.epochs)
    p.add_argument("--max-steps", type=common.non_negative_int, default=d.max_steps,
                   help="stop after this many steps (0: no limit)")
    p.add_argument("--batch-size", type=common.positive_int, default=d.batch_size)
    p.add_argument("--lr", type=common.positive_float, default=d.lr)
    p.add_argument("--emb-dim", type=common.positive_int, default=d.emb_dim)
    p.add_argument("--hash-bits", type=common.checked(int, lambda v: 1 <= v <= 30, "in [1, 30]"),
                   default=d.hash_bits)
    p.add_argument("--min-count", type=common.non_negative_int, default=d.min_count,
                   help="values seen fewer times in the train file(s) share their field's "
                        "'rare' row (0: off)")
    p.add_argument("--mlp", type=common.layer_list, default=d.mlp,
                   help="hidden sizes of the MLP, e.g. 400,400,400")
    p.add_argument("--cross-layers", type=common.non_negative_int, default=d.cross_layers)
    p.add_argument("--dropout", type=common.probability, default=d.dropout)
    p.add_argument("--weight-decay", type=common.non_negative_float, default=d.weight_decay,
                   help="AdamW weight decay of the dense parameters")
    p.add_argument("--l2", dest="decoupled_wd", action="store_false",
                   help="Adam with L2 in the gradient instead of AdamW (to compare the two)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=d.optimizer,
                   help="adam: AdamW + RowSparseAdam (the rule); adagrad; sgd: momentum 0.9 "
                        "(08_one_epoch.py compares them)")
    p.add_argument("--reinit-emb", action="store_true",
                   help="at the start of every epoch after the first, draw the embedding tables "
                        "afresh and drop their optimizer state; the MLP is kept (MEDA, "
                        "08_one_epoch.py)")
    p.add_argument("--sparse-emb", choices=["auto", "on", "off"], default=d.sparse_emb,
                   help="sparse gradients + RowSparseAdam for the tables (auto: on for CPU)")
    p.add_argument("--amp", choices=["off", "bf16", "auto"], default=d.amp,
                   help="bf16 autocast for the MLP/cross matmuls (auto: on CUDA and on CPUs with "
                        "native bf16, i.e. avx512_bf16/amx_bf16; tables, loss, optimizer fp32)")
    p.add_argument("--preload", choices=["none", "device"], default=d.preload,
                   help="device: load the whole train split (best from a binary cache) into "
                        "device memory once and batch it there (see binary_cache.Preloaded)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--num-workers", type=common.non_negative_int, default=d.num_workers,
                   help="loader worker processes")
    p.add_argument("--shuffle-buffer", type=common.non_negative_int, default=d.shuffle_buffer,
                   help="rows shuffled together")
    p.add_argument("--eval-every", type=common.non_negative_int, default=d.eval_every,
                   help="validate every N steps (0: at the end of each epoch)")
    p.add_argument("--evals-per-epoch", type=common.non_negative_int, default=d.evals_per_epoch,
                   help="validate N times per epoch, evenly spaced, the last at its end (0 or "
                        "1: at the end only)")
    p.add_argument("--patience", type=common.positive_int, default=d.patience,
                   help="evaluations without a val AUC gain before stopping")
    p.add_argument("--ckpt-every", type=common.non_negative_int, default=d.ckpt_every,
                   help="write last.pt every N steps (and at each epoch end)")
    p.add_argument("--threads", type=common.non_negative_int, default=d.threads,
                   help="torch CPU threads (0: torch default)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--run-name", default=d.run_name, help="default ctr_<model>_s<seed>")
    p.add_argument("--runs-dir", default=d.runs_dir)
    p.add_argument("--resume", action="store_true", help="continue from runs/<name>/last.pt")
    p.add_argument("--quiet", action="store_true")
    args = vars(p.parse_args(argv))
    resume, quiet = args.pop("resume"), args.pop("quiet")
    cfg = TrainConfig(**args)
    cfg.run_name = cfg.run_name or f"ctr_{cfg.model}_s{cfg.seed}"
    return cfg, resume, quiet


# ---------------------------------------------------------------------------------- data
def check_inputs(cfg, say):
    """Before any training step: every file readable, no file in two splits, the train files'
    first rows parse, val and test read whole (rows, bad rows, both classes present - AUC needs
    both). The train split may instead be one binary cache folder (07_binary_cache.py), checked
    by binary_cache.check_for_training; its recorded sources take part in the overlap check.
    Returns the bad-row counts per split (the cache's as counted when it was made) and the
    val/test scans."""
    cache = None
    if binary_cache.is_cache(cfg.train[0]):
        if len(cfg.train) > 1:
            raise TrainError(f"--train {cfg.train[0]} is a binary cache: give it alone")
        cache = binary_cache.check_for_training(cfg.train[0], cfg.hash_bits, cfg.batch_size)
    bad_rows, scans, where = {}, {}, {}
    for split, files in [("train", cache["sources"] if cache else cfg.train), ("val", cfg.val),
                         ("test", cfg.test)]:
        for path in (map(Path, files) if cache and split == "train" else
                     criteo.check_paths(files)):
            other = where.setdefault(path.resolve(), split)
            if other != split:
                raise TrainError(f"{path}: is in --{other} and in --{split}"
                                 f"{f' (as a source of {cfg.train[0]})' if cache else ''}; a "
                                 "model scored on rows it trained on (or tuned on) says nothing"
                                 " - split it first")
    if not cache and criteo.scan(cfg.train, stop_after=1)["rows"] == 0:
        raise TrainError(f"{cfg.train[0]}: no data rows (blank lines only?)")
    if cache:
        bad_rows["train"] = cache.get("bad_rows", {})
        for line in criteo.describe_bad_rows(bad_rows["train"]):
            say(f"train (counted when {cfg.train[0]} was made): {line}")
    for split, files in [("val", cfg.val), ("test", cfg.test)]:
        s = scans[split] = criteo.scan(files)
        if s["rows"] == 0 or s["positives"][0] in (0, s["rows"]):
            raise TrainError(f"{files[0]}: --{split} has {s['rows']:,} rows and "
                             f"{s['positives'][0]:,.0f} positives; AUC needs both classes")
        bad_rows[split] = s["files"]
        for line in criteo.describe_bad_rows(s["files"]):
            say(f"{split}: {line}")
    return bad_rows, scans


def beside_train(train_files, suffix, runs_dir):
    """Where a file fitted on the train split is kept: next to the first train file
    (<train>.stats.json, <train>.counts20.npz) when that folder is writable, else under
    <runs-dir>/data_cache/ (a read-only data folder is still usable)."""
    path = Path(str(train_files[0]) + suffix)
    if os.access(path.parent, os.W_OK):
        return path
    key = hashlib.md5(str(path.resolve()).encode()).hexdigest()[:8]
    return Path(runs_dir) / "data_cache" / f"{key}_{path.name}"


def dense_stats(stats_path, train_files, rank, say, runs_dir=common.RUNS):
    """The train split's dense statistics. Given with --stats: read and checked against the
    train files (stale or broken: an error). Else <train>.stats.json, fitted by rank 0 when
    missing, broken or fitted on another version of the train file (with a notice). A binary
    cache has its statistics baked in: those (or None, raw values) are the ones val/test use,
    and a --stats that differs from them is refused."""
    if stats_path and not Path(stats_path).is_file():
        raise TrainError(f"--stats {stats_path}: not found; leave --stats out to fit them "
                         f"from the train file, or make it with python stage2_ctr/"
                         f"02_dataloader.py --fit-stats {train_files[0]}")
    if binary_cache.is_cache(train_files[0]):
        return binary_cache.baked_stats(train_files[0], stats_path)
    if stats_path:
        return train_stats.load_stats(stats_path, train_files)
    path = beside_train(train_files, ".stats.json", runs_dir)
    if rank == 0:
        try:
            train_stats.load_stats(path, train_files) if path.exists() else None
        except criteo.CriteoFormatError as e:
            say(f"{e}: fitting them again")
            path.unlink()
        if not path.exists():
            common.write_json(path, train_stats.fit_stats(train_files, 1_000_000))
    if dist.is_initialized():
        dist.barrier()
    return train_stats.load_stats(path)


def rare_filter(train_files, hash_bits, min_count, runs_dir, rank, say):
    """train_stats.RareFilter from the bucket counts of the train files (None when min_count is 0).
    The counts are cached beside the first train file (beside_train) with the fingerprints of
    the files they were counted on, and recounted when those changed."""
    if not min_count:
        return None
    if binary_cache.is_cache(train_files[0]):
        counts = binary_cache.cache_counts(train_files[0], hash_bits)
        return _announce(train_stats.RareFilter(counts, min_count, hash_bits), counts, say)
    path = beside_train(train_files, f".counts{hash_bits}.npz", runs_dir)
    if rank == 0:
        train_stats.cached_bucket_counts(path, train_files, hash_bits)
    if dist.is_initialized():
        dist.barrier()
    counts = train_stats.cached_bucket_counts(path, train_files, hash_bits)  # fresh: a read
    return _announce(train_stats.RareFilter(counts, min_count, hash_bits), counts, say)


def _announce(filt, counts, say):
    say(f"--min-count {filt.min_count}: {int(filt.keep.sum()):,} buckets with >= "
        f"{filt.min_count} rows keep their own row, {filt.share_kept(counts):.1%} of the train "
        "values; the rest go to their field's rare bucket")
    return filt


def train_source(cfg, stats, rare, device, say):
    """Where the training batches come from: the text loader (workers hand over 8 batches at
    a time and report their bad rows at the end of each pass), a binary cache folder read in
    blocks, or - with --preload device - the whole split resident in device memory (streamed
    there in chunks; what it needs is said before it starts)."""
    shuffle = cfg.shuffle_buffer > 0
    if cfg.preload == "device":
        source = cfg.train[0] if binary_cache.is_cache(cfg.train[0]) else cfg.train
        rows, on_device, on_host = binary_cache.preload_plan(source)
        say(f"--preload device: ~{rows:,} rows (this rank's) need ~{on_device / 2**20:,.0f} "
            f"MiB of {device} memory and ~{on_host / 2**20:,.0f} MiB of host memory while "
            f"loading ({binary_cache.CHUNK_ROWS:,} rows at a time)")
        return binary_cache.preload(source, cfg.batch_size, device, cfg.hash_bits, stats,
                                    rare, shuffle=shuffle, seed=cfg.seed)
    if binary_cache.is_cache(cfg.train[0]):
        return binary_cache.BinaryStream(cfg.train[0], cfg.batch_size, shuffle=shuffle,
                                         seed=cfg.seed, rare_filter=rare)
    return criteo.CriteoStream(cfg.train, cfg.batch_size, cfg.hash_bits, stats,
                               shuffle_buffer=cfg.shuffle_buffer, seed=cfg.seed,
                               group=8 if cfg.num_workers else 1, report=True,
                               rare_filter=rare)


def epoch_batches(stream, epoch, num_workers, batch_size, seed, device, reports):
    """The epoch's batches with whether each is the last one (a one-batch lookahead), so the
    loop can evaluate at the end of an epoch from one call site. The DataLoader gets its own
    generator: creating the iterator must not draw from the global RNG that dropout uses, or a
    resumed run would see other dropout masks than the original."""
    stream.set_epoch(epoch)
    if isinstance(stream, binary_cache.Preloaded):  # batches already on the device, no process
        it = iter(stream)
    else:  # pinned host memory: the copies to a GPU run asynchronously (non_blocking)
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=num_workers,
                                             pin_memory=device.type == "cuda",
                                             generator=torch.Generator().manual_seed(seed))
        it = criteo.iter_batches(loader, batch_size, reports)
    batch = next(it, None)
    while batch is not None:
        following = next(it, None)
        yield batch, following is None
        batch = following


# ------------------------------------------------------------------ model, devices
def setup_distributed(device_name):
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; one process = one rank, rank r of a machine on
    its GPU r. gloo on CPU, nccl on CUDA. More ranks on a machine than it has GPUs (or every
    rank on one cuda:N) is refused here, before the process group waits for them."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = common.resolve_device("auto" if device_name == "cuda" else device_name, local)
    if world > 1 and device.type == "cuda":
        per_machine = int(os.environ.get("LOCAL_WORLD_SIZE", local + 1))
        if device_name.startswith("cuda:"):
            raise TrainError(f"--device {device_name} with {world} DDP ranks: every rank would "
                             "use the same GPU; pass --device cuda (rank r takes GPU r)")
        if max(per_machine, local + 1) > torch.cuda.device_count():
            raise TrainError(f"torchrun started {per_machine} ranks on a machine with "
                             f"{torch.cuda.device_count()} CUDA device(s): use --nproc_per_node "
                             f"{torch.cuda.device_count()}, or --device cpu (gloo)")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    rank = dist.get_rank() if dist.is_initialized() else 0
    return rank, (dist.get_world_size() if dist.is_initialized() else 1), device


def sparse_tables(sparse_emb, device, world):
    """--sparse-emb -> whether the tables get sparse gradients (RowSparseAdam). auto: on a CPU,
    dense on a GPU. DDP all-reduces the gradients, and NCCL (CUDA) cannot all-reduce sparse
    ones: there auto is dense and on is refused (gloo, on the CPU, can)."""
    if sparse_emb == "on" and device.type == "cuda" and world > 1:
        raise TrainError("--sparse-emb on with DDP on CUDA: NCCL cannot all-reduce sparse "
                         "gradients; use --sparse-emb auto (dense tables there) or the CPU")
    return sparse_emb == "on" or (sparse_emb == "auto" and device.type == "cpu")


def build(cfg, device, sparse):
    """The model (sparse tables: sparse_tables), its optimizers and the module to train
    (compiled and/or DDP-wrapped)."""
    model = build_model(cfg.model, criteo_schema(cfg.hash_bits), emb_dim=cfg.emb_dim,
                        mlp=cfg.mlp, dropout=cfg.dropout, cross_layers=cfg.cross_layers,
                        sparse=sparse).to(device)
    optimizers = make_optimizers(model, cfg.lr, cfg.weight_decay, cfg.decoupled_wd,
                                 kind=cfg.optimizer)
    train_model = torch.compile(model) if cfg.compile else model
    if dist.is_initialized():
        train_model = torch.nn.parallel.DistributedDataParallel(
            train_model, device_ids=[device] if device.type == "cuda" else None)
    return model, optimizers, train_model


# ------------------------------------------------------- evaluation and checkpoints
def evaluate(model, stream, device, autocast=None):
    """AUC and LogLoss over a whole split (with DDP: each rank its shard, then gathered)."""
    p, y = predict(model, stream, device, autocast)
    if dist.is_initialized():
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (p, y))
        p = torch.cat([torch.from_numpy(g[0]) for g in gathered]).numpy()
        y = torch.cat([torch.from_numpy(g[1]) for g in gathered]).numpy()
    return common.auc_logloss(y, p)


def data_fingerprints(cfg):
    """{split: [train_stats.fingerprint of each file]}; a binary cache: its meta.json's."""
    out = {}
    for split, files in [("train", cfg.train), ("val", cfg.val), ("test", cfg.test)]:
        paths = [Path(files[0]) / "meta.json"] if binary_cache.is_cache(files) else files
        out[split] = [train_stats.fingerprint(p) for p in paths]
    return out


def eval_batches(cfg, world):
    """--evals-per-epoch N: the batch counts inside an epoch after which to validate (the epoch's
    end is validated anyway). The epoch's length is counted once from the train split (its rows
    / world / batch size, rounded up: exact for one process and one loader worker, about right
    otherwise - a point misses its fraction by a batch at most)."""
    if cfg.evals_per_epoch < 2:
        return set()
    if binary_cache.is_cache(cfg.train[0]):
        rows = json.loads((Path(cfg.train[0]) / "meta.json").read_text())["rows"]
    else:
        rows = criteo.scan(cfg.train)["rows"]
    n = math.ceil(rows / world / cfg.batch_size)
    return {round(k * n / cfg.evals_per_epoch) for k in range(1, cfg.evals_per_epoch)} - {0, n}


def reinit_at_epoch_start(cfg, epoch, batches_in_epoch, model, optimizers, say):
    """--reinit-emb: before the first batch of every epoch after the first (also after a resume
    from an epoch's end, where last.pt holds the tables of the epoch before)."""
    if cfg.reinit_emb and epoch > 0 and batches_in_epoch == 0:
        n = reset_embeddings(model, optimizers)
        say(f"epoch {epoch + 1}: {n} embedding table(s) drawn afresh, their optimizer state "
            "dropped (--reinit-emb)")


def best_epoch_of(history, best_step):
    """The (1-based) epoch in which the best validation step fell, None before any eval."""
    return next((h.get("epoch") for h in history if h["step"] == best_step), None)


# ------------------------------------------------------------------------------ the run
def train(cfg, resume=False, quiet=False):
    """One training run; returns the metrics dict that it writes to runs/<name>/metrics.json."""
    t_start = time.perf_counter()
    rank, world, device = setup_distributed(cfg.device)
    common.set_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    say = (lambda *a: None) if quiet or rank else tqdm.write

    # data: every input checked before the first step; statistics fitted on train only
    bad_rows, scans = check_inputs(cfg, say)
    sparse = sparse_tables(cfg.sparse_emb, device, world)
    run_dir = Path(cfg.runs_dir) / cfg.run_name
    common.check_writable(run_dir, "--runs-dir/--run-name")
    lock = RunLock(run_dir) if rank == 0 else None  # one live run per folder
    stats = dense_stats(cfg.stats, cfg.train, rank, say, cfg.runs_dir)
    rare = rare_filter(cfg.train, cfg.hash_bits, cfg.min_count, cfg.runs_dir, rank, say)
    train_stream = train_source(cfg, stats, rare, device, say)
    if isinstance(train_stream, binary_cache.Preloaded):  # rows skipped while loading it
        bad_rows["train"] = train_stream.bad_rows
        for line in criteo.describe_bad_rows(bad_rows["train"]):
            say(f"train: {line}")
    val_stream, test_stream = (criteo.CriteoStream(f, cfg.batch_size, cfg.hash_bits, stats,
                                                   rare_filter=rare) for f in (cfg.val, cfg.test))

    # model, optimizers, precision
    model, optimizers, train_model = build(cfg, device, sparse)
    autocast = autocast_for(device, amp_dtype(cfg.amp, device))
    if cfg.amp == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
        say("notice: --amp bf16 on a CPU without bf16 instructions (no avx512_bf16/amx_bf16): "
            "expect it to run several times slower than fp32 (results/stage2_precision.md)")
    step_fn = make_step(train_model, optimizers, autocast=autocast)
    evals_inside = eval_batches(cfg, world)

    # the run folder, and where to start: from scratch or from last.pt (--resume)
    train_data = data_fingerprints(cfg)["train"]
    if rank == 0:
        common.remove_stale_tmp(run_dir)  # half-written files of a killed run
    state = {"step": 0, "epoch": 0, "batches_in_epoch": 0, "best_auc": -1.0, "best_step": 0,
             "bad_evals": 0, "history": [], "samples": 0, "train_seconds": 0.0, "loss_sum": 0.0,
             "loss_n": 0}
    if resume and (run_dir / "last.pt").exists():
        state = load_last(run_dir / "last.pt", model, optimizers, device, cfg, sparse,
                          train_data)
        say(f"resumed from {run_dir / 'last.pt'} at step {state['step']}")
    elif resume:
        say(f"--resume: there is no {run_dir / 'last.pt'}; starting from scratch")
    say(f"{cfg.model}: {sum(p.numel() for p in model.parameters()):,} parameters | device "
        f"{device} | world {world} | sparse tables {sparse} | batch {cfg.batch_size} | "
        f"hash 2^{cfg.hash_bits} | {'bf16 autocast' if autocast else 'fp32'} | train from "
        f"{type(train_stream).__name__}")
    # the loop's state in plain locals; last.pt saves them, --resume restores them
    step, epoch, batches_in_epoch = state["step"], state["epoch"], state["batches_in_epoch"]
    best_auc, best_step, bad_evals = state["best_auc"], state["best_step"], state["bad_evals"]
    history, samples, train_seconds = state["history"], state["samples"], state["train_seconds"]
    # the train loss summed since the last evaluation, kept on the device (no sync per step)
    loss_sum = torch.tensor(state["loss_sum"], dtype=torch.float64, device=device)
    loss_n = state["loss_n"]

    if world > 1:
        say("DDP: every rank takes the same number of steps per epoch, the shortest shard's "
            "(agreed by an all-reduce each step); a longer shard's extra batches sit that "
            "epoch out")

    def interrupted(*_):  # Ctrl-C: one line with the step reached (a closure: the current step)
        raise TrainError(f"interrupted at step {step}; " + (
            "resume with --resume" if (run_dir / "last.pt").exists() else
            "no last.pt to resume from (--ckpt-every N writes one)"))
    previous_handler = signal.signal(signal.SIGINT, interrupted)
    bar = tqdm(total=cfg.max_steps or None, initial=step, unit=" step", disable=quiet or rank != 0)
    stop = False
    while epoch < cfg.epochs and not stop:
        t0, reports = time.perf_counter(), []
        batches = epoch_batches(train_stream, epoch, cfg.num_workers, cfg.batch_size, cfg.seed,
                                device, reports)
        if world > 1:
            batches = in_step_with_other_ranks(batches, world, first=step == 0)
        reinit_at_epoch_start(cfg, epoch, batches_in_epoch, model, optimizers, say)
        for i, ((dense, sparse_ids, label), last) in enumerate(batches):
            if i < batches_in_epoch:  # resume: the stream is deterministic, skip what ran
                if last:
                    raise TrainError(f"--resume: the epoch has {i + 1} batches now, last.pt "
                                     f"was at batch {batches_in_epoch}: start a new --run-name")
                continue
            # one step; the loss stays on the device
            loss = step_fn(dense.to(device, non_blocking=True),
                           sparse_ids.to(device, non_blocking=True),
                           label.to(device, non_blocking=True))
            loss_sum, loss_n = loss_sum + loss, loss_n + 1
            step, batches_in_epoch, samples = step + 1, i + 1, samples + len(label)
            bar.update(1)
            if step % 50 == 0:  # the progress bar: the only read between evaluations
                seconds = train_seconds + time.perf_counter() - t0
                bar.set_postfix(loss=f"{loss_sum.item() / loss_n:.4f}",
                                samples_s=f"{samples / seconds:,.0f}")  # this rank's
            if last:  # the epoch is over: its bad rows, counted by the text loader's workers
                epoch, batches_in_epoch = epoch + 1, 0
                if isinstance(train_stream, criteo.CriteoStream):
                    bad_rows["train"] = criteo.merge_reports(reports)
                    for line in criteo.describe_bad_rows(bad_rows["train"]):
                        say(f"train, epoch {epoch}: {line}")
            # evaluate (and keep the best model): every eval_every steps, at each epoch end,
            # at max_steps; stop when val AUC has not improved for `patience` evaluations
            at_max = cfg.max_steps and step >= cfg.max_steps
            if last or at_max or (cfg.eval_every and step % cfg.eval_every == 0) or (
                    batches_in_epoch in evals_inside):
                train_seconds += time.perf_counter() - t0
                val = evaluate(model, val_stream, device, autocast)
                train_loss = loss_sum.item() / max(loss_n, 1)
                history.append({"step": step, "train_loss": train_loss, "val_auc": val["auc"],
                                "val_logloss": val["logloss"], "epoch": epoch + (not last),
                                "epoch_end": bool(last)})
                if val["auc"] > best_auc:
                    best_auc, best_step, bad_evals = val["auc"], step, 0
                    if rank == 0:
                        common.torch_save(model.state_dict(), run_dir / "best.pt")
                else:
                    bad_evals += 1
                say(f"step {step}: train logloss {train_loss:.4f} | val AUC {val['auc']:.4f} "
                    f"logloss {val['logloss']:.4f}")
                stop = bad_evals >= cfg.patience or bool(at_max)
                loss_sum.zero_()
                loss_n, t0 = 0, time.perf_counter()
            # checkpoint: every ckpt_every steps and at each epoch end
            if rank == 0 and cfg.ckpt_every and (last or step % cfg.ckpt_every == 0):
                state = {"step": step, "epoch": epoch, "batches_in_epoch": batches_in_epoch,
                         "best_auc": best_auc, "best_step": best_step, "bad_evals": bad_evals,
                         "history": history, "samples": samples,
                         "train_seconds": train_seconds, "loss_sum": loss_sum.item(),
                         "loss_n": loss_n}
                save_last(run_dir / "last.pt", model, optimizers, state, cfg, device, sparse,
                          train_data)
            if stop:
                break
    bar.close()
    signal.signal(signal.SIGINT, previous_handler)
    if dist.is_initialized():  # every rank's own rows: the run's samples
        samples = int(sum(all_ranks(samples)))

    # test the best checkpoint; metrics.json, curves.png and the report
    if (run_dir / "best.pt").exists():
        model.load_state_dict(torch.load(run_dir / "best.pt", weights_only=True,
                                         map_location=device))
    splits = {"val": evaluate(model, val_stream, device, autocast),
              "test": evaluate(model, test_stream, device, autocast)}
    for name, files in [("val", cfg.val), ("test", cfg.test)]:
        oracle = train_stats.oracle_scores(files, scans[name])
        if oracle:
            splits[name].update(oracle=oracle, auc_gap_to_oracle=oracle["auc"] -
                                splits[name]["auc"], logloss_gap_to_oracle=splits[name][
                                "logloss"] - oracle["logloss"])
    metrics = {"script": "stage2_ctr/train_ctr.py", "model": cfg.model,
               "dataset": Path(cfg.train[0]).parent.name, "device": str(device),
               "seed": cfg.seed, "world_size": world, "config": asdict(cfg), "splits": splits,
               "precision": "bf16" if autocast else "fp32",  # what --amp resolved to here
               "best_step": best_step, "best_epoch": best_epoch_of(history, best_step),
               "steps": step, "history": history, "bad_rows": bad_rows,
               "parameters": sum(p.numel() for p in model.parameters()),
               "train_samples": samples,  # all ranks' rows
               "train_samples_per_s": samples / max(train_seconds, 1e-9),
               "peak_rss_mb": common.peak_rss_mb(),
               "peak_gpu_mb": (torch.cuda.max_memory_allocated(device) / 2**20
                               if device.type == "cuda" else None),
               "wall_s": time.perf_counter() - t_start,
               # what the numbers were measured on: a reader of this file (03's reuse of
               # finished runs) can tell a regenerated data set from the one trained on
               "data": data_fingerprints(cfg)}
    if rank == 0:
        common.write_json(run_dir / "metrics.json", metrics)
        if history:
            plot_curves(history, run_dir / "curves.png")
        if not quiet:
            report(metrics, run_dir)
        lock.release()
    if dist.is_initialized():
        dist.barrier()  # no rank tears the group down while another still reports
        dist.destroy_process_group()
    return metrics


# ------------------------------------------------------------------------------------ report
def plot_curves(history, path):
    plt = common.pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    steps = [h["step"] for h in history]
    ax1.plot(steps, [h["train_loss"] for h in history])
    ax1.set(xlabel="step", ylabel="train logloss (since last eval)", title="training")
    ax2.plot(steps, [h["val_auc"] for h in history], marker="o")
    ax2.set(xlabel="step", ylabel="val AUC", title="validation")
    fig.tight_layout()
    common.save_figure(fig, path, dpi=90)


def report(m, run_dir):
    epochs_run = max((h.get("epoch", 0) for h in m["history"]), default=0)
    print(f"{m['model']}: {m['steps']} steps, best at step {m['best_step']} (epoch "
          f"{m['best_epoch']} of the {epochs_run} run), "
          f"{m['train_samples_per_s']:,.0f} train samples/s, peak RSS {m['peak_rss_mb']:,.0f} MB")
    print(f"{'split':<6}{'AUC':>8}{'logloss':>9}{'oracle AUC':>12}{'gap':>8}")
    for name, s in m["splits"].items():
        o = s.get("oracle")
        print(f"{name:<6}{s['auc']:>8.4f}{s['logloss']:>9.4f}"
              + (f"{o['auc']:>12.4f}{s['auc_gap_to_oracle']:>8.4f}" if o else ""))
    written = [n for n in ["metrics.json", "curves.png", "best.pt", "last.pt"]
               if (run_dir / n).exists()]
    print(f"wrote {run_dir}/{{{', '.join(written)}}}")


def main(argv=None):
    cfg, resume, quiet = parse_args(argv)
    handler = signal.getsignal(signal.SIGINT)
    try:
        return train(cfg, resume, quiet)
    except (criteo.CriteoFormatError, TrainError, common.OutputError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("error: interrupted (Ctrl-C) before the first step; nothing to resume")
    finally:
        signal.signal(signal.SIGINT, handler)


if __name__ == "__main__":
    main()
