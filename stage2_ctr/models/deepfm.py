"""DeepFM (Guo et al. 2017): logit = LR + FM (explicit 2nd order) + MLP (implicit higher
order), the FM and the MLP reading the SAME field embeddings."""
import torch.nn as nn

from .layers import MLP, FeatureEmbedding, FeatureLinear, fm_interaction


class DeepFM(nn.Module):
    def __init__(self, schema, emb_dim=16, mlp=(400, 400, 400), dropout=0.0, sparse=False):
        super().__init__()
        self.linear = FeatureLinear(schema, sparse)
        self.embedding = FeatureEmbedding(schema, emb_dim, sparse)
        self.mlp = MLP(schema.n_fields * emb_dim, mlp, dropout)

    def forward(self, dense, sparse):  # (B, n_dense), (B, n_sparse) -> logits (B,)
        emb = self.embedding(dense, sparse)
        return (self.linear(dense, sparse) + fm_interaction(emb)
                + self.mlp(emb.flatten(1)).squeeze(-1))
