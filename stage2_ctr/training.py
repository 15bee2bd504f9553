"""A CTR training step, written once: the optimizers (one rule for Stage 2 and Stage 3), the step
itself (with micro-batches for large batches) and prediction over a stream of batches; then the
bookkeeping of a run around it (train_ctr.py): inputs checked before training, the dense
statistics, evaluation (gathered over DDP ranks), checkpoints that refuse a foreign config.

train_ctr.py's loop, the throughput benchmarks (04_bench_throughput.py, Stage 3's
05_throughput.py) and Stage 3's in-memory loop (stage3_common.fit) all build their optimizers
here, so "Stage 2's DeepFM" is trained the same way wherever it appears.
"""
import json
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import common
from stage2_ctr import criteo
from stage2_ctr.models.optim import RowSparseAdam

# what may change between a run and its --resume (everything else must be equal)
RESUMABLE = {"epochs", "max_steps", "patience", "eval_every", "ckpt_every", "threads", "runs_dir"}


class TrainError(ValueError):
    """A run that cannot start or continue: the message is one line saying why and what to do."""




def make_optimizers(model, lr, weight_decay=0.0, decoupled=True):
    """The one optimizer rule of this project:
      - embedding tables built with sparse=True -> RowSparseAdam (lazy Adam: only the rows of
        the batch move; models/optim.py). No weight decay there: a row would decay only on
        the steps that see it.
      - everything else (MLP, cross layers, dense-field vectors, tables without sparse
        gradients) -> AdamW, fused (one kernel for all tensors instead of a loop over them).
    decoupled=False swaps AdamW for Adam with L2 in the gradient (weight_decay * w added to
    the gradient, then scaled by Adam's 1/sqrt(v): the decay a parameter gets depends on its
    gradient history). Both are the same when weight_decay = 0, the CTR default; the README
    of Stage 2 has the validation comparison that picked AdamW."""
    tables = [m.weight for m in model.modules() if isinstance(m, nn.Embedding) and m.sparse]
    table_ids = {id(t) for t in tables}
    rest = [p for p in model.parameters() if id(p) not in table_ids]
    fused = all(p.device.type in ("cpu", "cuda") for p in rest) or None
    dense_opt = torch.optim.AdamW if decoupled else torch.optim.Adam
    opts = [dense_opt(rest, lr=lr, weight_decay=weight_decay, fused=fused)] if rest else []
    if tables:
        opts.append(RowSparseAdam(tables, lr=lr))
    return opts


def make_step(model, optimizers, micro_batch=0, autocast=None):
    """step(dense, sparse, label) -> the batch's mean BCE (a detached tensor on the device: no
    host sync; read it with .item() only when you report it).

    With micro_batch > 0 a larger batch goes through forward and backward in slices of
    micro_batch rows (gradient accumulation): activation memory is that of one slice. Each
    slice's loss is its summed BCE / batch rows, so the gradients add up to the whole batch's
    mean-loss gradient - the same update, except that BatchNorm normalizes each slice by its
    own statistics ("ghost" batch norm). The slices' sparse embedding gradients are set aside
    and concatenated once (RowSparseAdam sums repeated rows anyway): letting autograd add them
    up re-sorts the growing sum at every slice, which cost LR 4x its samples/s at batch 32768
    in slices of 2048. `autocast`: a context manager factory (e.g. bf16 autocast) or None."""
    def forward_loss(dense, sparse, label, reduction):
        if autocast is None:
            logits = model(dense, sparse)
        else:
            with autocast():
                logits = model(dense, sparse)
        return F.binary_cross_entropy_with_logits(logits.float(), label, reduction=reduction)

    def step(dense, sparse, label):
        for o in optimizers:
            o.zero_grad(set_to_none=True)
        n = len(label)
        if not 0 < micro_batch < n:  # one pass over the whole batch
            loss = forward_loss(dense, sparse, label, "mean")
            loss.backward()
        else:
            loss, sparse_grads = 0.0, {}
            for i in range(0, n, micro_batch):
                s = slice(i, i + micro_batch)
                part = forward_loss(dense[s], sparse[s], label[s], "sum") / n
                part.backward()
                loss = loss + part.detach()
                for p in model.parameters():
                    if p.grad is not None and p.grad.is_sparse:
                        sparse_grads.setdefault(p, []).append(p.grad)
                        p.grad = None
            for p, grads in sparse_grads.items():
                p.grad = torch.sparse_coo_tensor(
                    torch.cat([g._indices() for g in grads], dim=1),
                    torch.cat([g._values() for g in grads]), grads[0].shape,
                    check_invariants=False)
        for o in optimizers:
            o.step()
        return loss.detach()
    return step


@torch.no_grad()
def predict(model, batches, device, autocast=None):
    """Probabilities and labels of every batch, collected on the device and copied to the host
    once (a .cpu() per batch would wait for the device every batch)."""
    was_training = model.training
    model.eval()
    probs, labels = [], []
    for dense, sparse, label in batches:
        dense, sparse = dense.to(device, non_blocking=True), sparse.to(device, non_blocking=True)
        if autocast is None:
            logits = model(dense, sparse)
        else:
            with autocast():
                logits = model(dense, sparse)
        probs.append(torch.sigmoid(logits.float()))
        labels.append(label)
    model.train(was_training)
    if not probs:
        return torch.zeros(0).numpy(), torch.zeros(0).numpy()
    return torch.cat(probs).cpu().numpy(), torch.cat(labels).numpy()


# ------------------------------------------------------------------- around the loop
def check_inputs(cfg, say):
    """Before any training step: every file readable, no file in two splits, the train files'
    first rows parse, val and test read whole (rows, bad rows, both classes present - AUC needs
    both). Returns the bad-row counts of val and test."""
    where = {}
    for split, files in [("train", cfg.train), ("val", cfg.val), ("test", cfg.test)]:
        for path in criteo.check_paths(files):
            other = where.setdefault(path.resolve(), split)
            if other != split:
                raise TrainError(f"{path}: is in --{other} and in --{split}; a model scored on "
                                 "rows it trained on (or tuned on) says nothing - split it first")
    if criteo.scan(cfg.train, stop_after=1)["rows"] == 0:
        raise TrainError(f"{cfg.train[0]}: no data rows (blank lines only?)")
    bad_rows = {}
    for split, files in [("val", cfg.val), ("test", cfg.test)]:
        s = criteo.scan(files)
        if s["rows"] == 0 or s["positives"][0] in (0, s["rows"]):
            raise TrainError(f"{files[0]}: --{split} has {s['rows']:,} rows and "
                             f"{s['positives'][0]:,.0f} positives; AUC needs both classes")
        bad_rows[split] = s["files"]
        for line in criteo.describe_bad_rows(s["files"]):
            say(f"{split}: {line}")
    return bad_rows


def dense_stats(stats_path, train_files, rank, say):
    """The train split's dense statistics. Given with --stats: read and checked against the
    train files (stale or broken: an error). Else <train>.stats.json, fitted by rank 0 when
    missing, broken or fitted on another version of the train file (with a notice)."""
    if stats_path:
        if not Path(stats_path).is_file():
            raise TrainError(f"--stats {stats_path}: not found; leave --stats out to fit them "
                             f"from the train file, or make it with python stage2_ctr/"
                             f"02_dataloader.py --fit-stats {train_files[0]}")
        return criteo.load_stats(stats_path, train_files)
    path = Path(str(train_files[0]) + ".stats.json")
    if rank == 0:
        try:
            criteo.load_stats(path, train_files) if path.exists() else None
        except criteo.CriteoFormatError as e:
            say(f"{e}: fitting them again")
            path.unlink()
        if not path.exists():
            common.write_json(path, criteo.fit_stats(train_files, 1_000_000))
    if dist.is_initialized():
        dist.barrier()
    return criteo.load_stats(path)


def evaluate(model, stream, device):
    """AUC and LogLoss over a whole split (with DDP: each rank its shard, then gathered)."""
    p, y = predict(model, stream, device)
    if dist.is_initialized():
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (p, y))
        p = torch.cat([torch.from_numpy(g[0]) for g in gathered]).numpy()
        y = torch.cat([torch.from_numpy(g[1]) for g in gathered]).numpy()
    return common.auc_logloss(y, p)


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


def save_last(path, model, optimizers, state, cfg):
    common.torch_save({"model": model.state_dict(), "state": state,
                       "rng": torch.get_rng_state(), "config": asdict(cfg),
                       "optimizers": [o.state_dict() for o in optimizers]}, path)


def load_last(path, model, optimizers, device, cfg):
    """The state of an interrupted run, after checking that last.pt is whole and was written
    with this config (what may differ: RESUMABLE)."""
    try:
        ckpt = torch.load(path, weights_only=True, map_location=device)
        saved = json.loads(json.dumps(ckpt["config"]))
    except Exception as e:  # a truncated file fails inside torch/zip with varying types
        raise TrainError(f"{path}: truncated or not a checkpoint of this trainer "
                         f"({type(e).__name__}); delete it to start over") from None
    now = json.loads(json.dumps(asdict(cfg)))
    differ = [k for k in now if k not in RESUMABLE and saved.get(k) != now[k]]
    if differ:
        raise TrainError(f"--resume: {path} was written with " + ", ".join(
            f"{k}={saved.get(k)!r} (now {now[k]!r})" for k in differ)
            + "; resume with the same settings, or start a new --run-name")
    model.load_state_dict(ckpt["model"])
    for opt, sd in zip(optimizers, ckpt["optimizers"]):
        opt.load_state_dict(sd)
    torch.set_rng_state(ckpt["rng"])
    return ckpt["state"]
