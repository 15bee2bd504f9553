"""A CTR training step, written once: the precision (bf16 autocast or fp32), the optimizers (one
rule for Stage 2 and Stage 3), the step itself (with micro-batches for large batches),
prediction over a stream of batches, and a loop for data held in memory (fit).

train_ctr.py's loop (the run around the step - data checks, checkpoints, DDP - lives there),
the throughput benchmarks (06_bench_throughput.py, Stage 3's 05_throughput.py) and the
in-memory loop at the end of this file (fit: Stage 3's experiments, MovieLens) all build their
optimizers here, so "Stage 2's DeepFM" is trained the same way wherever it appears.
"""
import copy
import time
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from tqdm import tqdm

from stage2_ctr.models.optim import RowSparseAdam, RowSparseSGD


# ------------------------------------------------------------------------------- precision
def cpu_has_native_bf16():
    """Whether this CPU multiplies bf16 in hardware: the avx512_bf16 or amx_bf16 flags of
    /proc/cpuinfo (Intel Cooper Lake / Sapphire Rapids and later, AMD Zen 4 and later). Without
    them torch converts bf16 to fp32 around every matmul, which is slower than fp32 alone."""
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags"))
    except (OSError, StopIteration):
        return False
    return bool({"avx512_bf16", "amx_bf16"} & set(flags.split()))


def amp_dtype(amp, device):
    """--amp off | bf16 | auto -> torch.bfloat16 or None. auto: bf16 on a CUDA device that
    supports it and on a CPU with native bf16 (cpu_has_native_bf16), fp32 elsewhere."""
    if amp == "off":
        return None
    if amp == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if cpu_has_native_bf16() else None


def autocast_for(device, dtype):
    """A factory of autocast contexts for make_step / predict (None: plain fp32). Under
    autocast the matmuls of the MLP and the cross layers run in bf16; embedding tables,
    BatchNorm, the loss and the optimizer state stay fp32."""
    if dtype is None:
        return None
    return lambda: torch.autocast(device.type, dtype=dtype)


OPTIMIZERS = ("adam", "adagrad", "sgd")  # the optimizer families make_optimizers builds


def make_optimizers(model, lr, weight_decay=0.0, decoupled=True, kind="adam", momentum=0.9):
    """The one optimizer rule of this project:
      - embedding tables built with sparse=True -> RowSparseAdam (lazy Adam: only the rows of
        the batch move; models/optim.py). No weight decay there: a row would decay only on
        the steps that see it.
      - everything else (MLP, cross layers, dense-field vectors, tables without sparse
        gradients) -> AdamW, fused (one kernel for all tensors instead of a loop over them).
    decoupled=False swaps AdamW for Adam with L2 in the gradient (weight_decay * w added to
    the gradient, then scaled by Adam's 1/sqrt(v): the decay a parameter gets depends on its
    gradient history). Both are the same when weight_decay = 0, the CTR default; the README
    of Stage 2 has the validation comparison that picked AdamW.
    kind: the optimizer family (08_one_epoch.py compares them; "adam" is the rule above):
      adagrad  torch.optim.Adagrad for both (it takes sparse gradients; its per-coordinate sum
               of squared gradients only grows, so steps shrink: a slow-converging optimizer)
      sgd      SGD with `momentum` for the dense part, RowSparseSGD (lazy momentum) for tables
    weight_decay: as L2 in the gradient for adagrad and sgd (their torch form)."""
    if kind not in OPTIMIZERS:
        raise ValueError(f"optimizer {kind!r}: one of {', '.join(OPTIMIZERS)}")
    tables = [m.weight for m in model.modules() if isinstance(m, nn.Embedding) and m.sparse]
    table_ids = {id(t) for t in tables}
    rest = [p for p in model.parameters() if id(p) not in table_ids]
    if kind == "adagrad":  # its sparse path rebuilds the gradient unchecked: torch says so once
        warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly")
        return [torch.optim.Adagrad(ps, lr=lr, weight_decay=wd) for ps, wd in
                [(rest, weight_decay), (tables, 0.0)] if ps]
    if kind == "sgd":
        return ([torch.optim.SGD(rest, lr=lr, momentum=momentum, weight_decay=weight_decay)]
                if rest else []) + ([RowSparseSGD(tables, lr=lr, momentum=momentum)]
                                    if tables else [])
    fused = all(p.device.type in ("cpu", "cuda") for p in rest) or None
    dense_opt = torch.optim.AdamW if decoupled else torch.optim.Adam
    opts = [dense_opt(rest, lr=lr, weight_decay=weight_decay, fused=fused)] if rest else []
    if tables:
        opts.append(RowSparseAdam(tables, lr=lr))
    return opts


def reset_embeddings(model, optimizers):
    """The multi-epoch fix of Liu et al. 2023 (MEDA): the embedding tables (every nn.Embedding:
    the id rows of FeatureEmbedding and of the first-order FeatureLinear) drawn afresh as at
    construction, and their optimizer state dropped, so the next step starts them like a new
    run's (Adam's step count and moments included); the MLP, cross layers, dense-field vectors
    and their optimizer state are kept. Returns the number of tables reset."""
    tables = [m for m in model.modules() if hasattr(m, "reset_table")]
    weights = {id(e.weight) for m in tables for e in m.modules() if isinstance(e, nn.Embedding)}
    if any(isinstance(e, nn.Embedding) and id(e.weight) not in weights for e in model.modules()):
        raise ValueError(f"{type(model).__name__} has embedding tables that cannot be drawn "
                         "afresh (no reset_table in their block): --reinit-emb covers the "
                         "Stage 2 models (FeatureEmbedding, FeatureLinear)")
    for m in tables:
        m.reset_table()
    for opt in optimizers:
        for p in [p for p in opt.state if id(p) in weights]:
            del opt.state[p]
    return len(tables)


def make_step(model, optimizers, micro_batch=0, autocast=None):
    """step(dense, sparse, label) -> the batch's mean BCE (a detached tensor on the device: no
    host sync; read it with .item() only when you report it).

    With micro_batch > 0 a larger batch goes through forward and backward in slices of
    micro_batch rows (gradient accumulation): activation memory is that of one slice. Each
    slice's loss is its summed BCE / batch rows, so the gradients add up to the whole batch's
    mean-loss gradient - the same update, except that BatchNorm normalizes each slice by its
    own statistics ("ghost" batch norm). The slices' sparse embedding gradients are set aside
    and concatenated once (RowSparseAdam sums repeated rows anyway): letting autograd add them
    up would re-sort the growing sum at every slice (the git log of 89240f8 has the cost).
    `autocast`: a context manager factory (e.g. bf16 autocast) or None."""
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


# ---------------------------------------------------------------- training on in-memory data
# Data small enough to hold as tensors (Stage 3's experiments, MovieLens in 05): batches are
# slices of preloaded tensors, inputs a dict, outputs (B, T) - one column per task.
class CTRInputs(nn.Module):
    """Adapter: a Stage 2 model takes (dense, sparse); fit() hands a dict of inputs."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        out = self.model(x["dense"], x["sparse"])
        return out if out.dim() == 2 else out.unsqueeze(-1)


class FitError(ValueError):
    """An in-memory training run that diverged (a NaN or infinite loss or prediction): the
    message is one line saying where and what to do."""


def to_device(split, device):
    """(inputs dict, labels) moved to `device` (a no-op for tensors already there)."""
    inputs, y = split
    return {k: v.to(device) for k, v in inputs.items()}, y.to(device)


def batches(inputs, y, batch_size, generator=None):
    """Slices of preloaded tensors (shuffled when a generator is given): no per-row Python.
    The order is drawn on the CPU generator, so a run is the same on every device."""
    n = len(y)
    order = (torch.randperm(n, generator=generator).to(y.device) if generator is not None
             else None)
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size] if order is not None else slice(start,
                                                                             start + batch_size)
        yield {k: v[idx] for k, v in inputs.items()}, y[idx]


@torch.no_grad()
def predict_in_memory(model, inputs, batch_size=16384):
    """Raw model outputs (B, T) for a whole split, on the CPU; each slice of the inputs goes to
    the model's device (a no-op when it is there already)."""
    model.eval()
    device = next(model.parameters()).device
    n = len(next(iter(inputs.values())))
    out = [model({k: v[i:i + batch_size].to(device) for k, v in inputs.items()}).float().cpu()
           for i in range(0, n, batch_size)]
    model.train()
    return torch.cat(out)


def auc_per_task(model, split):
    inputs, y = split
    p = torch.sigmoid(predict_in_memory(model, inputs)).numpy()
    if not np.isfinite(p).all():
        raise FitError("the model predicts NaN (the training diverged): no AUC; lower the "
                         "learning rate (--lr)")
    y = y.cpu().numpy()
    return [float(roc_auc_score(y[:, t], p[:, t])) for t in range(y.shape[1])]


def fit(model, train, val, loss_fn, lr=1e-3, weight_decay=0.0, batch_size=256, epochs=20,
        patience=3, seed=0, task_weights=None, desc="train", quiet=False, max_seconds=None,
        device=None):
    """Minibatch training on in-memory tensors; after each epoch the mean validation AUC over
    tasks decides early stopping, and the best epoch's weights are restored.
    loss_fn(outputs (B, T), labels (B, T)) -> per-element losses (B, T). device: where the model
    trains (None: where its parameters are); the model and both splits move there once, before
    the first epoch, not per batch. A NaN or infinite training loss is a FitError."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device)
    train, val = to_device(train, device), to_device(val, device)
    opts = make_optimizers(model, lr, weight_decay)
    gen = torch.Generator().manual_seed(seed)
    w = torch.tensor(task_weights if task_weights is not None else [1.0] * train[1].shape[1],
                     device=device)
    best, history, samples, t_train = (-1.0, 0, None), [], 0, 0.0
    bar = tqdm(range(epochs), desc=desc, disable=quiet, leave=False)
    for epoch in bar:
        t0, n = time.perf_counter(), 0
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # no sync per step
        for x, y in batches(*train, batch_size, gen):
            loss = (loss_fn(model(x), y).mean(0) * w).sum()
            for o in opts:
                o.zero_grad(set_to_none=True)
            loss.backward()
            for o in opts:
                o.step()
            loss_sum += loss.detach()
            n, samples = n + 1, samples + len(y)
        loss_sum = loss_sum.item()  # the epoch's one sync (CUDA): inside the timed part
        t_train += time.perf_counter() - t0
        if not np.isfinite(loss_sum):
            raise FitError(f"{desc}: the training loss is {loss_sum} at epoch {epoch + 1} "
                             "(diverged): lower the learning rate (--lr)")
        aucs = auc_per_task(model, val)
        history.append({"epoch": epoch + 1, "train_loss": loss_sum / n, "val_auc": aucs})
        bar.set_postfix(loss=f"{loss_sum / n:.4f}", val_auc=" ".join(f"{a:.4f}" for a in aucs))
        score = float(np.mean(aucs))
        if score > best[0]:
            best = (score, epoch + 1, copy.deepcopy(model.state_dict()))
        elif epoch + 1 - best[1] >= patience:
            break
        if max_seconds and t_train > max_seconds:
            break
    model.load_state_dict(best[2])
    return {"best_epoch": best[1], "history": history,
            "train_samples_per_s": samples / max(t_train, 1e-9)}


def bce(logits, y):
    return F.binary_cross_entropy_with_logits(logits, y, reduction="none")
