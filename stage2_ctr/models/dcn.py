"""Deep & Cross Network: x_0 = concat(field embeddings); a cross network (explicit crosses,
degree grows by one per layer) in parallel with an MLP; concat both -> linear -> logit.
cross_version=1: DCN (Wang et al. 2017); cross_version=2: DCN-v2 (Wang et al. 2021)."""
import torch
import torch.nn as nn

from .layers import MLP, CrossNetwork, FeatureEmbedding


class DCN(nn.Module):
    def __init__(self, schema, emb_dim=16, mlp=(400, 400, 400), dropout=0.0, cross_layers=3,
                 cross_version=1, sparse=False):
        super().__init__()
        dim = schema.n_fields * emb_dim
        self.embedding = FeatureEmbedding(schema, emb_dim, sparse)
        self.cross = CrossNetwork(dim, cross_layers, cross_version)
        self.mlp = MLP(dim, mlp, dropout, out_dim=None)
        self.head = nn.Linear(dim + self.mlp.out_dim, 1)

    def forward(self, dense, sparse):  # (B, n_dense), (B, n_sparse) -> logits (B,)
        x0 = self.embedding(dense, sparse).flatten(1)
        return self.head(torch.cat([self.cross(x0), self.mlp(x0)], dim=1)).squeeze(-1)
