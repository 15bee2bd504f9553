"""What makes a training run safe to stop and continue: the lock on its folder (two runs under
one --run-name would mix their files) and last.pt, the checkpoint --resume continues from (the
model, the optimizers, both RNG states, the loop's counters, and what the run was trained on:
its config, the train files' fingerprints, the table kind the device chose), and, under DDP,
the ranks kept in step (a rank that stops early would leave the others waiting forever). Read it
with stage2_ctr/train_ctr.py, which writes and reads these at its one checkpoint site.
"""
import fcntl
import json
import os
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

import common

# what may change between a run and its --resume (everything else must be equal)
# (sparse_emb may: the table kind it resolved to is compared instead - auto is sparse on a CPU
# and dense on a GPU, so a run moved between them resumes with --sparse-emb on or off)
RESUMABLE = {"epochs", "max_steps", "patience", "eval_every", "ckpt_every", "threads", "runs_dir",
             "sparse_emb"}


class TrainError(ValueError):
    """A run that cannot start or continue: the message is one line saying why and what to do."""


class RunLock:
    """An exclusive fcntl lock on <run folder>/.lock for the life of the process: a second run
    with the same --run-name (and --runs-dir) is refused in one line instead of overwriting the
    first one's best.pt and metrics.json. The kernel drops the lock when the process ends,
    however it ends (kill -9 included): a stale lock file never blocks a later run. One process
    runs one training at a time: a lock it still holds from an earlier run that ended in an
    error (e.g. in a test calling main() again) is dropped first."""
    held = {}  # lock path -> open file, in this process

    def __init__(self, run_dir):
        self.path = Path(run_dir).resolve() / ".lock"
        if self.path in RunLock.held:
            RunLock.held.pop(self.path).close()
        try:
            self.file = open(self.path, "a+")
        except OSError as e:
            raise common.output_problem(self.path, e) from None
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            pid = self.file.read().strip() or "?"
            self.file.close()
            raise TrainError(f"{run_dir}: another run (pid {pid}) is training in this folder; "
                             "wait for it to finish or choose another --run-name") from None
        self.file.truncate(0)
        self.file.write(str(os.getpid()))
        self.file.flush()
        RunLock.held[self.path] = self.file

    def release(self):
        RunLock.held.pop(self.path, None)
        self.file.close()  # closing the file drops the lock


def save_last(path, model, optimizers, state, cfg, device, sparse, train_data):
    """last.pt: everything a resumed run needs to take the same next step. `train_data`: the
    fingerprints of the train files (a resume on other data would skip other batches)."""
    ckpt = {"model": model.state_dict(), "state": state, "rng": torch.get_rng_state(),
            "config": asdict(cfg), "optimizers": [o.state_dict() for o in optimizers],
            "sparse_tables": sparse, "train_data": train_data}
    if device.type == "cuda":  # dropout masks drawn on the GPU come from its own generator
        ckpt["cuda_rng"] = torch.cuda.get_rng_state(device)
    common.torch_save(ckpt, path)


def load_last(path, model, optimizers, device, cfg, sparse, train_data):
    """The state of an interrupted run, after checking that last.pt is whole, was written with
    this config (what may differ: RESUMABLE), on these train files, with the same table kind.
    Loaded to the CPU first: the CPU RNG state must stay a CPU ByteTensor, and load_state_dict
    copies each tensor to where the model's and the optimizers' tensors live."""
    try:
        ckpt = torch.load(path, weights_only=True, map_location="cpu")
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
    before = [(f["size"], f["md5_head_tail"]) for f in ckpt.get("train_data", train_data)]
    if before != [(f["size"], f["md5_head_tail"]) for f in train_data]:
        was = ", ".join(f"{f['path']} ({f['size']:,} bytes)" for f in ckpt["train_data"])
        now_sizes = ", ".join(f"{f['size']:,}" for f in train_data)
        raise TrainError(f"--resume: {path} was trained on {was}, which changed since (now "
                         f"{now_sizes} bytes): the batches already trained cannot be skipped; "
                         "start a new --run-name")
    if ckpt.get("sparse_tables", sparse) != sparse:
        kind = {True: "sparse (RowSparseAdam)", False: "dense (AdamW)"}
        raise TrainError(f"--resume: {path} was trained with {kind[ckpt['sparse_tables']]} "
                         f"tables, this device ({device}) chose {kind[sparse]} ones: pass "
                         f"--sparse-emb {'on' if ckpt['sparse_tables'] else 'off'} to resume")
    model.load_state_dict(ckpt["model"])
    for opt, sd in zip(optimizers, ckpt["optimizers"]):
        opt.load_state_dict(sd)
    torch.set_rng_state(ckpt["rng"])
    if device.type == "cuda" and "cuda_rng" in ckpt:
        torch.cuda.set_rng_state(ckpt["cuda_rng"], device)
    return ckpt["state"]


# ------------------------------------------------------------------ DDP: ranks in step
def collective_device():
    """Where a tensor for a collective must live: NCCL reduces GPU memory, gloo CPU memory."""
    nccl = dist.get_backend() == "nccl"
    return torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")


def all_ranks(value):
    """[value of rank 0, value of rank 1, ...]: one small all-reduce (a one-hot row each)."""
    row = torch.zeros(dist.get_world_size(), dtype=torch.float64, device=collective_device())
    row[dist.get_rank()] = value
    dist.all_reduce(row)
    return row.tolist()


def in_step_with_other_ranks(batches, world, first):
    """DDP: each backward waits for every rank's gradients, so a rank whose shard ends early
    would leave the others waiting forever. Rule: an epoch ends on every rank when the
    shortest shard ends - each step the ranks all-reduce whether they have a next batch (the
    lookahead epoch_batches already makes), the longer shards' extra batches sit the epoch out
    (read, so their bad-row reports still arrive). A rank with no rows at all: one line."""
    it = iter(batches)
    item = next(it, None)
    if first:
        empty = [r for r, has in enumerate(all_ranks(item is not None)) if not has]
        if empty:
            raise TrainError(f"DDP: rank(s) {empty} of {world} got no training rows (a train "
                             "split smaller than its shards); use fewer ranks or more data")
    while item is not None:
        flag = torch.tensor([0 if item[1] else 1], dtype=torch.int32, device=collective_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        yield item[0], not flag.item()
        if not flag.item():
            break
        item = next(it, None)
    for _ in it:  # the rest of a longer shard: not trained on this epoch
        pass
