"""Models that read a user's behaviour history: no history, pooling, DIN, BST - each the same
frame around one block of layers.py (HistoryEmbedding, masked_pool, ActivationUnit,
BehaviourTransformer), so the four differ only in how the history becomes one vector:

    logit = MLP([E_user[u], t, summary(h_1..h_L, t)])
    base:  no summary (the candidate and the user id only)
    pool:  mean_j h_j                        (the history as a bag: order and candidate ignored)
    din:   sum_j w(h_j, t) h_j               (target attention: the candidate picks behaviours)
    bst:   transformer over [h_j + P[recency_j]; t]   (attention that also sees the order)

Inputs: a dict of int64 tensors - user, item, cat (B,), hist_item, hist_cat[, hist_side] (B, L)
with 0 = padding and 1 = OOV (stage3_advanced/behaviour.py encodes them); output logits (B, 1),
what training.fit expects.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn

from .layers import MLP, ActivationUnit, BehaviourTransformer, HistoryEmbedding, masked_pool

HISTORY_MODELS = ["base", "pool", "din", "bst"]


@dataclass(frozen=True)
class HistorySchema:
    """Table sizes (padding row 0 and OOV row 1 included) and the longest history kept."""
    n_users: int
    n_items: int
    n_cats: int
    max_len: int
    n_side: int = 0  # rows of the side table (e.g. liked flag: pad, no, yes = 3); 0 = none


class HistoryModel(nn.Module):
    def __init__(self, schema, kind, emb_dim=16, mlp=(200, 80), dropout=0.0,
                 activation="dice", heads=2):
        super().__init__()
        if kind not in HISTORY_MODELS:
            raise ValueError(f"unknown model {kind!r}: one of {', '.join(HISTORY_MODELS)}")
        self.kind = kind
        self.users = nn.Embedding(schema.n_users, emb_dim, padding_idx=0)
        nn.init.normal_(self.users.weight, std=0.05)
        self.embed = HistoryEmbedding(schema.n_items, schema.n_cats, emb_dim, schema.n_side)
        d = self.embed.out_dim
        self.attention = ActivationUnit(d, activation=activation) if kind == "din" else None
        self.transformer = (BehaviourTransformer(d, schema.max_len, heads, dropout)
                            if kind == "bst" else None)
        summary = {"base": 0, "pool": d, "din": d, "bst": 2 * d}[kind]
        self.mlp = MLP(emb_dim + d + summary, mlp, dropout)

    def summary(self, h, t, mask):  # (B, L, d), (B, d), (B, L) -> (B, d_summary)
        if self.kind == "pool":
            return masked_pool(h, mask, "mean")
        if self.kind == "din":
            return self.attention(h, t, mask)
        return self.transformer(h, t, mask)

    def attention_weights(self, x):  # DIN only: dict -> (B, L), 0 at padding
        h, t, mask = self.embed(x)
        return self.attention.weights(h, t, mask)

    def forward(self, x):  # dict of (B,) and (B, L) ids -> (B, 1)
        h, t, mask = self.embed(x)
        parts = [self.users(x["user"]), t]
        if self.kind != "base":
            parts.append(self.summary(h, t, mask))
        return self.mlp(torch.cat(parts, dim=-1))
