"""RowSparseAdam: Adam for embedding tables that touches only the rows of the batch.

A training step of a CTR model reads ~26 x B rows of a 2^20-row table. nn.Embedding(sparse=True)
hands the optimizer a sparse gradient: the list of row ids of the batch (with repeats: a popular
value appears in many rows of the batch) and one gradient row per id. "Lazy" Adam then updates
only those rows, with the usual Adam math per row r:

    g_r = sum of the gradient rows whose id is r        (repeats summed)
    m_r = b1 m_r + (1 - b1) g_r,   v_r = b2 v_r + (1 - b2) g_r^2
    w_r = w_r - lr * sqrt(1 - b2^t) / (1 - b1^t) * m_r / (sqrt(v_r) + eps)

torch.optim.SparseAdam computes exactly this, but it first coalesces the gradient (a sort of
the ~26k ids, every step) and works through sparse-tensor ops. RowSparseAdam sums the repeats
without sorting (a scratch array with one slot per table row remembers where each id went, see
`distinct_rows`) and then reads and writes the (U, k) blocks of the U distinct rows with
index_select / index_copy_: same numbers (tests/test_stage2_models.py checks it against
SparseAdam); what it buys a whole DeepFM step is measured by stage2_ctr/06_bench_throughput.py
(results/stage2_throughput.md).

On a GPU the U distinct rows have a cost of their own: U is known only once the device has
computed it, so picking them out (a boolean mask) makes the host wait for the device, twice a
step with the check that two tables share their ids. There the update runs over all n looked-up
ids instead: every id's summed gradient is gathered back to each of its positions, so all copies
of a row compute the same new values and index_copy_ writes identical values (sync_free).
"""
import math

import torch


def survivors(ids, slot):
    """(n,) for ids (n,) with repeats: for each id, one position in [0, n) that holds the same
    id - the same position for all its copies. `slot` is a scratch int64 array with one entry
    per table row: writing position i into slot[ids[i]] leaves exactly one surviving position
    per distinct id (which one is unspecified - it does not matter). No host sync."""
    slot.index_copy_(0, ids, torch.arange(ids.numel(), device=ids.device))
    return slot.index_select(0, ids)


def distinct_rows(ids, slot):
    """ids (n,) int64 with repeats -> (rows (U,) the distinct ids, where (n,) index of each id in
    rows), in O(n) without sorting (survivors)."""
    positions = torch.arange(ids.numel(), device=ids.device)
    is_first = survivors(ids, slot) == positions  # exactly one survivor per distinct id
    rows = ids[is_first]  # U: read by the host
    slot.index_copy_(0, rows, torch.arange(rows.numel(), device=ids.device))
    return rows, slot.index_select(0, ids)


class RowSparseAdam(torch.optim.Optimizer):
    """Lazy Adam for parameters with sparse gradients (nn.Embedding(sparse=True)); the same update
    as torch.optim.SparseAdam. No weight decay (as SparseAdam): a row's decay would only happen on
    the steps that see it."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, sync_free=None):
        """sync_free: the update over all n looked-up ids (no host sync; see the header).
        None: on every device but the CPU, where a host read costs nothing and U rows are
        less work than n."""
        if lr <= 0 or eps <= 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"RowSparseAdam: bad lr={lr}, betas={betas} or eps={eps}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps))
        self._slots = {}  # table rows -> scratch for distinct_rows; never checkpointed
        self.sync_free = sync_free

    def _slot(self, p):
        slot = self._slots.get(p.shape[0])
        if slot is None or slot.device != p.device:
            slot = torch.empty(p.shape[0], dtype=torch.int64, device=p.device)
            self._slots[p.shape[0]] = slot
        return slot

    @torch.no_grad()
    def step(self, closure=None):
        last_ids, last_rows = None, None  # tables looked up with the same ids share the dedupe
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if not p.grad.is_sparse:
                    raise RuntimeError("RowSparseAdam needs sparse gradients: build the table "
                                       "with nn.Embedding(..., sparse=True)")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                ids = p.grad._indices()[0]  # uncoalesced: one (id, row) pair per lookup
                # a table of one column is handled as a vector: row gathers on a (N, 1) tensor
                # are slower on CPU than on the same memory seen as (N,)
                shape = (-1,) if p[0].numel() == 1 else (p.shape[0], -1)
                weight, exp_avg, exp_avg_sq = (t.view(shape) for t in
                                               (p, state["exp_avg"], state["exp_avg_sq"]))
                values = p.grad._values().reshape((len(ids),) + weight.shape[1:])
                if self.sync_free if self.sync_free is not None else p.device.type != "cpu":
                    # each position gets its id's summed gradient: rows = ids, repeats included
                    where = survivors(ids, self._slot(p))
                    rows, g = ids, torch.zeros_like(values).index_add_(0, where, values)[where]
                else:
                    if last_ids is None or not torch.equal(ids, last_ids):
                        last_ids, last_rows = ids, distinct_rows(ids, self._slot(p))
                    rows, where = last_rows
                    g = values.new_zeros((len(rows),) + weight.shape[1:]).index_add_(0, where,
                                                                                     values)
                m = exp_avg.index_select(0, rows).lerp_(g, 1 - beta1)
                v = exp_avg_sq.index_select(0, rows).mul_(beta2).addcmul_(g, g, value=1 - beta2)
                exp_avg.index_copy_(0, rows, m)
                exp_avg_sq.index_copy_(0, rows, v)
                t = state["step"]
                step_size = group["lr"] * math.sqrt(1 - beta2 ** t) / (1 - beta1 ** t)
                new_rows = torch.addcdiv(weight.index_select(0, rows), m,
                                         v.sqrt_().add_(group["eps"]), value=-step_size)
                weight.index_copy_(0, rows, new_rows)  # repeated rows: identical values
        return None


class RowSparseSGD(torch.optim.Optimizer):
    """Lazy SGD with momentum for parameters with sparse gradients: as RowSparseAdam, only the
    rows of the batch move, each with its own momentum buffer (torch.optim.SGD would keep one
    sparse buffer whose index list grows with every step):

        g_r = sum of the gradient rows whose id is r,   m_r = mu m_r + g_r,   w_r = w_r - lr m_r
    """

    def __init__(self, params, lr=0.1, momentum=0.9):
        if lr <= 0 or not 0 <= momentum < 1:
            raise ValueError(f"RowSparseSGD: bad lr={lr} or momentum={momentum}")
        super().__init__(params, dict(lr=lr, momentum=momentum))
        self._slots = {}  # table rows -> scratch for distinct_rows; never checkpointed

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if not p.grad.is_sparse:
                    raise RuntimeError("RowSparseSGD needs sparse gradients: build the table "
                                       "with nn.Embedding(..., sparse=True)")
                state = self.state[p]
                if not state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                slot = self._slots.get(p.shape[0])
                if slot is None or slot.device != p.device:
                    slot = self._slots[p.shape[0]] = torch.empty(p.shape[0], dtype=torch.int64,
                                                                 device=p.device)
                ids = p.grad._indices()[0]
                rows, where = distinct_rows(ids, slot)
                weight, buf = p.view(p.shape[0], -1), state["momentum_buffer"].view(p.shape[0], -1)
                values = p.grad._values().reshape(len(ids), -1)
                g = values.new_zeros((len(rows), weight.shape[1])).index_add_(0, where, values)
                m = buf.index_select(0, rows).mul_(group["momentum"]).add_(g)
                buf.index_copy_(0, rows, m)
                weight.index_copy_(0, rows, weight.index_select(0, rows).sub_(m, alpha=group["lr"]))
        return None
