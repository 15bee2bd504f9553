"""Stage 1, step 3: a shared-bottom multi-task MLP on Adult (task A income >50K, task B married).

What you learn here: embeddings for categoricals *and* for numerics (a plain standardized number is
the weakest way to feed a net: bins, piecewise-linear encodings and exact-value tokens are what let
an MLP match gradient boosting on tabular data); one shared backbone with two heads trained on
L = wA*LA + wB*LB (BCEWithLogits); early stopping on validation AUC; and why a DataLoader that
indexes one sample at a time is slow (--loader dataloader vs slice).

Run:    python stage1_adult/03_train_mtml.py                       # both tasks, defaults
        python stage1_adult/03_train_mtml.py --tasks income        # single-task baseline
        python stage1_adult/03_train_mtml.py --num-encoding standardize
        python stage1_adult/03_train_mtml.py --npz stage1_adult/adult_stage1_leaky.npz --tasks income
Reads:  stage1_adult/adult_stage1.npz + _meta.json (from 02_preprocess.py)
Writes: runs/<name>/metrics.json, runs/<name>/curves.png, runs/<name>/model.pt
Time:   ~10-20 s on 2 CPU cores.
"""
import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.metrics import accuracy_score, log_loss, roc_auc_score
from tqdm import tqdm

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from adult_data import atomic_write  # noqa: E402

SCHEMA_VERSION = 1
TASKS = {"income": ["income"], "married": ["married"], "both": ["income", "married"]}
ENCODINGS = ["standardize", "bins", "ple", "ple+tokens"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--npz", default=str(HERE / "adult_stage1.npz"), help="output of 02")
    p.add_argument("--tasks", choices=list(TASKS), default="both",
                   help="both = multi-task; income / married = single-task baselines")
    p.add_argument("--wA", type=float, default=1.0, help="weight of the income loss")
    p.add_argument("--wB", type=float, default=1.0, help="weight of the married loss")
    p.add_argument("--num-encoding", choices=ENCODINGS, default="ple+tokens",
                   help="how numerics enter the net: standardized value, quantile-bin embedding, "
                        "piecewise-linear encoding (PLE), or PLE + exact-value capital tokens")
    p.add_argument("--num-dim", type=int, default=8, help="embedding size of each numeric field")
    p.add_argument("--max-cat-dim", type=int, default=16,
                   help="cap of the categorical embedding size min(cap, round(1.6*card^0.56))")
    p.add_argument("--hidden", default="256,128", help="shared backbone layer sizes")
    p.add_argument("--dropout", type=float, default=0.2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--patience", type=int, default=5, help="epochs without val AUC gain to stop")
    p.add_argument("--loader", choices=["slice", "dataloader"], default="slice",
                   help="slice = batches cut from preloaded tensors; dataloader = TensorDataset "
                        "+ DataLoader (per-sample indexing and collate)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--run-name", default=None, help="runs/<run-name>/ (default from the config)")
    p.add_argument("--runs-dir", default=str(ROOT / "runs"), help="parent folder of run folders")
    p.add_argument("--no-save", action="store_true", help="write no run folder (sweeps)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or table")
    args = p.parse_args(argv)
    if args.wA < 0 or args.wB < 0:
        p.error("--wA and --wB must be >= 0")
    tasks = TASKS[args.tasks]
    weights = {"income": args.wA, "married": args.wB}
    if all(weights[t] == 0 for t in tasks):
        p.error(f"--tasks {args.tasks} with every task weight 0 trains nothing")
    if args.tasks == "both" and args.wA == 0:
        p.error("--wA 0 with --tasks both: early stopping follows income; use --tasks married")
    args.hidden_sizes = [int(h) for h in args.hidden.split(",") if h]
    return args, p


# ------------------------------------------------------------------------------------- data
def load_npz(path, parser):
    """Read the npz and its meta; anything missing or from another schema -> run 02 first."""
    path = Path(path)
    meta_path = path.with_name(path.stem + "_meta.json")
    hint = "run `python stage1_adult/02_preprocess.py` first"
    if not path.exists() or not meta_path.exists():
        parser.error(f"{path} or its {meta_path.name} not found: {hint}")
    meta = json.loads(meta_path.read_text())
    if meta.get("schema_version") != SCHEMA_VERSION:
        parser.error(f"{path} is from another schema version "
                     f"({meta.get('schema_version')} != {SCHEMA_VERSION}): {hint}")
    with np.load(path, allow_pickle=False) as z:
        data = {}
        for split in ["train", "val", "test"]:
            try:
                data[split] = {k: torch.from_numpy(z[f"{k}_{split}"]) for k in
                               ["x_num", "x_bin", "x_binfrac", "x_tok", "x_cat",
                                "y_income", "y_married"]}
            except KeyError as e:
                parser.error(f"{path} lacks array {e}: {hint}")
    return data, meta


def batches_slice(data, batch_size, shuffle, generator):
    """Batches cut from preloaded tensors: one gather per batch, no per-sample Python."""
    n = len(data["y_income"])
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
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

    def forward(self, batch):
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


def train(model, data, args, device, task_weights):
    """AdamW on L = sum_t w_t * BCEWithLogits_t; early stop on val AUC of the main task."""
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    gen = torch.Generator().manual_seed(args.seed)
    make_batches = batches_slice if args.loader == "slice" else batches_dataloader
    main_task = model.tasks[0]  # income when present
    best = {"auc": -1.0, "epoch": -1, "state": None}
    history, samples, train_time = [], 0, 0.0
    non_blocking = device.type == "cuda"
    bar = tqdm(range(args.epochs), desc="epochs", disable=args.quiet, leave=False)
    for epoch in bar:
        model.train()
        t0, loss_sum, n_batches = time.perf_counter(), 0.0, 0
        for batch in make_batches(data["train"], args.batch_size, True, gen):
            batch = {k: v.to(device, non_blocking=non_blocking) for k, v in batch.items()}
            logits = model(batch)
            loss = sum(task_weights[t] * F.binary_cross_entropy_with_logits(
                logits[t], batch[f"y_{t}"]) for t in model.tasks)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum, n_batches = loss_sum + loss.item(), n_batches + 1
            samples += len(batch["y_income"])
        train_time += time.perf_counter() - t0
        val = evaluate(model, data["val"], device)
        history.append({"epoch": epoch + 1, "train_loss": loss_sum / n_batches,
                        **{f"val_auc_{t}": m["auc"] for t, m in val.items()}})
        bar.set_postfix(loss=f"{loss_sum / n_batches:.4f}",
                        **{f"auc_{t}": f"{m['auc']:.4f}" for t, m in val.items()})
        if val[main_task]["auc"] > best["auc"]:
            best = {"auc": val[main_task]["auc"], "epoch": epoch + 1,
                    "state": copy.deepcopy(model.state_dict())}
        elif epoch + 1 - best["epoch"] >= args.patience:
            break
    model.load_state_dict(best["state"])  # restore the best epoch on validation
    return history, best["epoch"], samples / max(train_time, 1e-9)


# ----------------------------------------------------------------------------------- report
def plot_curves(history, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    epochs = [h["epoch"] for h in history]
    ax1.plot(epochs, [h["train_loss"] for h in history])
    ax1.set(xlabel="epoch", ylabel="weighted train loss", title="training loss")
    for key in [k for k in history[0] if k.startswith("val_auc_")]:
        ax2.plot(epochs, [h[key] for h in history], label=key[len("val_auc_"):])
    ax2.set(xlabel="epoch", ylabel="AUC", title="validation AUC")
    ax2.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def run(argv=None):
    """Train once and return the metrics dict (04_mtml_tradeoff.py calls this)."""
    args, parser = parse_args(argv)
    t_start = time.perf_counter()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    data, meta = load_npz(args.npz, parser)
    if meta["keep_leaky"] and args.tasks == "married":
        parser.error("--tasks married on a --keep-leaky npz: marital-status is an input, so the "
                     "label is read off the features; rerun 02 without --keep-leaky")
    tasks = TASKS[args.tasks]
    task_weights = {"income": args.wA, "married": args.wB}
    if device.type == "cuda":  # pinned host memory makes the .to(device, non_blocking) async
        data["train"] = {k: v.pin_memory() for k, v in data["train"].items()}

    model = SharedBottomMTL(meta, tasks, args.num_encoding, args.num_dim, args.max_cat_dim,
                            args.hidden_sizes, args.dropout).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    if not args.quiet:
        print(f"device {device} | train {len(data['train']['y_income']):,} rows | tasks {tasks} "
              f"| numerics: {args.num_encoding} | dropped: {meta['dropped_columns'] or 'none'} "
              f"| {n_params:,} parameters")
        if meta["keep_leaky"] and "married" in tasks:
            print("note: this npz keeps marital-status/relationship, so task B is leaked")

    history, best_epoch, samples_per_s = train(model, data, args, device, task_weights)
    splits = {s: evaluate(model, data[s], device) for s in ["val", "test"]}
    name = args.run_name or (f"stage1_{args.tasks}_{args.num_encoding.replace('+', '_')}"
                             f"_wA{args.wA:g}_wB{args.wB:g}_s{args.seed}")
    metrics = {
        "script": "stage1_adult/03_train_mtml.py", "model": "shared_bottom_mlp",
        "dataset": Path(args.npz).name, "device": str(device), "seed": args.seed,
        "config": {k: v for k, v in vars(args).items() if k != "hidden_sizes"},
        "tasks": tasks, "dropped_columns": meta["dropped_columns"],
        "splits": splits, "best_epoch": best_epoch, "history": history,
        "parameters": n_params, "train_samples_per_s": samples_per_s,
        "wall_s": time.perf_counter() - t_start,
    }
    if not args.no_save:
        run_dir = Path(args.runs_dir) / name
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(run_dir / "metrics.json",
                     lambda tmp: Path(tmp).write_text(json.dumps(metrics, indent=1)))
        atomic_write(run_dir / "model.pt", lambda tmp: torch.save(model.state_dict(), tmp))
        plot_curves(history, run_dir / "curves.png")
        metrics["run_dir"] = str(run_dir)
    if not args.quiet:
        print(f"best epoch {best_epoch} of {len(history)} | {samples_per_s:,.0f} train samples/s "
              f"({args.loader} loader) | {metrics['wall_s']:.1f} s")
        print(f"{'task':<9}{'split':<6}{'AUC':>8}{'logloss':>9}{'acc':>8}")
        for split, per_task in splits.items():
            for t, m in per_task.items():
                print(f"{t:<9}{split:<6}{m['auc']:>8.4f}{m['logloss']:>9.4f}{m['accuracy']:>8.4f}")
        if not args.no_save:
            print(f"wrote {metrics['run_dir']}/{{metrics.json, curves.png, model.pt}}")
    return metrics


def run_seeds(argv, seeds):
    """The same configuration once per seed (no run folders): for the sweeps in 04 and 05."""
    return [run(list(argv) + ["--seed", str(s), "--no-save", "--quiet"]) for s in seeds]


if __name__ == "__main__":
    run()
