"""ESMM (Ma et al., SIGIR 2018): the entire-space multi-task model of the click -> conversion
funnel, composed from layers.py (one FeatureEmbedding) and a two-task block: two separate towers
(the paper), or MMoE / PLE from mtl.py underneath.

A conversion is only observed after a click, so a CVR model is usually trained on clicked rows
and then served on every impression (sample-selection bias; few clicks: data sparsity). ESMM
never fits pCVR on its own. Over ALL impressions it fits
    pCTR   = sigmoid(t_ctr(e(x)))                    to the click label
    pCTCVR = pCTR * pCVR,  pCVR = sigmoid(t_cvr(e(x)))   to the conversion label (click AND buy)
    L = BCE(pCTR, click) + BCE(pCTCVR, conversion)
with the embedding e shared by both towers, so the rare conversion task borrows the click task's
features. pCVR is read off the CVR tower, never trained against a label of its own: its only
target is the ratio pCTCVR / pCTR = P(conversion | x, click) - the same quantity a clicked-rows
model fits (ESMM's known weakness, ESCM2, Wang et al. SIGIR 2022: it is not E[pCVR | x] when the
click depends on something unseen that the conversion also depends on).

The forward returns the two LOGITS with a label over the entire space, [pCTR, pCTCVR], so the
loss is plain BCE-with-logits per column and the in-memory loop (training.fit) trains it as any
two-task model; logit(p1 p2) is computed in log space (log-sigmoids, log1mexp), stable at any
probability.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import MLP, FeatureEmbedding, Towers
from .mtl import build_mtl


def log1mexp(x):
    """log(1 - exp(x)) for x < 0, accurate at both ends (Maechler 2012)."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def product_logit(logit_a, logit_b):
    """logit(sigmoid(a) * sigmoid(b)): with lp = log sigma(a) + log sigma(b) (< 0),
    logit = lp - log(1 - exp(lp)). Clamped just below 0 so that two certain events stay finite."""
    lp = (F.logsigmoid(logit_a) + F.logsigmoid(logit_b)).clamp(max=-1e-6)
    return lp - log1mexp(lp)


class ESMM(nn.Module):
    """FeatureEmbedding -> flatten -> a two-task block (CTR, CVR logits) -> [pCTR, pCTCVR] logits.
    under="towers": two separate MLP towers (the paper); "mmoe" / "ple": those blocks of mtl.py
    (block_kw go to build_mtl, which rejects unknown ones)."""

    def __init__(self, schema, emb_dim=8, under="towers", tower=(64, 32), sparse=False,
                 **block_kw):
        super().__init__()
        self.embedding = FeatureEmbedding(schema, emb_dim, sparse)
        in_dim = schema.n_fields * emb_dim
        if under == "towers":
            if block_kw:
                raise TypeError(f"towers take no block arguments, got {sorted(block_kw)}")
            self.block = Towers(2, in_dim, tuple(tower), batch_norm=True)
        else:
            self.block = build_mtl(under, in_dim, 2, tower=tuple(tower), **block_kw)
        self.under = under

    def ctr_cvr_logits(self, dense, sparse):  # (B, n_dense), (B, n_sparse) -> (B, 2)
        e = self.embedding(dense, sparse).flatten(1)
        return self.block([e, e]) if self.under == "towers" else self.block(e)

    def forward(self, dense, sparse):  # (B, n_dense), (B, n_sparse) -> (B, 2) [pCTR, pCTCVR]
        logits = self.ctr_cvr_logits(dense, sparse)
        return torch.stack([logits[:, 0], product_logit(logits[:, 0], logits[:, 1])], dim=1)


class CVRView(nn.Module):
    """ESMM's pCVR tower alone, (dense, sparse) -> (B,) logits: how the CVR is scored/served."""

    def __init__(self, esmm):
        super().__init__()
        self.esmm = esmm

    def forward(self, dense, sparse):  # (B, n_dense), (B, n_sparse) -> (B,)
        return self.esmm.ctr_cvr_logits(dense, sparse)[:, 1]


class Tower(nn.Module):
    """The naive baselines: FeatureEmbedding -> one MLP tower of ESMM's shape -> (B,) logits.
    Trained on clicked rows for the conversion label it is the usual CVR model; on all rows
    for the click label, the CTR model whose product with it is the naive pCTCVR."""

    def __init__(self, schema, emb_dim=8, tower=(64, 32), sparse=False):
        super().__init__()
        self.embedding = FeatureEmbedding(schema, emb_dim, sparse)
        self.mlp = MLP(schema.n_fields * emb_dim, tuple(tower), batch_norm=True)

    def forward(self, dense, sparse):  # (B, n_dense), (B, n_sparse) -> (B,)
        return self.mlp(self.embedding(dense, sparse).flatten(1)).squeeze(-1)
