"""The synthetic click model of Stage 2: Criteo-format rows drawn from a KNOWN probability, so
every experiment can be scored against the best possible model (the oracle). Read it with
01_make_subset.py, the chapter that runs it (--synthetic N); dataset_files.py writes the bytes.

The click model (all parameters drawn from the seed), in one of three regimes (--interactions):
  logit = bias + sum_f w_f[x_f]                            first order (every regime)
  lowrank:    + sum_{i<j} <v_i[x_i], v_j[x_j]>             pairwise, factorized (FM-like), k = 4,
                                                           over the 14 smallest fields + dense
              + sum_{(a,b,c)} g * e_a[x_a] e_b[x_b] e_c[x_c]   three third-order crosses
  dot:        + sum_{a<b} <u_a[x_a], u_b[x_b]>             k-dim dot products between 4 id fields
                                                           of 300 equally frequent values each;
                                                           the 22 other fields mostly missing
  fieldpair:  + sum_{i<j} e_i^T M_ij e_j                   its own matrix per field pair over
                                                           12 categorical + 13 dense fields
  p = sigmoid(logit), the bias found by bisection so that mean(p) = ctr; label ~ Bernoulli(p).
Dense fields enter through z = (log I - mu) / sigma (0 when missing): w_j z (and v_j z, e_j z).
With tasks=2 a second label ("conversion") follows the first: its logit mixes the click signal
with an independent one, s2 = rho * s1 + sqrt(1 - rho^2) * s_own (task_corr = rho).
With tasks="funnel" a conversion can only follow a click (ESMM's world). A latent u ~ N(0, 1) per
row (never written) always moves the CVR, and with selection="latent" also the click:
  pCTR = sigmoid(s1 + b1 + a u), a = latent_std or 0;  pCVR = sigmoid(s2 + b2 + latent_std u)
  click ~ Bernoulli(pCTR); conversion = click AND Bernoulli(pCVR); mean pCTR = ctr, mean pCVR =
  ctr2 over all impressions; s2 mixes s1 as above, rho = +-task_corr or 0 (cvr_relation).
The oracle holds FUNNEL_ORACLE per row: pCTR, pCVR, pCTCVR = pCTR * pCVR (given x and u), and
u integrated out: E[pCVR | x] (the best from x), P(conversion | x, click) (a clicked-rows fit's).
Column layout: label [label2] I1..I13 C1..C26 (40 or 41 tab-separated fields; funnel: label2).

Speed: forked workers draw ~16k-row chunks (the same files for any count), BLAS on one thread.
"""
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits  # scikit-learn's own dependency

import common
from stage2_ctr.dataset_files import DatasetWriter, format_rows, hex_word_table, split_of
from stage2_ctr.train_stats import fingerprint

N_DENSE, N_SPARSE = 13, 26
U64 = np.uint64
REGIMES = ["lowrank", "dot", "fieldpair"]  # what the click model plants beside first order
DOT_STD = 0.8         # dot: std of each pair's dot-product term in the logit (6 pairs)
DOT_VALUES = 300      # dot: values of each id field, equally frequent
FIELDPAIR_DIM = 4     # planted embedding size per field in the fieldpair regime
FIELDPAIR_STD = 1.5   # std of the fieldpair quadratic form in the logit
FUNNEL_ORACLE = ["pctr", "pcvr", "pctcvr", "pcvr_given_x", "pcvr_given_x_click"]
CVR_RELATIONS = {"shared": 1.0, "independent": 0.0, "opposite": -1.0}  # sign of rho (task_corr)


@dataclass
class SyntheticConfig:
    """What decides the generated files (recorded in meta.json)."""
    rows: int = 200_000
    seed: int = 0
    ctr: float = 0.25
    tasks: int = 1            # 1 | 2 | "funnel" (a conversion only after a click)
    task_corr: float = 0.5
    ctr2: float = 0.1         # tasks 2: the second label's rate; funnel: mean pCVR (all rows)
    strength: float = 1.0     # scale of the pairwise + third-order terms (0 = first order)
    split: str = "random"     # random (seeded 8:1:1 per row) | time (the last rows are test)
    val_frac: float = 0.1
    test_frac: float = 0.1
    chunk_rows: int = 16384   # rows per chunk (small chunks stay in the CPU cache)
    workers: int = 2          # processes generating chunks in parallel (same output for any)
    interactions: str = "lowrank"  # lowrank | dot | fieldpair (REGIMES)
    cross_rank: int = 16      # dot: the dimension k of the planted dot products
    side_missing: float = 0.95  # dot: share of rows in which each side field is missing
    selection: str = "observables"  # funnel: what drives the click: observables | latent
    cvr_relation: str = "shared"    # funnel: CVR signal vs click signal (CVR_RELATIONS)
    latent_std: float = 2.0         # funnel: weight of the latent u in the logits


# ------------------------------------------------------------------------- the click model
class ClickModel:
    """The planted model: feature distributions from `seed`, weight tables from `weight_seed`
    (a second task shares the features and draws its own weights). `interactions` picks what
    is planted next to the first-order weights (see REGIMES); every regime draws the same
    features and first-order weights, and 'lowrank' is the original generator, unchanged."""

    def __init__(self, seed, strength=1.0, k=4, weight_seed=None, interactions="lowrank",
                 cross_rank=16, side_missing=0.95):
        if interactions not in REGIMES:
            raise ValueError(f"interactions must be one of {', '.join(REGIMES)}")
        rng = np.random.default_rng([seed, 1])
        self.k, self.interactions, self.cross_rank = k, interactions, cross_rank
        self.side_missing = side_missing
        self.uniform_values = {}  # field -> V: ranks drawn uniformly from V values (dot)
        # vocabularies from 3 to 10^6 values per field, in a shuffled order
        self.vocab = rng.permutation(np.round(np.geomspace(3, 1e6, N_SPARSE)).astype(np.int64))
        self.cat_missing = rng.choice([0.0, 0.0, 0.0, 0.02, 0.1, 0.3], N_SPARSE)
        self.log_vocab = np.log(self.vocab + 1.0).astype(np.float32)
        self.cat_missing = self.cat_missing.astype(np.float32)
        self.dense_mu = rng.uniform(0.0, 4.0, N_DENSE).astype(np.float32)
        self.dense_sigma = rng.uniform(0.8, 2.0, N_DENSE).astype(np.float32)
        self.dense_missing = rng.choice([0.0, 0.0, 0.05, 0.2, 0.45], N_DENSE).astype(np.float32)
        self.hex_salt = rng.integers(0, 2**63)
        if weight_seed is not None:
            rng = np.random.default_rng([weight_seed, 1])
        # first order: larger weights on the small-vocabulary fields (learnable ones)
        scale1 = 0.45 / np.sqrt(np.log10(self.vocab) + 1)
        self.w_cat = [rng.normal(0, s, v + 1).astype(np.float32)  # row v = missing
                      for s, v in zip(scale1, self.vocab)]
        self.w_dense = rng.normal(0, 0.15, N_DENSE).astype(np.float32)
        # pairwise: latent vectors for a subset of fields (small and medium vocabularies)
        order = np.argsort(self.vocab)
        self.pair_fields = np.sort(order[:14])
        sv = np.sqrt(strength) * 0.42 / np.sqrt(k)
        self.v_cat = {f: rng.normal(0, sv, (self.vocab[f] + 1, k)).astype(np.float32)
                      for f in self.pair_fields}
        self.v_dense = rng.normal(0, sv, (N_DENSE, k)).astype(np.float32)
        # third order: three triples of fields with scalar embeddings
        self.triples = [tuple(sorted(rng.choice(order[:10], 3, replace=False)))
                        for _ in range(3)]
        self.gamma = strength * 0.3
        self.e_cat = {f: rng.normal(0, 1, self.vocab[f] + 1).astype(np.float32)
                      for f in {f for t in self.triples for f in t}}
        if interactions != "lowrank":  # the other regimes' parameters: a stream of their own
            regime_rng = np.random.default_rng([weight_seed or seed, 7, REGIMES.index(
                interactions)])
            {"dot": self._init_dot, "fieldpair": self._init_fieldpair}[interactions](
                regime_rng, strength)

    # ------------------------------------------------------------------ the other regimes
    def _init_dot(self, rng, strength):
        """dot: four id fields (user-, ad-, site-, app-like: the fields of 10^4-10^5 values, of
        which DOT_VALUES occur, equally often) whose every pair interacts through a k-dim dot
        product <u_a[x_a], u_b[x_b]> (k = cross_rank; each value one vector for all its pairs).
        Entries are N(0, sigma^2) with sigma^2 = DOT_STD / sqrt(k), so each pair's term has std
        DOT_STD whatever k. The other 22 categorical fields are side information, missing in a
        share side_missing of the rows (a collaborative-filtering layout, like MovieLens; with
        side_missing=0 they are as informative as in the other regimes - see the README for
        what that does to the FM)."""
        big = [f for f in np.argsort(self.vocab) if 1e4 <= self.vocab[f] <= 1e5][:4]
        self.dot_fields = big
        self.dot_pairs = [(a, b) for i, a in enumerate(big) for b in big[i + 1:]]
        sigma = np.sqrt(np.sqrt(strength) * DOT_STD / np.sqrt(self.cross_rank))
        self.dot_vectors = {f: rng.normal(0, sigma, (self.vocab[f] + 1, self.cross_rank))
                            .astype(np.float32) for pair in self.dot_pairs for f in pair}
        self.uniform_values = {f: DOT_VALUES for f in big}
        others = np.setdiff1d(np.arange(N_SPARSE), big)
        self.cat_missing[others] = np.maximum(self.cat_missing[others], self.side_missing)

    def _init_fieldpair(self, rng, strength):
        """fieldpair: the 12 smallest-vocabulary categorical fields and the 13 dense fields get
        a planted d-dim embedding each (FIELDPAIR_DIM; dense: v_j z_j), and every pair of fields
        (i, j) its own random matrix: sum_{i<j} e_i^T M_ij e_j - one quadratic form of full rank
        over the concatenated embeddings, with dense x dense and dense x categorical products
        in it. An FM can only express <e_i, e_j>; a DCN-v2 cross layer any quadratic form."""
        d = FIELDPAIR_DIM
        self.fp_fields = np.sort(np.argsort(self.vocab)[:12])
        self.fp_cat = {f: rng.normal(0, 1, (self.vocab[f] + 1, d)).astype(np.float32)
                       for f in self.fp_fields}
        self.fp_dense = rng.normal(0, 1, (N_DENSE, d)).astype(np.float32)
        n_fields = len(self.fp_fields) + N_DENSE
        m = rng.normal(0, 1, (n_fields * d, n_fields * d)).astype(np.float32)
        block = np.arange(n_fields * d) // d
        m[block[:, None] >= block[None, :]] = 0  # pairs i < j only: no squares of a field
        # scaled so that the term has std FIELDPAIR_STD on rows drawn like the data
        x = self._fieldpair_inputs(*self._calibration_rows())
        m *= np.sqrt(strength) * FIELDPAIR_STD / np.std(np.einsum("ni,ij,nj->n", x, m, x))
        self.fp_matrix = m

    def _calibration_rows(self, n=20_000):
        ranks, _, _, z = self.draw_features(np.random.default_rng([17, 2]), n)
        return np.ascontiguousarray(np.where(ranks < 0, self.vocab, ranks).T), z

    def _fieldpair_inputs(self, idx, z):
        """(n, 25 * d): the planted embeddings of the fieldpair fields, concatenated (idx: the
        (26, n) row ids per field)."""
        cat = [np.take(self.fp_cat[f], idx[f], axis=0) for f in self.fp_fields]
        dense = [z[:, j:j + 1] * self.fp_dense[j] for j in range(N_DENSE)]
        return np.concatenate(cat + dense, axis=1)

    def draw_features(self, rng, n):
        """Ranks (n, 26) with -1 = missing, dense ints (n, 13) with a missing mask, and z."""
        # one uniform per cell: below the field's missing rate -> missing, else rescaled into a
        # Zipf-like (log-uniform) rank: rank = floor(V^u) - 1, so head values dominate
        # (in place where possible: a chunk is a few MB, and every extra pass over it shows)
        u = rng.random((n, N_SPARSE), dtype=np.float32)
        missing = u < self.cat_missing
        u -= self.cat_missing
        u /= 1 - self.cat_missing
        flat = {f: u[:, f].copy() for f in self.uniform_values}
        u *= self.log_vocab
        np.exp(u, out=u)
        u -= 1
        ranks = u.astype(np.int64)
        np.minimum(ranks, self.vocab - 1, out=ranks)
        for f, v in self.uniform_values.items():  # equally popular values (dot regime)
            ranks[:, f] = np.minimum((flat[f] * v).astype(np.int64), v - 1)
        np.copyto(ranks, -1, where=missing)
        z = rng.standard_normal((n, N_DENSE), dtype=np.float32)
        dense_f = self.dense_sigma * z
        dense_f += self.dense_mu
        dense = np.exp(dense_f, out=dense_f).astype(np.int64)
        np.minimum(dense, 99_999_999_999, out=dense)  # 11 digits at most
        neg = rng.random(n, dtype=np.float32) < 0.03  # I2 is -1, -2, -3 now and then
        dense[neg, 1] = -rng.integers(1, 4, neg.sum())
        dense_missing = rng.random((n, N_DENSE), dtype=np.float32) < self.dense_missing
        np.copyto(z, 0, where=dense_missing | (dense < 0))
        return ranks, dense, dense_missing, z

    def logit_parts(self, ranks, z):
        """The planted parts of the logit per row, without the bias, in summation order:
        {first_order, pairwise, third_order} (lowrank), {first_order, dot} or
        {first_order, field_pair}."""
        # one contiguous row of ids per field: np.take on it reads memory in order, where
        # fancy-indexing a strided column of the (n, 26) array jumps 26 ids at a time
        idx = np.ascontiguousarray(np.where(ranks < 0, self.vocab, ranks).T)  # missing -> own row
        first = z @ self.w_dense  # dense fields: w_j z_j (and v_j z_j in the FM below)
        for f in range(N_SPARSE):
            first += np.take(self.w_cat[f], idx[f])
        if self.interactions == "dot":
            dot = np.zeros(len(z), np.float32)
            for a, b in self.dot_pairs:
                dot += np.einsum("nk,nk->n", np.take(self.dot_vectors[a], idx[a], axis=0),
                                 np.take(self.dot_vectors[b], idx[b], axis=0))
            return {"first_order": first, "dot": dot}
        if self.interactions == "fieldpair":
            x = self._fieldpair_inputs(idx, z)
            return {"first_order": first, "field_pair": ((x @ self.fp_matrix) * x).sum(1)}
        v_sum = z @ self.v_dense
        v_sq = (z * z) @ (self.v_dense ** 2)
        # FM identity: sum_{i<j} <v_i, v_j> = 1/2 sum_k [ (sum_i v_ik)^2 - sum_i v_ik^2 ]
        for f in self.pair_fields:
            v = np.take(self.v_cat[f], idx[f], axis=0)
            v_sum += v
            v_sq += v * v
        pair = 0.5 * (v_sum * v_sum - v_sq).sum(1)
        third = np.zeros(len(z), np.float32)
        for a, b, c in self.triples:
            third += self.gamma * (np.take(self.e_cat[a], idx[a]) * np.take(self.e_cat[b], idx[b])
                                   * np.take(self.e_cat[c], idx[c]))
        return {"first_order": first, "pairwise": pair, "third_order": third}

    def hex_of(self, field, ranks):
        """The 8-hex-char value of (field, rank) as a uint32: a stable hash, like Criteo's."""
        x = (U64(field) << U64(40)) ^ ranks.astype(U64) ^ U64(self.hex_salt)
        x = x * U64(0x9E3779B97F4A7C15)
        x = x ^ (x >> U64(29))
        x = x * U64(0xBF58476D1CE4E5B9)
        return (x >> U64(32)).astype(np.uint32)

    def hex_word_tables(self):
        """Per field: rank -> its 8 hex chars as one uint64 word (dataset_files.format_rows)."""
        return [hex_word_table(self.hex_of(f, np.arange(v))) for f, v in enumerate(self.vocab)]


def calibrate_bias(signal, target):
    """Bisection on b so that mean(sigmoid(signal + b)) = target."""
    lo, hi = -30.0, 30.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if np.mean(1 / (1 + np.exp(-(signal + mid)))) > target:
            hi = mid
        else:
            lo = mid
    return (lo + hi) / 2


class Generator:
    """Draws rows chunk by chunk; the same seed gives the same rows in the same order."""

    def __init__(self, cfg):
        self.cfg, self.tasks = cfg, cfg.tasks
        self.model = ClickModel(cfg.seed, cfg.strength, interactions=cfg.interactions,
                                cross_rank=cfg.cross_rank, side_missing=cfg.side_missing)
        self.hex_words = self.model.hex_word_tables()
        cal = np.random.default_rng([cfg.seed, 3])
        ranks, _, _, z = self.model.draw_features(cal, 50_000)
        parts = self.model.logit_parts(ranks, z)
        self.bias = calibrate_bias(sum(parts.values()), cfg.ctr)
        self.signal_std = float(np.std(sum(parts.values())))
        self.part_std = {k: float(np.std(v)) for k, v in parts.items()}
        self.rho = cfg.task_corr  # the second task's mix (funnel: its sign from cvr_relation)
        if self.tasks == "funnel":
            self._init_funnel(cfg, ranks, z, sum(parts.values()), cal)
        elif self.tasks == 2:  # the second task's own signal: another model of the same shape
            self.model2 = ClickModel(cfg.seed, cfg.strength, weight_seed=cfg.seed + 10_000,
                                     interactions=cfg.interactions, cross_rank=cfg.cross_rank,
                                     side_missing=cfg.side_missing)
            own = sum(self.model2.logit_parts(ranks, z).values())
            self.own_scale = self.signal_std / float(np.std(own))
            signal = sum(parts.values())
            s2 = self._mix(signal - signal.mean(), own - own.mean())
            self.bias2 = calibrate_bias(s2, cfg.ctr2)

    def _init_funnel(self, cfg, ranks, z, s1, cal):
        """The CVR's own weights (as tasks=2), rho, and both biases on the calibration rows."""
        self.model2 = ClickModel(cfg.seed, cfg.strength, weight_seed=cfg.seed + 10_000,
                                 interactions=cfg.interactions, cross_rank=cfg.cross_rank,
                                 side_missing=cfg.side_missing)
        own = sum(self.model2.logit_parts(ranks, z).values())
        self.own_scale = self.signal_std / float(np.std(own))
        self.rho = CVR_RELATIONS[cfg.cvr_relation] * cfg.task_corr
        self.click_latent = cfg.latent_std if cfg.selection == "latent" else 0.0
        u = cal.standard_normal(len(z), dtype=np.float32)
        self.bias = calibrate_bias(s1 + self.click_latent * u, cfg.ctr)
        self.bias2 = calibrate_bias(self._mix(s1, own) + cfg.latent_std * u, cfg.ctr2)

    def funnel_rows(self, rng, s1, ranks, z):
        """u, then labels (n, 2) int8 and oracle (n, 5) float32 (FUNNEL_ORACLE): sigmoids at u
        (column 0) and at 32 Gauss-Hermite nodes: E_u[pCVR], E_u[pCTR pCVR] / E_u[pCTR]."""
        own = sum(self.model2.logit_parts(ranks, z).values())
        nodes, weights = np.polynomial.hermite_e.hermegauss(32)
        at = np.c_[rng.standard_normal(len(s1), dtype=np.float32), np.broadcast_to(
            nodes.astype(np.float32), (len(s1), 32))]
        ctr = 1 / (1 + np.exp(-((s1 + self.bias)[:, None] + np.float32(self.click_latent) * at)))
        cvr = 1 / (1 + np.exp(-((self._mix(s1, own) + self.bias2).astype(np.float32)[:, None]
                                + np.float32(self.cfg.latent_std) * at)))  # float32: pCTCVR exact
        w = weights / weights.sum()
        oracle = np.stack([ctr[:, 0], cvr[:, 0], ctr[:, 0] * cvr[:, 0], cvr[:, 1:] @ w,
                           (ctr[:, 1:] * cvr[:, 1:]) @ w / (ctr[:, 1:] @ w)], 1).astype(np.float32)
        click = rng.random(len(s1), dtype=np.float32) < oracle[:, 0]
        convert = click & (rng.random(len(s1), dtype=np.float32) < oracle[:, 1])
        return np.stack([click, convert], 1).astype(np.int8), oracle

    def _mix(self, s1, own):
        rho = self.rho
        return rho * s1 + np.sqrt(1 - rho ** 2) * own * self.own_scale

    def hex_words_of(self, ranks):
        """(n, 26) uint64 hex words (a transposed view: gathered one contiguous field at a time)."""
        idx = np.ascontiguousarray(np.maximum(ranks, 0).T)
        words = np.empty(idx.shape, U64)
        for f in range(N_SPARSE):
            np.take(self.hex_words[f], idx[f], out=words[f])
        return words.T

    def chunk(self, index, n):
        """Chunk number `index` (its own seeded stream, so chunks can be drawn in parallel and
        in any order): dict of labels (n, T) int8, oracle (n, T) float32, the raw features, and
        the planted parts of the logit (to show what each is worth)."""
        rng = np.random.default_rng([self.cfg.seed, 2, index])
        ranks, dense, dense_missing, z = self.model.draw_features(rng, n)
        parts = self.model.logit_parts(ranks, z)
        s1 = sum(parts.values())
        probs = [1 / (1 + np.exp(-(s1 + self.bias)))]
        if self.tasks == "funnel":
            labels, oracle = self.funnel_rows(rng, s1, ranks, z)
        else:
            if self.tasks == 2:
                own = sum(self.model2.logit_parts(ranks, z).values())
                probs.append(1 / (1 + np.exp(-(self._mix(s1, own) + self.bias2))))
            oracle = np.stack(probs, 1).astype(np.float32)
            labels = (rng.random(oracle.shape, dtype=np.float32) < oracle).astype(np.int8)
        return {"labels": labels, "oracle": oracle, "ranks": ranks, "dense": dense,
                "dense_missing": dense_missing, "hex_words": self.hex_words_of(ranks),
                "parts": parts}


# ---------------------------------------------------------------------------------- synthetic
def synthetic_segment(gen, task):
    """Worker: draw a run of consecutive chunks of `gen` and append each split's rows to this
    segment's own part files (big byte strings never cross a process boundary). Synthetic rows
    are i.i.d., so a chunk's split ids can be sorted before they are dealt out: each split's rows
    are then one contiguous range of the chunk, formatted in one go and written with one slice."""
    segment, chunks, out_dir = task
    files = [open(Path(out_dir) / f"{name}.txt.seg{segment:05d}", "wb")
             for name in DatasetWriter.NAMES]
    keep = {s: {"labels": [], "oracle": []} for s in range(3)}
    for index, start, n in chunks:
        c = gen.chunk(index, n)
        cfg = gen.cfg
        split = np.sort(split_of(np.random.default_rng([cfg.seed, 4, index]), n, start,
                                 cfg.rows, cfg.split, cfg.val_frac, cfg.test_frac))
        data, row_at = format_rows(c["labels"], c["dense"], c["dense_missing"], c["hex_words"],
                                   c["ranks"] < 0, row_starts=True)
        bounds = np.searchsorted(split, [0, 1, 2, 3])
        for s in range(3):
            lo, hi = bounds[s], bounds[s + 1]
            if hi > lo:
                files[s].write(data[row_at[lo]:row_at[hi]])
                keep[s]["labels"].append(c["labels"][lo:hi])
                keep[s]["oracle"].append(c["oracle"][lo:hi])
                for part, values in c["parts"].items():
                    keep[s].setdefault("part:" + part, []).append(values[lo:hi])
    for f in files:
        f.close()
    arrays = {s: {k: np.concatenate(v) for k, v in d.items()} for s, d in keep.items()
              if d["labels"]}
    return segment, sum(n for _, _, n in chunks), arrays


MAX_SCORED_ROWS = 4_000_000  # rows per split the oracle's AUC / log loss are computed on


def make_synthetic(cfg, out_dir):
    """Generate cfg.rows rows into out_dir/{train,val,test}.txt + {split}.oracle.npy + meta.json.
    Returns the meta dict (rows, positive rates and the oracle's scores per split)."""
    t0 = time.perf_counter()
    writer = DatasetWriter(out_dir)  # everything goes to a temporary folder, swapped in at the end
    with threadpool_limits(limits=1, user_api="blas"):  # tiny matmuls: BLAS threads only spin
        gen = Generator(cfg)
        arrays = generate_into(gen, cfg, writer)
    writer.close_splits()
    writer.refuse_empty_splits([1 - cfg.val_frac - cfg.test_frac, cfg.val_frac, cfg.test_frac],
                               "ask for more rows (--synthetic N), or set --val-frac / "
                               "--test-frac to 0 for a split you do not need")
    seconds = time.perf_counter() - t0
    report = {}
    for s, name in enumerate(DatasetWriter.NAMES):
        if arrays[s].get("labels"):
            a = {k: np.concatenate(v) for k, v in arrays[s].items()}
            common.save_npy(writer.folder / f"{name}.oracle.npy",
                            a["oracle"][:, 0] if cfg.tasks == 1 else a["oracle"])
            funnel = cfg.tasks == "funnel"  # scored: pCTR on clicks, pCTCVR on conversions
            report[name] = score_oracle(a["labels"].astype(np.float32),
                                        a["oracle"][:, [0, 2]] if funnel else a["oracle"],
                                        {k[5:]: v for k, v in a.items() if k.startswith("part:")})
            if funnel:
                report[name]["funnel"] = score_funnel(a["oracle"])
            # which file these scores belong to: a trainer uses them only on that file
            report[name]["file"] = fingerprint(writer.folder / f"{name}.txt")
    meta = {"script": "stage2_ctr/01_make_subset.py", "kind": "synthetic",
            "config": asdict(cfg),
            "columns": (["label"] + (["label2"] if cfg.tasks in (2, "funnel") else [])
                        + [f"I{i}" for i in range(1, 14)] + [f"C{i}" for i in range(1, 27)]),
            **({"funnel": {"label": "click", "label2": "conversion (only where label = 1)",
                           "oracle_columns": FUNNEL_ORACLE, "rho": gen.rho}}
               if cfg.tasks == "funnel" else {}),
            "generator": planted_structure(gen),
            "splits": report, "rows_per_s": cfg.rows / seconds, "seconds": seconds}
    common.write_json(writer.folder / "meta.json", meta)
    writer.commit()
    return meta


def planted_structure(gen):
    """What meta.json records of the click model: the regime, its fields and scales."""
    m = gen.model
    out = {"interactions": m.interactions, "vocab_sizes": m.vocab.tolist(), "bias": gen.bias,
           "signal_std": gen.signal_std, "part_std": gen.part_std}
    if m.interactions == "lowrank":
        out.update(pair_fields=[f"C{f + 1}" for f in m.pair_fields], k=m.k,
                   triples=[[f"C{f + 1}" for f in t] for t in m.triples])
    elif m.interactions == "dot":
        out.update(dot_fields=[f"C{f + 1}" for f in m.dot_fields], values_per_field=DOT_VALUES,
                   dot_pairs=[[f"C{a + 1}", f"C{b + 1}"] for a, b in m.dot_pairs],
                   cross_rank=m.cross_rank, dot_pair_std=DOT_STD,
                   side_missing=m.side_missing)
    else:
        out.update(fieldpair_fields=[f"C{f + 1}" for f in m.fp_fields] + [
            f"I{j + 1}" for j in range(N_DENSE)], fieldpair_dim=FIELDPAIR_DIM)
    return out


def generate_into(gen, cfg, writer):
    """Draw every chunk in worker processes and stitch their segments into the writer's files
    in order as they finish (the output is the same for any number of workers; appending
    overlaps with the workers still generating). Returns per split the labels, oracle and
    first-order logits, for scoring."""
    from tqdm import tqdm
    chunks = [(i, start, min(cfg.chunk_rows, cfg.rows - start))
              for i, start in enumerate(range(0, cfg.rows, cfg.chunk_rows))]
    per_segment = max(1, min(16, len(chunks) // (4 * cfg.workers)))
    segments = [(k, chunks[i:i + per_segment], str(writer.folder))
                for k, i in enumerate(range(0, len(chunks), per_segment))]
    results = common.fork_map(synthetic_segment, gen, segments, cfg.workers)
    done, next_segment = {}, 0
    kept = {s: {} for s in range(3)}
    with tqdm(total=cfg.rows, unit=" rows", unit_scale=True, desc="generating") as bar:
        for segment, n, arrays in results:
            done[segment] = arrays
            bar.update(n)
            while next_segment in done:  # stitch the segments in order as they arrive
                arrays = done.pop(next_segment)
                for s, name in enumerate(DatasetWriter.NAMES):
                    labels = arrays[s]["labels"] if s in arrays else np.zeros((0, 1), np.int8)
                    writer.append_part(s, writer.folder / f"{name}.txt.seg{next_segment:05d}",
                                       len(labels), int(labels[:, 0].sum()))
                    for k, v in arrays.get(s, {}).items():
                        kept[s].setdefault(k, []).append(v)
                next_segment += 1
    return kept


def expected_auc(p_true, score):
    """The AUC of `score` against labels drawn from p_true, in expectation: each row is a positive
    of weight p and a negative of weight 1 - p (CVR over ALL impressions has no labels)."""
    from sklearn.metrics import roc_auc_score
    p_true = np.asarray(p_true, np.float64)
    return float(roc_auc_score(np.r_[np.ones(len(p_true)), np.zeros(len(p_true))],
                               np.r_[score, score], sample_weight=np.r_[p_true, 1 - p_true]))


def score_funnel(oracle):
    """Rates over impressions and clicks; entire-space CVR AUC of the oracle's columns."""
    o = oracle[::-(-len(oracle) // MAX_SCORED_ROWS)].astype(np.float64)
    return {"mean_pctr": o[:, 0].mean(), "mean_pcvr": o[:, 1].mean(), "mean_pctcvr":
            o[:, 2].mean(), "cvr_among_clicks": o[:, 2].sum() / o[:, 0].sum(),
            **{f"cvr_auc_{name}": expected_auc(o[:, 1], o[:, k])
               for k, name in [(1, "oracle"), (3, "given_x"), (4, "given_x_click")]}}


def score_oracle(y, oracle, parts):
    """Rows, positive rate and the oracle's AUC / log loss per task; for the click task also
    the first-order part alone (what LR could reach at best) and the oracle with each planted
    part removed (what that part is worth), scored on the same labels. sklearn's AUC sorts and
    copies to float64 (~50 bytes a row): past MAX_SCORED_ROWS the scores come from every k-th
    row, so a 20M-row file needs no more memory than a 4M one."""
    from sklearn.metrics import log_loss, roc_auc_score
    r = {"rows": int(len(y)), "positive_rate": y.mean(0).round(4).tolist()}
    stride = -(-len(y) // MAX_SCORED_ROWS)
    y, oracle = y[::stride], oracle[::stride]
    if len(np.unique(y[:, 0])) == 2:
        r["oracle_rows_scored"] = int(len(y))
        r["oracle_auc"] = [float(roc_auc_score(y[:, t], oracle[:, t]))
                           for t in range(y.shape[1])]
        r["oracle_logloss"] = [float(log_loss(y[:, t], oracle[:, t], labels=[0, 1]))
                               for t in range(y.shape[1])]
        parts = {k: v[::stride] for k, v in parts.items()}
        total = sum(parts.values())
        r["oracle_auc_first_order_only"] = float(roc_auc_score(y[:, 0], parts["first_order"]))
        r["oracle_auc_without"] = {k: float(roc_auc_score(y[:, 0], total - v))
                                   for k, v in parts.items()}
    return r
