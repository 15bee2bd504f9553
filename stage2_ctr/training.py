"""A CTR training step, written once: the optimizers (one rule for Stage 2 and Stage 3), the step
itself (with micro-batches for large batches) and prediction over a stream of batches.

train_ctr.py's loop, the throughput benchmarks (04_bench_throughput.py, Stage 3's
05_throughput.py) and Stage 3's in-memory loop (stage3_common.fit) all build their optimizers
here, so "Stage 2's DeepFM" is trained the same way wherever it appears.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from stage2_ctr.models.optim import RowSparseAdam


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
