"""The building blocks of every CTR model in this project, each written once.

Inputs of every model: dense (B, 13) float32 and sparse (B, 26) int64 hashed ids in
[0, 2^hash_bits) - what stage2_ctr/02_dataloader.py yields. Every model returns logits (B,);
the loss (BCEWithLogitsLoss) lives in the trainer.

Field embeddings: the 26 sparse fields share ONE table of 2^hash_bits rows (the loader already
salted the hash with the field, so field i's value and field j's value land in different rows).
The 13 dense fields enter as scaled per-field embeddings e_i = v_i * x_i (x_i the standardized
log1p count), so every field - dense or sparse - is one k-dim vector, and FM / cross layers
treat them alike. Every model uses the same FeatureEmbedding.
"""
import torch
import torch.nn as nn

N_DENSE, N_SPARSE = 13, 26
N_FIELDS = N_DENSE + N_SPARSE


class FeatureEmbedding(nn.Module):
    """(dense, sparse) -> (B, 39, k): [v_1 x_1, ..., v_13 x_13, E[id_1], ..., E[id_26]].

    With sparse=True the table produces sparse gradients: a step touches only the rows of the
    batch (~26 * B of 2^20), which SparseAdam / sparse Adagrad update without sweeping the
    whole table."""

    def __init__(self, n_buckets, dim, sparse=False):
        super().__init__()
        self.table = nn.Embedding(n_buckets, dim, sparse=sparse)
        self.dense_vectors = nn.Parameter(torch.empty(N_DENSE, dim))
        nn.init.normal_(self.table.weight, std=0.01)
        nn.init.normal_(self.dense_vectors, std=0.01)

    def forward(self, dense, sparse):
        return torch.cat([dense.unsqueeze(-1) * self.dense_vectors, self.table(sparse)], dim=1)


class FeatureLinear(nn.Module):
    """First-order term: b + sum_i w_i x_i (dense) + sum_f w[id_f] (sparse), i.e. logistic
    regression on the hashed one-hot features."""

    def __init__(self, n_buckets, sparse=False):
        super().__init__()
        self.weight = nn.Embedding(n_buckets, 1, sparse=sparse)
        nn.init.zeros_(self.weight.weight)
        self.dense = nn.Linear(N_DENSE, 1)  # includes the bias b

    def forward(self, dense, sparse):
        return self.dense(dense).squeeze(-1) + self.weight(sparse).sum(dim=(1, 2))


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

    def forward(self, x):
        return self.net(x)


class CrossLayerV1(nn.Module):
    """DCN (Wang et al. 2017): x_{l+1} = x_0 * (x_l^T w_l) + b_l + x_l.
    One vector w_l per layer: the cross term is x_0 scaled by a scalar, so each layer raises the
    polynomial degree by one with only 2d parameters."""

    def __init__(self, dim):
        super().__init__()
        self.w = nn.Parameter(torch.randn(dim) * 0.01)
        self.b = nn.Parameter(torch.zeros(dim))

    def forward(self, x0, x):
        return x0 * (x @ self.w).unsqueeze(-1) + self.b + x


class CrossLayerV2(nn.Module):
    """DCN-v2 (Wang et al. 2021): x_{l+1} = x_0 ⊙ (W_l x_l + b_l) + x_l.
    A full d x d matrix per layer: element-wise (bit-wise) crosses instead of one scalar."""

    def __init__(self, dim):
        super().__init__()
        self.linear = nn.Linear(dim, dim)
        nn.init.normal_(self.linear.weight, std=0.01)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x0, x):
        return x0 * self.linear(x) + x


class CrossNetwork(nn.Module):
    """n_layers cross layers applied to x_0: explicit feature crosses up to degree n_layers+1."""

    def __init__(self, dim, n_layers, version=1):
        super().__init__()
        layer = {1: CrossLayerV1, 2: CrossLayerV2}[version]
        self.layers = nn.ModuleList(layer(dim) for _ in range(n_layers))

    def forward(self, x0):
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

    def forward(self, x):
        return torch.stack([net(x) for net in self.nets], dim=1)


class Gate(nn.Module):
    """Softmax gate over n experts (MMoE, Ma et al. 2018):
        g(x) = softmax(W_g x)  in R^n,  sum_i g_i = 1,   out = sum_i g_i(x) * E_i(x).
    Each task has its own gate, so two tasks can weight the same experts differently; the last
    gate weights are kept in .weights (detached) to watch for collapse onto one expert."""

    def __init__(self, in_dim, n_experts):
        super().__init__()
        self.linear = nn.Linear(in_dim, n_experts)
        self.weights = None

    def forward(self, x, experts):  # x (B, d), experts (B, n, d_e) -> (B, d_e)
        g = torch.softmax(self.linear(x), dim=-1)
        self.weights = g.detach()
        return torch.einsum("bn,bnd->bd", g, experts)


class Towers(nn.Module):
    """One small MLP per task ending in a single output: list of T inputs -> (B, T)."""

    def __init__(self, n_tasks, in_dim, hidden, dropout=0.0, batch_norm=False):
        super().__init__()
        self.nets = nn.ModuleList(MLP(in_dim, hidden, dropout, batch_norm, out_dim=1)
                                  for _ in range(n_tasks))

    def forward(self, inputs):
        return torch.cat([net(x) for net, x in zip(self.nets, inputs)], dim=1)
