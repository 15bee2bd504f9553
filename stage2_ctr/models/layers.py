"""The building blocks of every CTR model in this project, each written once.

Inputs of every model: dense (B, n_dense) float32 and sparse (B, n_sparse + slots of the bags)
int64 ids into ONE shared table - what stage2_ctr/criteo.py yields for Criteo (13 dense, 26
hashed sparse fields) and stage2_ctr/movielens.py for MovieLens (no dense, 7 id fields and one
bag of up to 6 genres). FieldSchema says which layout a model is built for. Every model returns
logits (B,); the loss (BCEWithLogitsLoss) lives in the trainer.

Field embeddings: the sparse fields share ONE table (the loader salted the hash with the field,
or offset each field's ids, so field i's value and field j's value land in different rows). The
dense fields enter as scaled per-field embeddings e_i = v_i * x_i (x_i the standardized value),
and a multi-valued field (a bag, e.g. a movie's genres) as the mean of its values' rows, so every
field - dense, sparse or bag - is one k-dim vector, and FM / cross layers treat them alike.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn


@dataclass(frozen=True)
class FieldSchema:
    """The field layout a model is built for.
    n_dense:   float fields, each embedded as v_i * x_i
    n_sparse:  single-valued id fields: sparse[:, :n_sparse], ids in [0, n_buckets)
    n_buckets: rows of the shared table (2^hash_bits for hashed Criteo ids)
    bags:      slots per multi-valued field: bag b reads the next bags[b] columns of sparse,
               -1 = empty slot; its embedding is the mean over the filled slots."""
    n_dense: int = 13
    n_sparse: int = 26
    n_buckets: int = 2 ** 20
    bags: tuple = ()

    @property
    def n_fields(self):
        return self.n_dense + self.n_sparse + len(self.bags)


def criteo_schema(hash_bits=20):
    return FieldSchema(13, 26, 2 ** hash_bits)


def bag_rows(schema, sparse):
    """(B, slots) rows of the table for the bag columns, and the filled-slot mask. Empty slots
    read an extra row past the buckets (n_buckets), so they never touch a real feature's row
    (the sparse optimizer would otherwise update that row with a zero gradient)."""
    ids = sparse[:, schema.n_sparse:]
    mask = ids >= 0
    return torch.where(mask, ids, schema.n_buckets), mask


def bag_mean(values, mask, schema):
    """values (B, slots, k), mask (B, slots) -> (B, n_bags, k): masked mean per bag."""
    out, start = [], 0
    for size in schema.bags:
        m = mask[:, start:start + size].unsqueeze(-1).to(values.dtype)
        total = (values[:, start:start + size] * m).sum(1)
        out.append(total / m.sum(1).clamp(min=1))
        start += size
    return torch.stack(out, dim=1)


class FeatureEmbedding(nn.Module):
    """(dense, sparse) -> (B, F, k): [v_1 x_1, ..., v_D x_D, E[id_1], ..., E[id_S], bag means].

    With sparse=True the table produces sparse gradients: a step touches only the rows of the
    batch (~26 * B of 2^20 for Criteo), which RowSparseAdam (optim.py) updates without sweeping
    the whole table."""

    def __init__(self, schema, dim, sparse=False):
        super().__init__()
        self.schema = schema
        self.table = nn.Embedding(schema.n_buckets + (1 if schema.bags else 0), dim,
                                  sparse=sparse)
        self.dense_vectors = nn.Parameter(torch.empty(schema.n_dense, dim))
        self.reset_table()
        if schema.n_dense:
            nn.init.normal_(self.dense_vectors, std=0.01)

    def forward(self, dense, sparse):  # (B, n_dense), (B, n_sparse + bag slots) -> (B, F, k)
        s = self.schema
        parts = [dense.unsqueeze(-1) * self.dense_vectors, self.table(sparse[:, :s.n_sparse])]
        if s.bags:
            rows, mask = bag_rows(s, sparse)
            parts.append(bag_mean(self.table(rows), mask, s))
        return torch.cat(parts, dim=1)

    def reset_table(self):  # the id rows' initial draw (training.reset_embeddings re-draws it)
        nn.init.normal_(self.table.weight, std=0.01)


class FeatureLinear(nn.Module):
    """First-order term: b + sum_i w_i x_i (dense) + sum_f w[id_f] (sparse, bags: their mean),
    i.e. logistic regression on the one-hot (hashed) features."""

    def __init__(self, schema, sparse=False):
        super().__init__()
        self.schema = schema
        self.weight = nn.Embedding(schema.n_buckets + (1 if schema.bags else 0), 1,
                                   sparse=sparse)
        self.reset_table()
        if schema.n_dense:
            self.dense = nn.Linear(schema.n_dense, 1)  # includes the bias b
        else:
            self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, dense, sparse):  # (B, n_dense), (B, n_sparse + bag slots) -> (B,)
        s = self.schema
        out = self.weight(sparse[:, :s.n_sparse]).sum(dim=(1, 2))
        out = out + (self.dense(dense).squeeze(-1) if s.n_dense else self.bias)
        if s.bags:
            rows, mask = bag_rows(s, sparse)
            out = out + bag_mean(self.weight(rows), mask, s).sum(dim=(1, 2))
        return out

    def reset_table(self):  # first-order id weights start at zero
        nn.init.zeros_(self.weight.weight)


def fm_interaction(emb):
    """Factorization machine, second order, in O(F k) instead of O(F^2 k):
        sum_{i<j} <v_i, v_j> = 1/2 * sum_k [ (sum_i v_ik)^2 - sum_i v_ik^2 ]
    emb: (B, F, k) -> (B,)."""
    square_of_sum = emb.sum(dim=1).pow(2)
    sum_of_square = emb.pow(2).sum(dim=1)
    return 0.5 * (square_of_sum - sum_of_square).sum(dim=1)


class MLP(nn.Module):
    """[Linear -> (BatchNorm) -> ReLU -> Dropout] per hidden size, then Linear to out_dim
    (out_dim=None: no output layer, the last hidden activation is returned)."""

    def __init__(self, in_dim, hidden, dropout=0.0, batch_norm=True, out_dim=1):
        super().__init__()
        layers = []
        for h in hidden:
            layers += [nn.Linear(in_dim, h)]
            layers += [nn.BatchNorm1d(h)] if batch_norm else []
            layers += [nn.ReLU(), nn.Dropout(dropout)]
            in_dim = h
        if out_dim is not None:
            layers.append(nn.Linear(in_dim, out_dim))
        self.net = nn.Sequential(*layers)
        self.out_dim = out_dim if out_dim is not None else in_dim

    def forward(self, x):  # (B, in_dim) -> (B, out_dim)
        return self.net(x)


class CrossLayerV1(nn.Module):
    """DCN (Wang et al. 2017): x_{l+1} = x_0 * (x_l^T w_l) + b_l + x_l.
    One vector w_l per layer: the cross term is x_0 scaled by a scalar, so each layer raises the
    polynomial degree by one with only 2d parameters."""

    def __init__(self, dim):
        super().__init__()
        self.w = nn.Parameter(torch.randn(dim) * 0.01)
        self.b = nn.Parameter(torch.zeros(dim))

    def forward(self, x0, x):  # (B, d), (B, d) -> (B, d)
        return x0 * (x @ self.w).unsqueeze(-1) + self.b + x


class CrossLayerV2(nn.Module):
    """DCN-v2 (Wang et al. 2021): x_{l+1} = x_0 ⊙ (W_l x_l + b_l) + x_l.
    A full d x d matrix per layer: element-wise (bit-wise) crosses instead of one scalar."""

    def __init__(self, dim):
        super().__init__()
        self.linear = nn.Linear(dim, dim)
        nn.init.normal_(self.linear.weight, std=0.01)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x0, x):  # (B, d), (B, d) -> (B, d)
        return x0 * self.linear(x) + x


class CrossNetwork(nn.Module):
    """n_layers cross layers applied to x_0: explicit feature crosses up to degree n_layers+1."""

    def __init__(self, dim, n_layers, version=1):
        super().__init__()
        layer = {1: CrossLayerV1, 2: CrossLayerV2}[version]
        self.layers = nn.ModuleList(layer(dim) for _ in range(n_layers))

    def forward(self, x0):  # (B, d) -> (B, d)
        x = x0
        for layer in self.layers:
            x = layer(x0, x)
        return x


# ------------------------------------------------------------------ multi-task blocks (Stage 3)
# The MTL blocks below take a feature vector x (B, d) - the flattened field embeddings on CTR
# data, any encoded row elsewhere - and return one output per task, (B, T). They are written
# once here and composed in mtl.py (shared-bottom, MMoE, OMoE, PLE).

class Experts(nn.Module):
    """n expert networks, each an MLP x -> (B, d_e); returns them stacked as (B, n, d_e)."""

    def __init__(self, n, in_dim, hidden, dropout=0.0, batch_norm=False):
        super().__init__()
        self.nets = nn.ModuleList(MLP(in_dim, hidden, dropout, batch_norm, out_dim=None)
                                  for _ in range(n))
        self.out_dim = hidden[-1]

    def forward(self, x):  # (B, d) -> (B, n, d_e)
        return torch.stack([net(x) for net in self.nets], dim=1)


class Gate(nn.Module):
    """Softmax gate over n experts (MMoE, Ma et al. 2018):
        g(x) = softmax(W_g x)  in R^n,  sum_i g_i = 1,   out = sum_i g_i(x) * E_i(x).
    Each task has its own gate, so two tasks can weight the same experts differently;
    weights(x) gives g(x) itself, to watch for a collapse onto one expert."""

    def __init__(self, in_dim, n_experts):
        super().__init__()
        self.linear = nn.Linear(in_dim, n_experts)

    def weights(self, x):  # (B, d) -> (B, n), rows summing to 1
        return torch.softmax(self.linear(x), dim=-1)

    def forward(self, x, experts):  # x (B, d), experts (B, n, d_e) -> (B, d_e)
        return torch.einsum("bn,bnd->bd", self.weights(x), experts)


class Towers(nn.Module):
    """One small MLP per task ending in a single output: list of T inputs -> (B, T)."""

    def __init__(self, n_tasks, in_dim, hidden, dropout=0.0, batch_norm=False):
        super().__init__()
        self.nets = nn.ModuleList(MLP(in_dim, hidden, dropout, batch_norm, out_dim=1)
                                  for _ in range(n_tasks))

    def forward(self, inputs):  # T x (B, d) -> (B, T)
        return torch.cat([net(x) for net, x in zip(self.nets, inputs)], dim=1)


# ------------------------------------------------------- user-behaviour history (Stage 3, 08)
# A user's history is a sequence of past behaviours, left-aligned and padded: ids (B, L) with
# 0 = padding (1 = an id not seen in training, its OOV row). Each behaviour j is a vector h_j
# (B, L, d) - its item's and category's embeddings, plus an optional side id such as "liked" -
# and the candidate t (B, d) is built from the same tables, so h_j and t are comparable. The
# blocks below turn (h, t, mask) into one vector per row; history.py composes them.

class HistoryEmbedding(nn.Module):
    """h_j = [E_item[i_j] + E_side[s_j], E_cat[c_j]],  t = [E_item[i_t], E_cat[c_t]],
    mask_j = (i_j != 0). One item table and one category table serve the candidate and the
    history (the whole point: "is this candidate like what the user did?"). Row 0 of every
    table is the padding row (zero, never trained), row 1 the OOV row."""

    def __init__(self, n_items, n_cats, dim, n_side=0):
        super().__init__()
        self.items = nn.Embedding(n_items, dim, padding_idx=0)
        self.cats = nn.Embedding(n_cats, dim, padding_idx=0)
        self.side = nn.Embedding(n_side, dim, padding_idx=0) if n_side else None
        for table in [self.items, self.cats] + ([self.side] if n_side else []):
            nn.init.normal_(table.weight, std=0.05)
            table.weight.data[0] = 0
        self.out_dim = 2 * dim

    def forward(self, x):  # dict: item, cat (B,); hist_item, hist_cat[, hist_side] (B, L)
        t = torch.cat([self.items(x["item"]), self.cats(x["cat"])], dim=-1)  # (B, 2k)
        item = self.items(x["hist_item"])
        if self.side is not None:
            item = item + self.side(x["hist_side"])
        h = torch.cat([item, self.cats(x["hist_cat"])], dim=-1)  # (B, L, 2k)
        return h, t, x["hist_item"] > 0


def masked_pool(h, mask, mode="mean"):
    """sum pooling  s = sum_j m_j h_j;  mean pooling  s / max(1, sum_j m_j).
    An empty history gives the zero vector. (B, L, d), (B, L) -> (B, d)."""
    m = mask.unsqueeze(-1).to(h.dtype)
    total = (h * m).sum(1)
    return total if mode == "sum" else total / m.sum(1).clamp(min=1)


class Dice(nn.Module):
    """Dice (DIN paper, eq. 9): f(s) = p(s) s + (1 - p(s)) a s,  p(s) = sigmoid((s - E[s]) /
    sqrt(Var[s] + eps)), E and Var per unit over the batch while training (running averages at
    inference), a learned per unit. PReLU is the special case p(s) = 1[s > 0]: Dice moves the
    kink to where the data is. (N, d) -> (N, d)."""

    def __init__(self, dim, eps=1e-8):
        super().__init__()
        self.norm = nn.BatchNorm1d(dim, eps=eps, affine=False)
        self.alpha = nn.Parameter(torch.zeros(dim))

    def forward(self, s):  # (N, d) -> (N, d)
        p = torch.sigmoid(self.norm(s))
        return p * s + (1 - p) * self.alpha * s


class ActivationUnit(nn.Module):
    """DIN's local activation unit (Zhou et al. 2018):
        w_j = MLP([h_j, t, h_j - t, h_j * t])   (one hidden layer, Dice or PReLU, one output)
        out = sum_j m_j w_j h_j
    No softmax over j, as in the paper: the sum keeps how MUCH of the history is relevant, not
    only which part. The unit runs on the filled positions only (gathered with the mask), so
    padding can neither enter the sum nor Dice's batch statistics."""

    def __init__(self, dim, hidden=36, activation="dice"):
        super().__init__()
        act = Dice(hidden) if activation == "dice" else nn.PReLU(hidden)
        self.net = nn.Sequential(nn.Linear(4 * dim, hidden), act, nn.Linear(hidden, 1))

    def weights(self, h, t, mask):  # (B, L, d), (B, d), (B, L) -> (B, L), 0 at padding
        t = t.unsqueeze(1).expand_as(h)[mask]
        hj = h[mask]  # (N_filled, d)
        w = h.new_zeros(mask.shape)
        w[mask] = self.net(torch.cat([hj, t, hj - t, hj * t], dim=-1)).squeeze(-1)
        return w

    def forward(self, h, t, mask):  # (B, L, d), (B, d), (B, L) -> (B, d)
        return (self.weights(h, t, mask).unsqueeze(-1) * h).sum(1)


def recency(mask):
    """Position of each behaviour counted from the latest: 1 = the most recent filled slot,
    2 = the one before, ...; 0 at padding. Counted from the end of the filled part, so
    appending padding changes no position. (B, L) bool -> (B, L) int64."""
    n = mask.sum(1, keepdim=True)
    pos = n - torch.arange(mask.shape[1], device=mask.device)
    return torch.where(mask, pos, torch.zeros_like(pos))


class BehaviourTransformer(nn.Module):
    """BST (Chen et al. 2019): one transformer layer over the behaviours and the target,
        x = [h_1 + P[r_1], ..., h_L + P[r_L], t + P[0]]         (r_j = recency(mask))
        a = x + MultiHeadAttention(x, x, x, keys at padding masked);  a = LayerNorm(a)
        y = LayerNorm(a + FFN(a)),  FFN = Linear(d, 2d) -> ReLU -> Linear(2d, d)
        out = [y_target, masked mean_j y_j]                       (B, 2d)
    The position embedding P is what makes it order-aware: without it attention is a function
    of the set of behaviours, as pooling and DIN are. Chosen over DIEN's GRU + AUGRU because
    one attention matmul covers the whole sequence, where AUGRU steps through it in a Python
    loop of L small kernels (an attention-gated GRU has no fused cuDNN/MKL kernel)."""

    def __init__(self, dim, max_len, heads=2, dropout=0.0):
        super().__init__()
        self.positions = nn.Embedding(max_len + 1, dim)
        nn.init.normal_(self.positions.weight, std=0.05)
        self.attention = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, 2 * dim), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(2 * dim, dim))
        self.max_len = max_len
        self.out_dim = 2 * dim

    def forward(self, h, t, mask):  # (B, L, d), (B, d), (B, L) -> (B, 2d)
        pos = recency(mask).clamp(max=self.max_len)
        x = torch.cat([h + self.positions(pos), (t + self.positions.weight[0]).unsqueeze(1)],
                      dim=1)  # (B, L + 1, d): the target last
        keep = torch.cat([mask, mask.new_ones(len(mask), 1)], dim=1)
        a, _ = self.attention(x, x, x, key_padding_mask=~keep, need_weights=False)
        a = self.norm1(x + a)
        y = self.norm2(a + self.ffn(a))
        return torch.cat([y[:, -1], masked_pool(y[:, :-1], mask)], dim=-1)
