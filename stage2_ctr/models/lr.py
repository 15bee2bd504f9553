"""Logistic regression on one-hot (hashed) features: logit = b + sum_i w_i x_i + sum_f w[id_f].
The baseline every CTR model must beat; it cannot see any interaction between fields."""
import torch.nn as nn

from .layers import FeatureLinear


class LR(nn.Module):
    def __init__(self, schema, sparse=False):
        super().__init__()
        self.linear = FeatureLinear(schema, sparse)

    def forward(self, dense, sparse):  # (B, n_dense), (B, n_sparse) -> logits (B,)
        return self.linear(dense, sparse)
