"""Factorization machine (Rendle 2010): LR + every pairwise interaction <v_i, v_j> x_i x_j,
with one k-dim vector per feature value, so unseen pairs still get a score."""
import torch.nn as nn

from .layers import FeatureEmbedding, FeatureLinear, fm_interaction


class FM(nn.Module):
    def __init__(self, schema, emb_dim=16, sparse=False):
        super().__init__()
        self.linear = FeatureLinear(schema, sparse)
        self.embedding = FeatureEmbedding(schema, emb_dim, sparse)

    def forward(self, dense, sparse):  # (B, n_dense), (B, n_sparse) -> logits (B,)
        return self.linear(dense, sparse) + fm_interaction(self.embedding(dense, sparse))
