"""Embedding + MLP ("deep" only): concat the 39 field embeddings -> MLP -> logit.
Crosses are learned implicitly by the ReLU layers - possible, but not cheap to learn."""
import torch.nn as nn

from .layers import N_FIELDS, MLP, FeatureEmbedding


class DNN(nn.Module):
    def __init__(self, n_buckets, emb_dim=16, mlp=(400, 400, 400), dropout=0.0, sparse=False,
                 **_):
        super().__init__()
        self.embedding = FeatureEmbedding(n_buckets, emb_dim, sparse)
        self.mlp = MLP(N_FIELDS * emb_dim, mlp, dropout)

    def forward(self, dense, sparse):
        return self.mlp(self.embedding(dense, sparse).flatten(1)).squeeze(-1)
