"""Stage 2, step 4: can an MLP multiply? Learning a dot product from ids, with and without one.

What you learn here: the core of "explicit vs implicit crosses", in its smallest form (Rendle,
Krichene, Zhang, Anderson, RecSys 2020). The target is y = <p_u, q_i> + noise for random k-dim
vectors of users u and items i. A dot-product model (embeddings e_u, f_i; prediction
<e_u, f_i>) has the cross built in: it only has to estimate the vectors. An MLP over the
concatenated embeddings [e_u; f_i] has to *learn* to multiply, from data. The table shows how
far each gets above the noise floor (the RMSE of the truth itself) as k grows and as the number
of rows per id shrinks: the MLP's gap to the dot product grows with k, and wider MLPs close
only part of it.

Read with it: stage2_ctr/models/layers.py (MLP, the block every CTR model here uses).
Run:    python stage2_ctr/04_can_an_mlp_multiply.py              # ~8 min on 2 cores
        python stage2_ctr/04_can_an_mlp_multiply.py --quick      # ~20 s
Writes: results/stage2_mlp_dot.md + .png (only the default run: --quick writes to runs/quick/,
        other flags to runs/partial/, CUDA to *_cuda.md), runs/stage2_mlp_dot.json
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: plain imports
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from tqdm import tqdm  # noqa: E402

import common  # noqa: E402
from stage2_ctr.models.layers import MLP  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ks", type=common.positive_int_list, default=[4, 16, 64],
                   help="dimensions k of the true vectors p_u, q_i")
    p.add_argument("--rows-per-id", type=common.positive_int_list, default=[32, 128, 512],
                   help="training rows per user (and per item)")
    p.add_argument("--ids", type=common.positive_int, default=300,
                   help="users = items = this many")
    p.add_argument("--widths", type=common.positive_int_list, default=[128, 512],
                   help="MLP hidden widths w (layers w, w/2)")
    p.add_argument("--noise", type=common.positive_float, default=0.5,
                   help="std of the label noise: the RMSE floor")
    p.add_argument("--epochs", type=common.positive_int, default=40)
    p.add_argument("--patience", type=common.positive_int, default=8,
                   help="epochs without a val gain (the dot model starts slowly: small init)")
    p.add_argument("--lr", type=common.positive_float, default=1e-2)
    p.add_argument("--batch-size", type=common.positive_int, default=2048)
    p.add_argument("--seed", type=common.non_negative_int, default=0)
    p.add_argument("--device", type=common.device_arg, default="auto",
                   help="auto | cpu | cuda | cuda:N")
    p.add_argument("--threads", type=common.positive_int, default=2, help="torch CPU threads")
    p.add_argument("--quick", action="store_true",
                   help="defaults k 4 and 16, 2 row counts, 2 widths, 150 ids, 20 epochs")
    p.add_argument("--out", default=None, help="default results/stage2_mlp_dot.md")
    p.add_argument("--runs-dir", default=str(common.RUNS))
    args = common.parse_with_quick(p, argv, dict(ks=[4, 16], rows_per_id=[64, 256],
                                                 widths=[64, 256], epochs=20, ids=150))
    args.device = common.resolve_device(args.device)
    args.out = Path(args.out or common.results_file(argv, args.quick, "stage2_mlp_dot",
                                                    args.device))
    return args


# -------------------------------------------------------------------------------------- data
def make_data(k, n_ids, rows_per_id, noise, seed, device="cpu"):
    """Users and items with true vectors of entries ~ N(0, 1/sqrt(k)) (std k^-1/4), so that
    <p_u, q_i> = sum of k products of variance 1/k has variance 1 whatever k; rows are random
    (user, item) pairs, y = <p_u, q_i> + N(0, noise^2).
    Validation and test pairs are fresh pairs of the same users and items, all on `device`.
    Also returns the noise floor: the test RMSE of the truth <p_u, q_i> itself."""
    g = np.random.default_rng([seed, k, rows_per_id])
    p = g.normal(0, k ** -0.25, (n_ids, k)).astype(np.float32)
    q = g.normal(0, k ** -0.25, (n_ids, k)).astype(np.float32)

    def rows(n):
        u, i = g.integers(0, n_ids, n), g.integers(0, n_ids, n)
        truth = (p[u] * q[i]).sum(1)
        y = (truth + g.normal(0, noise, n)).astype(np.float32)
        return (torch.from_numpy(u), torch.from_numpy(i), torch.from_numpy(y)), truth
    n_train = n_ids * rows_per_id
    (train, _), (val, _), (test, truth) = rows(n_train), rows(max(n_train // 8, 4000)), rows(
        20_000)
    floor = float(np.sqrt(np.mean((test[2].numpy() - truth) ** 2)))
    train, val, test = (tuple(t.to(device) for t in split) for split in (train, val, test))
    return train, val, test, floor


# ------------------------------------------------------------------------------------ models
class DotModel(nn.Module):
    """y = <e_u, f_i> + b_u + c_i + b: the cross is built in (matrix factorization)."""

    def __init__(self, n_ids, k):
        super().__init__()
        self.user, self.item = nn.Embedding(n_ids, k), nn.Embedding(n_ids, k)
        self.user_bias, self.item_bias = nn.Embedding(n_ids, 1), nn.Embedding(n_ids, 1)
        self.bias = nn.Parameter(torch.zeros(1))
        for e in (self.user, self.item):
            nn.init.normal_(e.weight, std=0.1)
        for e in (self.user_bias, self.item_bias):
            nn.init.zeros_(e.weight)

    def forward(self, u, i):
        return ((self.user(u) * self.item(i)).sum(1) + self.user_bias(u)[:, 0]
                + self.item_bias(i)[:, 0] + self.bias)


class MLPModel(nn.Module):
    """y = MLP([e_u; f_i]): the cross has to be learned by the ReLU layers (NCF's MLP)."""

    def __init__(self, n_ids, k, width):
        super().__init__()
        self.user, self.item = nn.Embedding(n_ids, k), nn.Embedding(n_ids, k)
        for e in (self.user, self.item):
            nn.init.normal_(e.weight, std=0.1)
        self.mlp = MLP(2 * k, (width, max(width // 2, 1)), batch_norm=False)

    def forward(self, u, i):
        return self.mlp(torch.cat([self.user(u), self.item(i)], dim=1)).squeeze(-1)


# ------------------------------------------------------------------------------------- train
def rmse(model, split, batch=8192):
    u, i, y = split
    with torch.no_grad():
        pred = torch.cat([model(u[s:s + batch], i[s:s + batch]) for s in range(0, len(y), batch)])
    return float(((pred - y) ** 2).mean().sqrt())


def fit(model, train, val, test, lr, epochs, patience, batch_size, seed):
    """Adam on the squared error, early stopping on validation RMSE; the test RMSE of the best
    epoch (the model is copied back to that epoch)."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    best, best_state, bad = float("inf"), None, 0
    u, i, y = train
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=g).to(y.device).split(batch_size):
            loss = ((model(u[idx], i[idx]) - y[idx]) ** 2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        score = rmse(model, val)
        if score < best:
            best, bad = score, 0
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
        else:
            bad += 1
            if bad >= patience:
                break
    if best_state is None:  # every epoch NaN: diverged (main() says so in one line)
        return {"val_rmse": float("nan"), "test_rmse": float("nan")}
    model.load_state_dict(best_state)
    return {"val_rmse": best, "test_rmse": rmse(model, test)}


def run_all(args):
    rows, jobs = [], [(k, r) for k in args.ks for r in args.rows_per_id]
    for k, rows_per_id in tqdm(jobs, desc="k x rows per id"):
        train, val, test, floor = make_data(k, args.ids, rows_per_id, args.noise, args.seed,
                                            args.device)
        models = {"dot": lambda: DotModel(args.ids, k)} | {
            f"mlp {w}": (lambda w=w: MLPModel(args.ids, k, w)) for w in args.widths}
        # at least 32 steps an epoch: with 5 (300 ids x 32 rows, batch 2048) early stopping
        # ends a run before the small initial embeddings have started to move
        batch_size = min(args.batch_size, max(64, len(train[2]) // 32))
        for name, make_model in models.items():
            torch.manual_seed(args.seed)  # the same initial draws for every cell
            model = make_model().to(args.device)
            r = fit(model, train, val, test, args.lr, args.epochs, args.patience,
                    batch_size, args.seed)
            rows.append({"k": k, "rows_per_id": rows_per_id, "model": name, "floor": floor,
                         "params": sum(p.numel() for p in model.parameters()), **r})
            tqdm.write(f"k {k:>3} rows/id {rows_per_id:>4} {name:<9} test RMSE "
                       f"{r['test_rmse']:.4f} (floor {floor:.2f})")
    return rows


# ------------------------------------------------------------------------------------ report
def report(args, argv, rows, seconds):
    names = ["dot"] + [f"mlp {w}" for w in args.widths]
    lines = ["# Stage 2: can an MLP learn a dot product?", "",
             f"y = <p_u, q_i> + N(0, {args.noise}²), {args.ids:,} users x {args.ids:,} items, "
             "true vectors of dimension k (Var <p_u, q_i> = 1). Models with embedding size k: "
             "the dot product <e_u, f_i> (+ biases) and MLPs [w, w/2] over [e_u; f_i]. "
             f"Adam lr {args.lr:g}, batch {args.batch_size} (smaller where an epoch would "
             "have < 32 steps), early stopping on validation RMSE. "
             "Cells: test RMSE minus the noise floor (the test RMSE of the truth itself, "
             f"~{args.noise}; lower is better, 0 = as good as the truth); the last column is the "
             "best MLP's excess over the dot product's.", ""]
    table = []
    for k in args.ks:
        for r in args.rows_per_id:
            cell = {x["model"]: x["test_rmse"] - x["floor"] for x in rows
                    if x["k"] == k and x["rows_per_id"] == r}
            best_mlp = min(cell[n] for n in names[1:])
            table.append([k, r] + [f"{cell[n]:+.4f}" for n in names]
                         + [f"{best_mlp - cell['dot']:+.4f}"])
    lines += common.markdown_table(["k", "rows per id"] + names + ["best MLP - dot"], table)
    lines += ["", f"Command: `{common.command_line(__file__, argv)}` ({seconds / 60:.1f} min, "
              f"device {args.device}).", common.machine_line(args.device, args.threads)]
    return "\n".join(lines) + "\n"


def plot(args, rows, path):
    plt = common.pyplot()
    fig, axes = plt.subplots(1, len(args.rows_per_id), figsize=(4 * len(args.rows_per_id), 3.4),
                             sharey=True, squeeze=False)
    for ax, r in zip(axes[0], args.rows_per_id):
        for name in ["dot"] + [f"mlp {w}" for w in args.widths]:
            pts = [(x["k"], x["test_rmse"] - x["floor"]) for x in rows
                   if x["rows_per_id"] == r and x["model"] == name]
            ax.plot(*zip(*pts), marker="o", ls="-" if name == "dot" else "--", label=name)
        ax.set(xscale="log", xlabel="k (dimension of the true vectors)",
               title=f"{r} rows per id")
        ax.set_xticks(args.ks, [str(k) for k in args.ks])
        ax.set_xticks([], minor=True)  # no log-scale minor labels over the k labels
    axes[0][0].set_ylabel("test RMSE - noise floor")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle("implicit (MLP) vs explicit (dot product) crosses")
    fig.tight_layout()
    common.save_figure(fig, path)


@common.one_line_errors()
def main(argv=None):
    args = parse_args(argv)
    common.set_threads(args.threads)
    for folder, flag in [(args.out.parent, "--out"), (args.runs_dir, "--runs-dir")]:
        common.check_writable(folder, flag)
    t0 = time.perf_counter()
    rows = run_all(args)
    seconds = time.perf_counter() - t0
    common.require_finite({f"k {r['k']}, {r['rows_per_id']} rows per id, {r['model']}":
                           r["test_rmse"] for r in rows}, "the test RMSE", "lower --lr")
    text = report(args, argv, rows, seconds)
    common.write_text(args.out, text)
    plot(args, rows, args.out.with_suffix(".png"))
    common.write_json(Path(args.runs_dir) / (args.out.stem + ".json"),
                      {"script": "stage2_ctr/04_can_an_mlp_multiply.py",
                       "command": common.command_line(__file__, argv),
                       "config": {k: str(v) if isinstance(v, (Path, torch.device)) else v
                                  for k, v in vars(args).items()},
                       "rows": rows, "wall_s": seconds})
    print(text)
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return rows


if __name__ == "__main__":
    main()
