"""Stage 1's model and training loop, importable: the shared-bottom multi-task MLP with its
numeric encodings, batches from the npz, the loop with early stopping, and run(config), which
03_train_mtml.py (one run), 04_mtml_tradeoff.py and 05_what_matters.py (sweeps) call.

Read it with stage1_adult/03_train_mtml.py: model first (the encodings, then SharedBottomMTL),
then train_model(), then run().
"""
import copy
import json
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.metrics import accuracy_score, log_loss, roc_auc_score
from tqdm import tqdm

import common

HERE = Path(__file__).resolve().parent
SCHEMA_VERSION = 1
TASKS = {"income": ["income"], "married": ["married"], "both": ["income", "married"]}
ENCODINGS = ["standardize", "bins", "ple", "ple+tokens"]


class NpzError(ValueError):
    """The npz or its meta is missing or from another schema: the message says to run 02."""


@dataclass
class MTMLConfig:
    """Everything that decides a Stage 1 run's numbers (written into metrics.json)."""
    npz: str = str(HERE / "adult_stage1.npz")
    tasks: str = "both"            # both = multi-task; income / married = single-task
    wA: float = 1.0                # weight of the income loss
    wB: float = 1.0                # weight of the married loss
    num_encoding: str = "ple+tokens"
    num_dim: int = 8
    max_cat_dim: int = 16
    hidden: tuple = (256, 128)
    dropout: float = 0.2
    lr: float = 1e-3
    weight_decay: float = 1e-4     # AdamW
    batch_size: int = 256
    epochs: int = 30
    patience: int = 5
    loader: str = "slice"          # slice | dataloader | batch-sampler | device (LOADERS)
    device: str = "auto"
    threads: int = 2
    seed: int = 0


def config_error(cfg):
    """A one-line reason the config cannot train, or None."""
    if cfg.wA < 0 or cfg.wB < 0:
        return "--wA and --wB must be >= 0"
    weights = {"income": cfg.wA, "married": cfg.wB}
    if all(weights[t] == 0 for t in TASKS[cfg.tasks]):
        return f"--tasks {cfg.tasks} with every task weight 0 trains nothing"
    if cfg.tasks == "both" and cfg.wA == 0:
        return "--wA 0 with --tasks both: early stopping follows income; use --tasks married"
    return None


# ------------------------------------------------------------------------------------- data
def load_npz(path):
    """Read the npz and its meta; anything missing or from another schema -> NpzError."""
    path = Path(path)
    meta_path = path.with_name(path.stem + "_meta.json")
    hint = "run `python stage1_adult/02_preprocess.py` first"
    if not path.exists() or not meta_path.exists():
        raise NpzError(f"{path} or its {meta_path.name} not found: {hint}")
    meta = json.loads(meta_path.read_text())
    if meta.get("schema_version") != SCHEMA_VERSION:
        raise NpzError(f"{path} is from another schema version "
                       f"({meta.get('schema_version')} != {SCHEMA_VERSION}): {hint}")
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {}
            for split in ["train", "val", "test"]:
                data[split] = {k: torch.from_numpy(z[f"{k}_{split}"]) for k in
                               ["x_num", "x_bin", "x_binfrac", "x_tok", "x_cat",
                                "y_income", "y_married"]}
    except KeyError as e:
        raise NpzError(f"{path} lacks array {e}: {hint}") from None
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise NpzError(f"{path}: truncated or not an npz ({type(e).__name__}): {hint}") from None
    return data, meta


def batches_slice(data, batch_size, shuffle, generator):
    """Batches cut from preloaded tensors: one gather per batch, no per-sample Python. The
    order is drawn on the CPU (the same run on every device) and gathers where the data is."""
    n = len(data["y_income"])
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    order = order.to(data["y_income"].device)
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        yield {k: v[idx] for k, v in data.items()}


def batches_dataloader(data, batch_size, shuffle, generator):
    """The textbook way: TensorDataset + DataLoader. Each sample is indexed in Python and the
    default collate stacks them: fine for images, the bottleneck for small tabular rows."""
    keys = list(data)
    ds = torch.utils.data.TensorDataset(*[data[k] for k in keys])
    dl = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=shuffle,
                                     generator=generator)
    for tensors in dl:
        yield dict(zip(keys, tensors))


def batches_batch_sampler(data, batch_size, shuffle, generator):
    """The same DataLoader, but its sampler yields whole batches of indices (BatchSampler) and
    batch_size=None turns the collate off: the dataset is indexed once per batch with a list,
    one gather per tensor - the DataLoader API at nearly the speed of slicing."""
    keys = list(data)
    ds = torch.utils.data.TensorDataset(*[data[k] for k in keys])
    order = (torch.utils.data.RandomSampler(ds, generator=generator) if shuffle
             else torch.utils.data.SequentialSampler(ds))
    sampler = torch.utils.data.BatchSampler(order, batch_size, drop_last=False)
    for tensors in torch.utils.data.DataLoader(ds, sampler=sampler, batch_size=None):
        yield dict(zip(keys, tensors))


# how batches are cut; "device" slices tensors that run() has already moved to the device
LOADERS = {"slice": batches_slice, "dataloader": batches_dataloader,
           "batch-sampler": batches_batch_sampler, "device": batches_slice}


# ------------------------------------------------------------------------------------ model
def cat_emb_dim(cardinality, cap):
    """fastai's rule of thumb: grows like card^0.56, so a 3-value field gets 3 dims and a
    40-value field 13; capped because Adult has little data per category."""
    return int(min(cap, round(1.6 * cardinality ** 0.56)))


class PiecewiseLinearEmbedding(nn.Module):
    """Numeric field f with bins b_0 < b_1 < ... : encode x as e_t = clip((x - b_{t-1}) /
    (b_t - b_{t-1}), 0, 1), i.e. [1, 1, ..., frac, 0, 0] (Gorishniy et al. 2022, PLE), then
    emb_f = ReLU(sum_t e_t * W_f[t] + c_f). With frac forced to 0 it is a cumulative bin
    embedding; the frac term keeps order and position inside the bin."""

    def __init__(self, n_bins, dim, use_frac=True):
        super().__init__()
        self.n_bins = n_bins  # list: bins per field
        self.use_frac = use_frac
        self.max_bins = max(n_bins)
        self.weight = nn.Parameter(torch.randn(len(n_bins), self.max_bins, dim) * 0.1)
        self.bias = nn.Parameter(torch.zeros(len(n_bins), dim))
        self.register_buffer("t", torch.arange(self.max_bins))

    def forward(self, bin_idx, frac):  # (B, F) int64, (B, F) float -> (B, F, dim)
        b = bin_idx.unsqueeze(-1)
        enc = (self.t < b).float()
        if self.use_frac:
            enc = enc + (self.t == b).float() * frac.unsqueeze(-1)
        return F.relu(torch.einsum("bft,ftd->bfd", enc, self.weight) + self.bias)


class FieldEmbedding(nn.Module):
    """Several index fields in one table: field f's index i lives at row offset_f + i."""

    def __init__(self, cardinalities, dim):
        super().__init__()
        self.table = nn.Embedding(sum(cardinalities), dim)
        nn.init.normal_(self.table.weight, std=0.1)
        self.register_buffer("offsets", torch.tensor(np.cumsum([0] + cardinalities[:-1])))

    def forward(self, idx):  # (B, F) -> (B, F, dim)
        return self.table(idx + self.offsets)


class SharedBottomMTL(nn.Module):
    """[categoricals -> embeddings] + [numerics -> encoding] -> concat -> shared MLP -> one
    linear head (logit) per task. Categorical fields get their own table each because their
    sizes differ (3..40) and so do their embedding dims; Stage 2 uses one table for 26 fields."""

    def __init__(self, meta, tasks, encoding, num_dim, max_cat_dim, hidden, dropout):
        super().__init__()
        self.tasks, self.encoding = tasks, encoding
        cards = [meta["cardinalities"][c] for c in meta["categorical_columns"]]
        dims = [cat_emb_dim(c, max_cat_dim) for c in cards]
        self.cat_embs = nn.ModuleList(nn.Embedding(c, d) for c, d in zip(cards, dims))
        n_bins = [meta["n_bins"][c] for c in meta["numeric_columns"]]
        width = sum(dims)
        if encoding == "standardize":
            width += len(n_bins)
        elif encoding == "bins":
            self.num_emb = FieldEmbedding(n_bins, num_dim)
            width += len(n_bins) * num_dim
        else:  # ple, ple+tokens
            self.num_emb = PiecewiseLinearEmbedding(n_bins, num_dim)
            width += len(n_bins) * num_dim
        if encoding == "ple+tokens":
            tok_cards = [len(meta["token_vocabs"][c]) + 1 for c in meta["token_columns"]]
            self.tok_emb = FieldEmbedding(tok_cards, num_dim)
            width += len(tok_cards) * num_dim
        layers = []
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(dropout)]
            width = h
        self.backbone = nn.Sequential(*layers)
        self.heads = nn.ModuleDict({t: nn.Linear(width, 1) for t in tasks})

    def forward(self, batch):  # dict of (B, ...) inputs -> {task: logits (B,)}
        parts = [emb(batch["x_cat"][:, i]) for i, emb in enumerate(self.cat_embs)]
        if self.encoding == "standardize":
            parts.append(batch["x_num"])
        elif self.encoding == "bins":
            parts.append(self.num_emb(batch["x_bin"]).flatten(1))
        else:
            parts.append(self.num_emb(batch["x_bin"], batch["x_binfrac"]).flatten(1))
        if self.encoding == "ple+tokens":
            parts.append(self.tok_emb(batch["x_tok"]).flatten(1))
        h = self.backbone(torch.cat(parts, dim=1))
        return {t: head(h).squeeze(-1) for t, head in self.heads.items()}  # logits


# ----------------------------------------------------------------------------- train / eval
@torch.no_grad()
def predict(model, data, device, batch_size=8192):
    model.eval()
    out = {t: [] for t in model.tasks}
    for batch in batches_slice(data, batch_size, False, None):
        logits = model({k: v.to(device) for k, v in batch.items()})
        for t in model.tasks:
            out[t].append(torch.sigmoid(logits[t]).float().cpu())
    return {t: torch.cat(v).numpy() for t, v in out.items()}


def evaluate(model, data, device):
    probs = predict(model, data, device)
    metrics = {}
    for t, p in probs.items():
        y = data[f"y_{t}"].numpy()
        metrics[t] = {"auc": float(roc_auc_score(y, p)),
                      "logloss": float(log_loss(y, np.clip(p, 1e-7, 1 - 1e-7), labels=[0, 1])),
                      "accuracy": float(accuracy_score(y, p > 0.5))}
    return metrics


def train_step(model, opt, batch, task_weights):
    """One AdamW step on L = sum_t w_t * BCE(logit_t, y_t) over the model's tasks; returns the
    loss detached, on the device (no host sync)."""
    logits = model(batch)
    loss = sum(task_weights[t] * F.binary_cross_entropy_with_logits(logits[t], batch[f"y_{t}"])
               for t in model.tasks)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()


def train_model(model, data, cfg, device, quiet=False):
    """AdamW on L = wA * BCE(income) + wB * BCE(married) (the tasks the model has); early stop
    on the validation AUC of the main task (income when present), best epoch restored.
    Returns (history, best epoch, training samples/s)."""
    task_weights = {"income": cfg.wA, "married": cfg.wB}
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    make_batches = LOADERS[cfg.loader]
    main_task = model.tasks[0]  # income when present
    best = {"auc": -1.0, "epoch": -1, "state": None}
    history, samples, train_time = [], 0, 0.0
    non_blocking = device.type == "cuda"
    bar = tqdm(range(cfg.epochs), desc="epochs", disable=quiet, leave=False)
    for epoch in bar:
        model.train()
        t0, n_batches = time.perf_counter(), 0
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # on the device: no sync
        for batch in make_batches(data["train"], cfg.batch_size, True, gen):
            batch = {k: v.to(device, non_blocking=non_blocking) for k, v in batch.items()}
            loss_sum += train_step(model, opt, batch, task_weights)
            n_batches += 1
            samples += len(batch["y_income"])
        train_time += time.perf_counter() - t0
        val = evaluate(model, data["val"], device)
        loss_sum = loss_sum.item()
        history.append({"epoch": epoch + 1, "train_loss": loss_sum / n_batches,
                        **{f"val_auc_{t}": m["auc"] for t, m in val.items()}})
        bar.set_postfix(loss=f"{loss_sum / n_batches:.4f}",
                        **{f"auc_{t}": f"{m['auc']:.4f}" for t, m in val.items()})
        if val[main_task]["auc"] > best["auc"]:
            best = {"auc": val[main_task]["auc"], "epoch": epoch + 1,
                    "state": copy.deepcopy(model.state_dict())}
        elif epoch + 1 - best["epoch"] >= cfg.patience:
            break
    model.load_state_dict(best["state"])  # restore the best epoch on validation
    return history, best["epoch"], samples / max(train_time, 1e-9)


# ------------------------------------------------------------------------------------ a run
def plot_curves(history, path):
    plt = common.pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    epochs = [h["epoch"] for h in history]
    ax1.plot(epochs, [h["train_loss"] for h in history])
    ax1.set(xlabel="epoch", ylabel="weighted train loss", title="training loss")
    for key in [k for k in history[0] if k.startswith("val_auc_")]:
        ax2.plot(epochs, [h[key] for h in history], label=key[len("val_auc_"):])
    ax2.set(xlabel="epoch", ylabel="AUC", title="validation AUC")
    ax2.legend()
    fig.tight_layout()
    common.save_figure(fig, path)


def run(cfg, run_dir=None, quiet=False):
    """Train once on cfg; evaluate val and test with the best epoch's weights. With run_dir,
    write metrics.json, curves.png and model.pt there. Returns the metrics dict."""
    error = config_error(cfg)
    if error:
        raise ValueError(error)
    t_start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    common.set_threads(cfg.threads)
    device = common.resolve_device(cfg.device)
    data, meta = load_npz(cfg.npz)
    if meta["keep_leaky"] and cfg.tasks == "married":
        raise NpzError("--tasks married on a --keep-leaky npz: marital-status is an input, so "
                       "the label is read off the features; rerun 02 without --keep-leaky")
    tasks = TASKS[cfg.tasks]
    if cfg.loader == "device":  # the training split resident on the device: no copy per step
        data["train"] = {k: v.to(device) for k, v in data["train"].items()}
    elif device.type == "cuda":  # pinned host memory makes the .to(device, non_blocking) async
        data["train"] = {k: v.pin_memory() for k, v in data["train"].items()}
    model = SharedBottomMTL(meta, tasks, cfg.num_encoding, cfg.num_dim, cfg.max_cat_dim,
                            cfg.hidden, cfg.dropout).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    if not quiet:
        print(f"device {device} | train {len(data['train']['y_income']):,} rows | tasks {tasks} "
              f"| numerics: {cfg.num_encoding} | dropped: {meta['dropped_columns'] or 'none'} "
              f"| {n_params:,} parameters")
        if meta["keep_leaky"] and "married" in tasks:
            print("note: this npz keeps marital-status/relationship, so task B is leaked")
    history, best_epoch, samples_per_s = train_model(model, data, cfg, device, quiet)
    metrics = {
        "script": "stage1_adult/03_train_mtml.py", "model": "shared_bottom_mlp",
        "dataset": Path(cfg.npz).name, "device": str(device), "seed": cfg.seed,
        "config": asdict(cfg), "tasks": tasks, "dropped_columns": meta["dropped_columns"],
        "splits": {s: evaluate(model, data[s], device) for s in ["val", "test"]},
        "best_epoch": best_epoch, "history": history, "parameters": n_params,
        "train_samples_per_s": samples_per_s, "wall_s": time.perf_counter() - t_start}
    if run_dir is not None:
        run_dir = Path(run_dir)
        common.write_json(run_dir / "metrics.json", metrics)
        common.torch_save(model.state_dict(), run_dir / "model.pt")
        plot_curves(history, run_dir / "curves.png")
        metrics["run_dir"] = str(run_dir)
    return metrics


def run_seeds(cfg, seeds):
    """The same configuration once per seed (no run folders): for the sweeps in 04 and 05."""
    from dataclasses import replace
    return [run(replace(cfg, seed=s), quiet=True) for s in seeds]
