"""Embedding + MLP ("deep" only): concat the field embeddings -> MLP -> logit.
Crosses are learned implicitly by the ReLU layers - possible, but not cheap to learn."""
import torch.nn as nn

from .layers import MLP, FeatureEmbedding


class DNN(nn.Module):
    def __init__(self, schema, emb_dim=16, mlp=(400, 400, 400), dropout=0.0, sparse=False):
        super().__init__()
        self.embedding = FeatureEmbedding(schema, emb_dim, sparse)
        self.mlp = MLP(schema.n_fields * emb_dim, mlp, dropout)

    def forward(self, dense, sparse):  # (B, n_dense), (B, n_sparse) -> logits (B,)
        return self.mlp(self.embedding(dense, sparse).flatten(1)).squeeze(-1)
