"""What the Stage 3 chapters share: reading Stage 1 / Stage 2 artefacts (with the line that says
which script to run first when one is missing) and the Adult input encoder. The training loop
for in-memory data (fit) lives in stage2_ctr/training.py, next to Stage 2's optimizers.

The models themselves live in stage2_ctr/models/ (layers.py + mtl.py): one home for layers;
the helpers every stage uses (atomic writes, metrics, mean ± std) in common.py.
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: plain imports
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import common  # noqa: E402
from stage2_ctr import criteo  # noqa: E402
from stage2_ctr.models.mtl import build_mtl  # noqa: E402

HERE = Path(__file__).resolve().parent
ADULT_NPZ = common.ROOT / "stage1_adult" / "adult_stage1.npz"


class MissingArtefact(SystemExit):
    """A file another stage writes is missing: one line naming it and the command to run."""

    def __init__(self, path, command):
        super().__init__(f"error: {path} not found: run `{command}` first")


def setup(threads, seed=None):
    torch.set_num_threads(threads)
    if seed is not None:
        torch.manual_seed(seed)
        np.random.seed(seed)


# -------------------------------------------------------------------------------- Stage 1 data
ADULT_INPUTS = ["x_num", "x_bin", "x_binfrac", "x_tok", "x_cat"]
ADULT_TASKS = ["income", "married"]


def load_adult(path=ADULT_NPZ):
    """Stage 1's npz -> {split: (inputs dict, labels (N, 2) [income, married])}, meta."""
    path = Path(path)
    meta_path = path.with_name(path.stem + "_meta.json")
    if not path.exists() or not meta_path.exists():
        raise MissingArtefact(path, "python stage1_adult/02_preprocess.py")
    meta = json.loads(meta_path.read_text())
    if meta.get("keep_leaky"):
        raise SystemExit(f"error: {path} keeps the leaky columns; Stage 3 uses the leak-free "
                         "npz of `python stage1_adult/02_preprocess.py`")
    data = {}
    with np.load(path, allow_pickle=False) as z:
        for split in ["train", "val", "test"]:
            inputs = {k: torch.from_numpy(z[f"{k}_{split}"]) for k in ADULT_INPUTS}
            y = torch.from_numpy(np.stack([z[f"y_{t}_{split}"] for t in ADULT_TASKS], 1))
            data[split] = (inputs, y.float())
    return data, meta


class AdultEncoder(nn.Module):
    """Every index column of Stage 1's npz - categoricals, numeric quantile bins, exact-value
    capital tokens - looked up in ONE table (field f's index i at row offset_f + i), plus each
    numeric's position inside its bin and its standardized value: one flat vector per row."""

    def __init__(self, meta, dim=8):
        super().__init__()
        cards = ([meta["cardinalities"][c] for c in meta["categorical_columns"]]
                 + [meta["n_bins"][c] for c in meta["numeric_columns"]]
                 + [len(meta["token_vocabs"][c]) + 1 for c in meta["token_columns"]])
        self.register_buffer("offsets", torch.tensor(np.cumsum([0] + cards[:-1])))
        self.table = nn.Embedding(sum(cards), dim)
        nn.init.normal_(self.table.weight, std=0.1)
        n_num = len(meta["numeric_columns"])
        self.out_dim = len(cards) * dim + 2 * n_num

    def forward(self, x):  # dict of (B, ...) Adult inputs -> (B, d)
        idx = torch.cat([x["x_cat"], x["x_bin"], x["x_tok"]], dim=1) + self.offsets
        return torch.cat([self.table(idx).flatten(1), x["x_binfrac"], x["x_num"]], dim=1)


class AdultMultiTask(nn.Module):
    """AdultEncoder -> a multi-task block from stage2_ctr/models/mtl.py -> (B, T) logits."""

    def __init__(self, meta, block_name, n_tasks=2, emb_dim=8, **block_kw):
        super().__init__()
        self.encoder = AdultEncoder(meta, emb_dim)
        self.block = build_mtl(block_name, self.encoder.out_dim, n_tasks, **block_kw)

    def forward(self, x):  # dict of (B, ...) Adult inputs -> (B, T)
        return self.block(self.encoder(x))


# -------------------------------------------------------------------------------- Stage 2 data
def load_criteo(path, n_labels=1, hash_bits=18, stats=None):
    """A whole Criteo-format file through Stage 2's streaming loader, kept in memory as
    ({"dense", "sparse"}, labels (N, T)) - fine for the few hundred MB these experiments use."""
    path = Path(path)
    stream = criteo.CriteoStream([path], 1 << 16, hash_bits, dense_stats=stats,
                                 n_labels=n_labels)
    parts = list(stream)
    dense, sparse, label = (torch.cat(p) for p in zip(*parts))
    return {"dense": dense, "sparse": sparse}, label.reshape(len(label), -1).float()


def oracle_of(path):
    """The synthetic data's true click (and conversion) probabilities for the rows of `path`."""
    path = Path(path)
    o = np.load(path.with_name(path.name.split(".")[0] + ".oracle.npy"), allow_pickle=False)
    return o.reshape(len(o), -1)
