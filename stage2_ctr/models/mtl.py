"""Multi-task blocks (Stage 3): shared-bottom, MMoE / OMoE and PLE, each a short composition of
Experts, Gate and Towers from layers.py. Every block maps x (B, d) -> outputs (B, T): logits for
CTR/Adult tasks, values for the regression tasks of the MMoE paper. build_mtl(name, ...) builds
one; CTRMultiTask puts the shared field embedding of the Stage 2 models in front of it."""
import torch
import torch.nn as nn

from .layers import MLP, Experts, FeatureEmbedding, FieldSchema, Gate, Towers


class SharedBottom(nn.Module):
    """h = MLP_shared(x);  y_k = tower_k(h).  Every task reads the same h: cheap and strong when
    tasks agree, a tug of war when they do not (negative transfer)."""

    def __init__(self, in_dim, n_tasks, bottom=(64,), tower=(8,), dropout=0.0, batch_norm=False):
        super().__init__()
        self.bottom = MLP(in_dim, bottom, dropout, batch_norm, out_dim=None)
        self.towers = Towers(n_tasks, self.bottom.out_dim, tower, dropout, batch_norm)
        self.n_tasks = n_tasks

    def forward(self, x):  # (B, d) -> (B, T)
        h = self.bottom(x)
        return self.towers([h] * self.n_tasks)


class MMoE(nn.Module):
    """Multi-gate Mixture-of-Experts (Ma et al., KDD 2018):
        f_k(x) = sum_i softmax(W_k x)_i * E_i(x);   y_k = tower_k(f_k(x)).
    All tasks share the n experts; each task has its own gate. n_gates=1 is OMoE (one gate for
    all tasks: a plain mixture of experts under a shared bottom), the paper's ablation."""

    def __init__(self, in_dim, n_tasks, n_experts=8, expert=(16,), tower=(8,), n_gates=None,
                 dropout=0.0, batch_norm=False):
        super().__init__()
        self.experts = Experts(n_experts, in_dim, expert, dropout, batch_norm)
        self.gates = nn.ModuleList(Gate(in_dim, n_experts) for _ in range(n_gates or n_tasks))
        self.towers = Towers(n_tasks, self.experts.out_dim, tower, dropout, batch_norm)
        self.n_tasks = n_tasks

    def forward(self, x):  # (B, d) -> (B, T)
        e = self.experts(x)
        mixed = [gate(x, e) for gate in self.gates]
        if len(mixed) == 1:  # OMoE
            mixed = mixed * self.n_tasks
        return self.towers(mixed)


class ExtractionLayer(nn.Module):
    """One CGC / PLE extraction layer (Tang et al., RecSys 2020). Task k has its own experts S_k
    and shares the experts C with the others:
        f_k = sum_j g_k(x_k)_j * [S_k(x_k) ; C(x_s)]_j     (gate over own + shared experts)
        f_s = sum_j g_s(x_s)_j * [S_1 ; ... ; S_T ; C]_j   (the shared path, if not the last)
    Task k's gate never sees another task's own experts: what is task-specific stays so."""

    def __init__(self, in_dim, n_tasks, n_shared, n_specific, expert, last, dropout, batch_norm):
        super().__init__()
        self.specific = nn.ModuleList(Experts(n_specific, in_dim, expert, dropout, batch_norm)
                                      for _ in range(n_tasks))
        self.shared = Experts(n_shared, in_dim, expert, dropout, batch_norm) if n_shared else None
        self.task_gates = nn.ModuleList(Gate(in_dim, n_specific + n_shared)
                                        for _ in range(n_tasks))
        self.shared_gate = None if last else Gate(in_dim, n_tasks * n_specific + n_shared)
        self.out_dim = expert[-1]

    def forward(self, task_inputs, shared_input):  # T x (B, d), (B, d) -> T x (B, d_e), (B, d_e)
        own = [experts(x) for experts, x in zip(self.specific, task_inputs)]
        common = [self.shared(shared_input)] if self.shared is not None else []
        outs = [gate(x, torch.cat([e] + common, dim=1))
                for gate, x, e in zip(self.task_gates, task_inputs, own)]
        shared_out = (self.shared_gate(shared_input, torch.cat(own + common, dim=1))
                      if self.shared_gate is not None else None)
        return outs, shared_out


class PLE(nn.Module):
    """Progressive Layered Extraction: n_levels extraction layers stacked (n_levels=1 is CGC),
    then one tower per task. With n_shared=0 and n_specific=1 it is T separate networks."""

    def __init__(self, in_dim, n_tasks, n_shared=2, n_specific=2, expert=(16,), tower=(8,),
                 n_levels=1, dropout=0.0, batch_norm=False):
        super().__init__()
        dims = [in_dim] + [expert[-1]] * (n_levels - 1)
        self.levels = nn.ModuleList(
            ExtractionLayer(d, n_tasks, n_shared, n_specific, expert, i == n_levels - 1,
                            dropout, batch_norm) for i, d in enumerate(dims))
        self.towers = Towers(n_tasks, expert[-1], tower, dropout, batch_norm)
        self.n_tasks = n_tasks

    def forward(self, x):  # (B, d) -> (B, T)
        task_inputs, shared = [x] * self.n_tasks, x
        for level in self.levels:
            task_inputs, shared = level(task_inputs, shared)
        return self.towers(task_inputs)


def build_mtl(name, in_dim, n_tasks, width=16, n_experts=8, n_shared=2, n_specific=2,
              depth=1, tower=(8,), n_levels=1, dropout=0.0, batch_norm=False):
    """name: shared_bottom | mmoe | omoe | ple. `width` sizes the bottom (shared-bottom) or each
    expert; `depth` hidden layers of that width (halving after the first)."""
    hidden = tuple(max(1, width // 2 ** i) for i in range(depth))
    common = dict(tower=tuple(tower), dropout=dropout, batch_norm=batch_norm)
    if name == "shared_bottom":
        return SharedBottom(in_dim, n_tasks, hidden, **common)
    if name in ("mmoe", "omoe"):
        return MMoE(in_dim, n_tasks, n_experts, hidden, n_gates=1 if name == "omoe" else None,
                    **common)
    if name == "ple":
        return PLE(in_dim, n_tasks, n_shared, n_specific, hidden, n_levels=n_levels, **common)
    raise ValueError(f"unknown multi-task block {name!r}")


def n_params(module):
    return sum(p.numel() for p in module.parameters())


def width_for_budget(name, in_dim, n_tasks, budget, **kw):
    """The largest width whose block has at most `budget` parameters (equal-budget
    comparisons: the experts of MMoE/PLE get narrower as their number grows)."""
    lo, hi = 1, 4096
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if n_params(build_mtl(name, in_dim, n_tasks, width=mid, **kw)) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


class CTRMultiTask(nn.Module):
    """Stage 2's field embedding (for Criteo: 13 dense + 26 hashed sparse fields, one table) ->
    flatten -> a multi-task block -> (B, T) logits: one model for click and conversion.
    block_kw go to build_mtl (which rejects unknown ones)."""

    def __init__(self, schema, block_name, n_tasks=2, emb_dim=16, sparse=False, **block_kw):
        super().__init__()
        if isinstance(schema, int):
            schema = FieldSchema(n_buckets=schema)
        self.embedding = FeatureEmbedding(schema, emb_dim, sparse)
        self.block = build_mtl(block_name, schema.n_fields * emb_dim, n_tasks, **block_kw)

    def forward(self, dense, sparse):  # (B, n_dense), (B, n_sparse) -> (B, T)
        return self.block(self.embedding(dense, sparse).flatten(1))
