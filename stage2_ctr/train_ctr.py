"""Stage 2, step 3: train one CTR model (LR, FM, DNN, DeepFM, DCN, DCN-v2) on Criteo-format data.

What you learn here: the whole CTR training loop by hand - a streaming loader feeding hashed ids,
one 2^20-row embedding table trained with sparse gradients (RowSparseAdam, models/optim.py,
touches only the rows of the batch), LogLoss + AUC on validation, early stopping, checkpoints you can resume from, and
DDP across processes with the same script (torchrun). On synthetic data the oracle's scores are
printed next to the model's, so you see how far from the best possible each model is.

Run:    python stage2_ctr/train_ctr.py --model deepfm
        python stage2_ctr/train_ctr.py --model dcn --cross-layers 3 --epochs 2 --device cuda --amp
        torchrun --nproc_per_node 2 stage2_ctr/train_ctr.py --model deepfm     # DDP (gloo on CPU)
        torchrun --nnodes 2 --node_rank R --master_addr HOST --master_port 29500 \\
                 --nproc_per_node 8 stage2_ctr/train_ctr.py ...                 # several machines
Reads:  --train/--val/--test (default: stage2_ctr/data/synthetic/*.txt from 01_make_subset.py)
Writes: runs/<name>/metrics.json, curves.png, best.pt (best on val), last.pt (for --resume)
"""
import argparse
import importlib.util
import json
import os
import resource
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from sklearn.metrics import log_loss, roc_auc_score
from tqdm import tqdm

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from models import MODELS, build_model  # noqa: E402
from models.optim import RowSparseAdam  # noqa: E402

DATA = HERE / "data" / "synthetic"


def load_loader_module():
    """02_dataloader.py starts with a digit: load it by path."""
    spec = importlib.util.spec_from_file_location("criteo_loader", HERE / "02_dataloader.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["criteo_loader"] = module
    spec.loader.exec_module(module)
    return module


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=list(MODELS), default="deepfm")
    p.add_argument("--train", nargs="+", default=[str(DATA / "train.txt")])
    p.add_argument("--val", nargs="+", default=[str(DATA / "val.txt")])
    p.add_argument("--test", nargs="+", default=[str(DATA / "test.txt")])
    p.add_argument("--stats", default=None,
                   help="dense statistics JSON (default <train>.stats.json, fitted if missing)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: no)")
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--emb-dim", type=int, default=16)
    p.add_argument("--hash-bits", type=int, default=20)
    p.add_argument("--mlp", default="400,400,400", help="hidden sizes of the MLP")
    p.add_argument("--cross-layers", type=int, default=3)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--weight-decay", type=float, default=0.0, help="dense parameters only")
    p.add_argument("--sparse-emb", choices=["auto", "on", "off"], default="auto",
                   help="sparse gradients + RowSparseAdam for the tables (auto: on for CPU)")
    p.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--num-workers", type=int, default=1, help="loader worker processes")
    p.add_argument("--shuffle-buffer", type=int, default=0, help="rows shuffled together")
    p.add_argument("--eval-every", type=int, default=0, help="validate every N steps (0: epoch)")
    p.add_argument("--patience", type=int, default=2, help="evaluations without val AUC gain")
    p.add_argument("--ckpt-every", type=int, default=0, help="write last.pt every N steps")
    p.add_argument("--resume", action="store_true", help="continue from runs/<name>/last.pt")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--run-name", default=None)
    p.add_argument("--runs-dir", default=str(ROOT / "runs"))
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    for name in ["epochs", "batch_size", "emb_dim"]:
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if not 1 <= args.hash_bits <= 30:
        p.error("--hash-bits must be in [1, 30]")
    if args.lr <= 0 or args.dropout < 0 or args.dropout >= 1 or args.cross_layers < 0:
        p.error("--lr must be > 0, --dropout in [0, 1), --cross-layers >= 0")
    try:
        args.mlp_sizes = [int(h) for h in args.mlp.split(",") if h]
    except ValueError:
        p.error("--mlp is a comma-separated list of layer sizes, e.g. 400,400,400")
    args.run_name = args.run_name or f"ctr_{args.model}_s{args.seed}"
    return args


# --------------------------------------------------------------------------------- set-up
def setup_distributed(args):
    """torchrun sets RANK/WORLD_SIZE; one process = one rank. gloo on CPU, nccl on CUDA."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if args.device.startswith("cuda") or (
            args.device == "auto" and torch.cuda.is_available()) else "gloo"
        dist.init_process_group(backend)
    rank = dist.get_rank() if dist.is_initialized() else 0
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if args.device == "auto":
        device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return rank, (dist.get_world_size() if dist.is_initialized() else 1), device


def dense_stats(args, loader_mod, rank):
    path = Path(args.stats or str(args.train[0]) + ".stats.json")
    if rank == 0 and not path.exists():
        loader_mod.write_json_atomic(path, loader_mod.fit_stats(args.train, 1_000_000))
    if dist.is_initialized():
        dist.barrier()
    return json.loads(path.read_text())


def make_stream(loader_mod, files, args, stats, shuffle, group=1):
    return loader_mod.CriteoStream(files, args.batch_size, args.hash_bits, stats,
                                   shuffle_buffer=args.shuffle_buffer if shuffle else 0,
                                   seed=args.seed, verbose=False, group=group)


def make_optimizers(model, args, sparse):
    """Tables with sparse gradients -> RowSparseAdam (only the rows in the batch move; the same
    update as torch.optim.SparseAdam without its sort: see models/optim.py); everything else ->
    Adam with weight decay, fused (one kernel for all tensors instead of a loop over them)."""
    tables = [m.weight for m in model.modules()
              if isinstance(m, torch.nn.Embedding) and m.sparse]
    table_ids = {id(t) for t in tables}
    rest = [p for p in model.parameters() if id(p) not in table_ids]
    fused = all(p.device.type in ("cpu", "cuda") for p in rest) or None
    opts = [torch.optim.Adam(rest, lr=args.lr, weight_decay=args.weight_decay, fused=fused)]
    if sparse and tables:
        opts.append(RowSparseAdam(tables, lr=args.lr))
    return opts


# ------------------------------------------------------------------------------ evaluate
@torch.no_grad()
def evaluate(model, loader_mod, files, args, stats, device):
    """Predict a whole split (each rank its shard, then gathered) -> AUC and LogLoss."""
    model.eval()
    probs, labels = [], []
    for dense, sparse, label in make_stream(loader_mod, files, args, stats, shuffle=False):
        logits = model(dense.to(device), sparse.to(device))
        probs.append(torch.sigmoid(logits.float()).cpu().numpy())
        labels.append(label.numpy())
    p = np.concatenate(probs) if probs else np.zeros(0, np.float32)
    y = np.concatenate(labels) if labels else np.zeros(0, np.float32)
    if dist.is_initialized():
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (p, y))
        p = np.concatenate([g[0] for g in gathered])
        y = np.concatenate([g[1] for g in gathered])
    model.train()
    p = np.clip(p, 1e-7, 1 - 1e-7)
    return {"auc": float(roc_auc_score(y, p)), "logloss": float(log_loss(y, p, labels=[0, 1])),
            "rows": int(len(y))}


def oracle_scores(files):
    """On synthetic data 01_make_subset.py wrote the oracle's scores into meta.json."""
    meta_path = Path(files[0]).parent / "meta.json"
    split = Path(files[0]).name.split(".")[0]
    if len(files) != 1 or not meta_path.exists():
        return None
    r = json.loads(meta_path.read_text()).get("splits", {}).get(split, {})
    if "oracle_auc" not in r:
        return None
    return {"auc": r["oracle_auc"][0], "logloss": r["oracle_logloss"][0]}


# -------------------------------------------------------------------------------- helpers
def atomic_save(obj, path):
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(path, text):
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600 files
    os.replace(tmp, path)


def plot_curves(history, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    steps = [h["step"] for h in history]
    ax1.plot(steps, [h["train_loss"] for h in history])
    ax1.set(xlabel="step", ylabel="train logloss (since last eval)", title="training")
    ax2.plot(steps, [h["val_auc"] for h in history], marker="o")
    ax2.set(xlabel="step", ylabel="val AUC", title="validation")
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(dir=Path(path).parent, suffix=".png")
    os.close(fd)
    fig.savefig(tmp, dpi=90)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600 files
    os.replace(tmp, path)
    plt.close(fig)


def peak_memory_mb(device):
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    gpu = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return rss, gpu


# ----------------------------------------------------------------------------------- main
def run(argv=None):
    args = parse_args(argv)
    t_start = time.perf_counter()
    rank, world, device = setup_distributed(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    loader_mod = load_loader_module()
    try:
        stats = dense_stats(args, loader_mod, rank)
        # worker processes hand over 8 batches at a time (see 02_dataloader.iter_batches)
        train_stream = make_stream(loader_mod, args.train, args, stats, shuffle=True,
                                   group=8 if args.num_workers else 1)
        make_stream(loader_mod, args.val, args, stats, shuffle=False)  # checks the paths
    except loader_mod.CriteoFormatError as e:
        sys.exit(f"error: {e}")
    sparse = args.sparse_emb == "on" or (args.sparse_emb == "auto" and device.type == "cpu")
    model = build_model(args.model, 2 ** args.hash_bits, emb_dim=args.emb_dim,
                        mlp=args.mlp_sizes, dropout=args.dropout,
                        cross_layers=args.cross_layers, sparse=sparse).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    optimizers = make_optimizers(model, args, sparse)
    train_model = model
    if args.compile:
        train_model = torch.compile(model)
    if dist.is_initialized():
        train_model = torch.nn.parallel.DistributedDataParallel(
            train_model, device_ids=[device] if device.type == "cuda" else None)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if args.amp and
                device.type == "cuda" else nullcontext())
    run_dir = Path(args.runs_dir) / args.run_name
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)

    # state that a checkpoint carries -----------------------------------------------------
    state = {"step": 0, "epoch": 0, "batches_in_epoch": 0, "best_auc": -1.0, "best_step": 0,
             "bad_evals": 0, "history": [], "samples": 0, "train_seconds": 0.0}
    if args.resume and (run_dir / "last.pt").exists():
        ckpt = torch.load(run_dir / "last.pt", weights_only=True, map_location=device)
        model.load_state_dict(ckpt["model"])
        for opt, sd in zip(optimizers, ckpt["optimizers"]):
            opt.load_state_dict(sd)
        state = ckpt["state"]
        torch.set_rng_state(ckpt["rng"])
        if rank == 0 and not args.quiet:
            print(f"resumed from {run_dir / 'last.pt'} at step {state['step']}")

    def save_last():
        if rank == 0:
            atomic_save({"model": model.state_dict(), "state": state, "rng": torch.get_rng_state(),
                         "optimizers": [o.state_dict() for o in optimizers],
                         "config": vars(args)}, run_dir / "last.pt")

    if rank == 0 and not args.quiet:
        print(f"{args.model}: {n_params:,} parameters | device {device} | world {world} | "
              f"sparse tables {sparse} | batch {args.batch_size} | hash 2^{args.hash_bits}")

    # the loop ---------------------------------------------------------------------------
    stop, loss_sum, loss_n = False, 0.0, 0
    bar = tqdm(total=args.max_steps or None, initial=state["step"], unit=" step",
               disable=args.quiet or rank != 0)
    while state["epoch"] < args.epochs and not stop:
        train_stream.set_epoch(state["epoch"])
        # its own generator: creating the iterator must not draw from the global RNG that
        # dropout uses, or a resumed run would see other dropout masks than the original
        loader = torch.utils.data.DataLoader(train_stream, batch_size=None,
                                             num_workers=args.num_workers,
                                             pin_memory=device.type == "cuda",
                                             generator=torch.Generator().manual_seed(args.seed))
        skip = state["batches_in_epoch"]  # resume: the stream is deterministic, skip what ran
        t0 = time.perf_counter()
        for i, (dense, sparse_ids, label) in enumerate(
                loader_mod.iter_batches(loader, args.batch_size)):
            if i < skip:
                continue
            dense = dense.to(device, non_blocking=True)
            sparse_ids = sparse_ids.to(device, non_blocking=True)
            label = label.to(device, non_blocking=True)
            with autocast:
                logits = train_model(dense, sparse_ids)
            loss = F.binary_cross_entropy_with_logits(logits.float(), label)
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            loss.backward()
            for opt in optimizers:
                opt.step()
            state["step"] += 1
            state["batches_in_epoch"] = i + 1
            state["samples"] += len(label) * world
            loss_sum, loss_n = loss_sum + loss.item(), loss_n + 1
            bar.update(1)
            if state["step"] % 20 == 0:
                elapsed = state["train_seconds"] + time.perf_counter() - t0
                bar.set_postfix(loss=f"{loss_sum / loss_n:.4f}",
                                samples_s=f"{state['samples'] / elapsed:,.0f}")
            at_max = args.max_steps and state["step"] >= args.max_steps
            if (args.eval_every and state["step"] % args.eval_every == 0) or at_max:
                state["train_seconds"] += time.perf_counter() - t0
                stop = validate(model, loader_mod, args, stats, device, state, run_dir, rank,
                                loss_sum / max(loss_n, 1))
                loss_sum, loss_n, t0 = 0.0, 0, time.perf_counter()
            if args.ckpt_every and state["step"] % args.ckpt_every == 0:
                save_last()
            if stop or at_max:
                stop = True
                break
        else:  # the epoch ended
            state["train_seconds"] += time.perf_counter() - t0
            state["epoch"] += 1
            state["batches_in_epoch"] = 0
            if not args.eval_every or state["step"] % args.eval_every:
                stop = validate(model, loader_mod, args, stats, device, state, run_dir, rank,
                                loss_sum / max(loss_n, 1))
                loss_sum, loss_n = 0.0, 0
            if args.ckpt_every:
                save_last()
    bar.close()

    # test with the best checkpoint -------------------------------------------------------
    if (run_dir / "best.pt").exists():
        model.load_state_dict(torch.load(run_dir / "best.pt", weights_only=True,
                                         map_location=device))
    splits = {"val": evaluate(model, loader_mod, args.val, args, stats, device),
              "test": evaluate(model, loader_mod, args.test, args, stats, device)}
    for name, files in [("val", args.val), ("test", args.test)]:
        oracle = oracle_scores(files)
        if oracle:
            splits[name]["oracle"] = oracle
            splits[name]["auc_gap_to_oracle"] = oracle["auc"] - splits[name]["auc"]
            splits[name]["logloss_gap_to_oracle"] = splits[name]["logloss"] - oracle["logloss"]
    rss, gpu = peak_memory_mb(device)
    metrics = {"script": "stage2_ctr/train_ctr.py", "model": args.model,
               "dataset": str(Path(args.train[0]).parent.name), "device": str(device),
               "seed": args.seed, "world_size": world,
               "config": {k: v for k, v in vars(args).items() if k != "mlp_sizes"},
               "splits": splits, "best_step": state["best_step"], "steps": state["step"],
               "history": state["history"], "parameters": n_params,
               "train_samples_per_s": state["samples"] / max(state["train_seconds"], 1e-9),
               "peak_rss_mb": rss, "peak_gpu_mb": gpu,
               "wall_s": time.perf_counter() - t_start}
    if rank == 0:
        atomic_write_text(run_dir / "metrics.json", json.dumps(metrics, indent=1))
        if state["history"]:
            plot_curves(state["history"], run_dir / "curves.png")
        if not args.quiet:
            report(metrics, run_dir)
    if dist.is_initialized():
        dist.destroy_process_group()
    return metrics


def validate(model, loader_mod, args, stats, device, state, run_dir, rank, train_loss):
    """Val AUC; keep best.pt; return True when patience runs out (early stop)."""
    val = evaluate(model, loader_mod, args.val, args, stats, device)
    state["history"].append({"step": state["step"], "train_loss": train_loss,
                             "val_auc": val["auc"], "val_logloss": val["logloss"]})
    if val["auc"] > state["best_auc"]:
        state.update(best_auc=val["auc"], best_step=state["step"], bad_evals=0)
        if rank == 0:
            atomic_save(model.state_dict(), run_dir / "best.pt")
    else:
        state["bad_evals"] += 1
    if rank == 0 and not args.quiet:
        tqdm.write(f"step {state['step']}: train logloss {train_loss:.4f} | val AUC "
                   f"{val['auc']:.4f} logloss {val['logloss']:.4f}")
    return state["bad_evals"] >= args.patience


def report(m, run_dir):
    print(f"{m['model']}: {m['steps']} steps, best at {m['best_step']}, "
          f"{m['train_samples_per_s']:,.0f} train samples/s, peak RSS {m['peak_rss_mb']:,.0f} MB")
    print(f"{'split':<6}{'AUC':>8}{'logloss':>9}{'oracle AUC':>12}{'gap':>8}")
    for name, s in m["splits"].items():
        o = s.get("oracle")
        print(f"{name:<6}{s['auc']:>8.4f}{s['logloss']:>9.4f}"
              + (f"{o['auc']:>12.4f}{s['auc_gap_to_oracle']:>8.4f}" if o else ""))
    print(f"wrote {run_dir}/metrics.json, curves.png, best.pt")


if __name__ == "__main__":
    run()
