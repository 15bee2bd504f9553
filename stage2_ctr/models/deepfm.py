"""DeepFM (Guo et al. 2017): logit = LR + FM (explicit 2nd order) + MLP (implicit higher
order), the FM and the MLP reading the SAME field embeddings."""
import torch.nn as nn

from .layers import N_FIELDS, MLP, FeatureEmbedding, FeatureLinear, fm_interaction


class DeepFM(nn.Module):
    def __init__(self, n_buckets, emb_dim=16, mlp=(400, 400, 400), dropout=0.0, sparse=False,
                 **_):
        super().__init__()
        self.linear = FeatureLinear(n_buckets, sparse)
        self.embedding = FeatureEmbedding(n_buckets, emb_dim, sparse)
        self.mlp = MLP(N_FIELDS * emb_dim, mlp, dropout)

    def forward(self, dense, sparse):
        emb = self.embedding(dense, sparse)
        return (self.linear(dense, sparse) + fm_interaction(emb)
                + self.mlp(emb.flatten(1)).squeeze(-1))
