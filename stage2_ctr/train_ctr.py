"""Stage 2, the trainer: one CTR model (LR, FM, DNN, DeepFM, DCN, DCN-v2) on Criteo-format data.

What you learn here: the whole CTR training loop by hand - a streaming loader feeding hashed ids,
one 2^20-row embedding table trained with sparse gradients (RowSparseAdam touches only the rows
of the batch), LogLoss + AUC on validation, early stopping, checkpoints you can resume from, and
DDP across processes with the same script (torchrun). On synthetic data the oracle's scores are
printed next to the model's, so you see how far from the best possible each model is.

Read with it: stage2_ctr/models/layers.py and the model you train, stage2_ctr/training.py (the
optimizers and the step), stage2_ctr/criteo.py (the loader, chapter 02).
Run:    python stage2_ctr/train_ctr.py --model deepfm
        python stage2_ctr/train_ctr.py --model dcn --cross-layers 3 --epochs 2 --device cuda
        torchrun --nproc_per_node 2 stage2_ctr/train_ctr.py --model deepfm     # DDP (gloo on CPU)
        torchrun --nnodes 2 --node_rank R --master_addr HOST --master_port 29500 \\
                 --nproc_per_node 8 stage2_ctr/train_ctr.py ...                 # several machines
Reads:  --train/--val/--test (default: stage2_ctr/data/synthetic/*.txt from 01_make_subset.py)
Writes: runs/<name>/metrics.json (with the config), curves.png, best.pt (best on val), last.pt
Time:   the demo (DeepFM, 160k training rows, 2 epochs) ~20 s on 2 CPU cores.
"""
import argparse
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: plain imports
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from tqdm import tqdm  # noqa: E402

import common  # noqa: E402
from stage2_ctr import criteo  # noqa: E402
from stage2_ctr.models import MODELS, build_model, criteo_schema  # noqa: E402
from stage2_ctr.training import (TrainError, amp_dtype, autocast_for, check_inputs,  # noqa
                                 cpu_has_native_bf16, dense_stats, epoch_batches, evaluate,
                                 load_last, make_optimizers, make_step, oracle_scores, rare_filter,
                                 save_last, setup_distributed, train_source)

DATA = Path(__file__).resolve().parent / "data" / "synthetic"
# ------------------------------------------------------------------------------------ config
@dataclass
class TrainConfig:
    """Everything that decides a run's numbers. Written verbatim into metrics.json; a finished
    run is reused (03_compare_models.py) only when its whole recorded config is equal. A new
    field must default to the behaviour runs had before it: older records lack it."""
    model: str = "deepfm"
    train: list = field(default_factory=lambda: [str(DATA / "train.txt")])
    val: list = field(default_factory=lambda: [str(DATA / "val.txt")])
    test: list = field(default_factory=lambda: [str(DATA / "test.txt")])
    stats: str = None           # dense statistics JSON; None: <train>.stats.json, fitted once
    device: str = "auto"
    epochs: int = 1
    max_steps: int = 0          # 0: no limit
    batch_size: int = 4096
    lr: float = 1e-3
    emb_dim: int = 16
    hash_bits: int = 20
    min_count: int = 0          # values seen fewer times in train -> their field's rare bucket
    mlp: tuple = (400, 400, 400)
    cross_layers: int = 3
    dropout: float = 0.0
    weight_decay: float = 0.0   # dense parameters only (AdamW; see training.make_optimizers)
    decoupled_wd: bool = True   # False: Adam with L2 in the gradient (for the comparison only)
    sparse_emb: str = "auto"    # sparse gradients + RowSparseAdam for the tables (auto: CPU)
    amp: str = "off"            # off | bf16 | auto (bf16 where the device multiplies it natively)
    preload: str = "none"       # none | device: the whole train split in device memory
    compile: bool = False
    num_workers: int = 1
    shuffle_buffer: int = 0
    eval_every: int = 0         # 0: validate at the end of each epoch
    patience: int = 2
    ckpt_every: int = 0
    threads: int = 0
    seed: int = 0
    run_name: str = None
    runs_dir: str = str(common.RUNS)


def parse_args(argv=None):
    """The command line -> (TrainConfig, resume, quiet). Every flag defaults to the dataclass."""
    d = TrainConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=MODELS, default=d.model)
    p.add_argument("--train", nargs="+", default=d.train,
                   help="training file(s), or one binary cache folder (07_binary_cache.py)")
    p.add_argument("--val", nargs="+", default=d.val, help="validation file(s)")
    p.add_argument("--test", nargs="+", default=d.test, help="test file(s)")
    p.add_argument("--stats", default=d.stats,
                   help="dense statistics JSON (default <train>.stats.json, fitted if missing)")
    p.add_argument("--device", type=common.device_arg, default=d.device,
                   help="auto | cpu | cuda | cuda:N")
    p.add_argument("--epochs", type=common.positive_int, default=d.epochs)
    p.add_argument("--max-steps", type=common.non_negative_int, default=d.max_steps,
                   help="stop after this many steps (0: no limit)")
    p.add_argument("--batch-size", type=common.positive_int, default=d.batch_size)
    p.add_argument("--lr", type=common.positive_float, default=d.lr)
    p.add_argument("--emb-dim", type=common.positive_int, default=d.emb_dim)
    p.add_argument("--hash-bits", type=common.checked(int, lambda v: 1 <= v <= 30, "in [1, 30]"),
                   default=d.hash_bits)
    p.add_argument("--min-count", type=common.non_negative_int, default=d.min_count,
                   help="values seen fewer times in the train file(s) share their field's "
                        "'rare' row (0: off)")
    p.add_argument("--mlp", type=common.layer_list, default=d.mlp,
                   help="hidden sizes of the MLP, e.g. 400,400,400")
    p.add_argument("--cross-layers", type=common.non_negative_int, default=d.cross_layers)
    p.add_argument("--dropout", type=common.probability, default=d.dropout)
    p.add_argument("--weight-decay", type=common.non_negative_float, default=d.weight_decay,
                   help="AdamW weight decay of the dense parameters")
    p.add_argument("--l2", dest="decoupled_wd", action="store_false",
                   help="Adam with L2 in the gradient instead of AdamW (to compare the two)")
    p.add_argument("--sparse-emb", choices=["auto", "on", "off"], default=d.sparse_emb,
                   help="sparse gradients + RowSparseAdam for the tables (auto: on for CPU)")
    p.add_argument("--amp", choices=["off", "bf16", "auto"], default=d.amp,
                   help="bf16 autocast for the MLP/cross matmuls (auto: on CUDA and on CPUs with "
                        "native bf16, i.e. avx512_bf16/amx_bf16; tables, loss, optimizer fp32)")
    p.add_argument("--preload", choices=["none", "device"], default=d.preload,
                   help="device: load the whole train split (best from a binary cache) into "
                        "device memory once and batch it there (see criteo.Preloaded)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--num-workers", type=common.non_negative_int, default=d.num_workers,
                   help="loader worker processes")
    p.add_argument("--shuffle-buffer", type=common.non_negative_int, default=d.shuffle_buffer,
                   help="rows shuffled together")
    p.add_argument("--eval-every", type=common.non_negative_int, default=d.eval_every,
                   help="validate every N steps (0: at the end of each epoch)")
    p.add_argument("--patience", type=common.positive_int, default=d.patience,
                   help="evaluations without a val AUC gain before stopping")
    p.add_argument("--ckpt-every", type=common.non_negative_int, default=d.ckpt_every,
                   help="write last.pt every N steps (and at each epoch end)")
    p.add_argument("--threads", type=common.non_negative_int, default=d.threads,
                   help="torch CPU threads (0: torch default)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--run-name", default=d.run_name, help="default ctr_<model>_s<seed>")
    p.add_argument("--runs-dir", default=d.runs_dir)
    p.add_argument("--resume", action="store_true", help="continue from runs/<name>/last.pt")
    p.add_argument("--quiet", action="store_true")
    args = vars(p.parse_args(argv))
    resume, quiet = args.pop("resume"), args.pop("quiet")
    cfg = TrainConfig(**args)
    cfg.run_name = cfg.run_name or f"ctr_{cfg.model}_s{cfg.seed}"
    return cfg, resume, quiet


# -------------------------------------------------------------------------------------- set-up
def build(cfg, device):
    """The model (sparse tables on CPU by default), its optimizers, the module to train
    (compiled and/or DDP-wrapped) and whether the tables are sparse."""
    sparse = cfg.sparse_emb == "on" or (cfg.sparse_emb == "auto" and device.type == "cpu")
    model = build_model(cfg.model, criteo_schema(cfg.hash_bits), emb_dim=cfg.emb_dim,
                        mlp=cfg.mlp, dropout=cfg.dropout, cross_layers=cfg.cross_layers,
                        sparse=sparse).to(device)
    optimizers = make_optimizers(model, cfg.lr, cfg.weight_decay, cfg.decoupled_wd)
    train_model = torch.compile(model) if cfg.compile else model
    if dist.is_initialized():
        train_model = torch.nn.parallel.DistributedDataParallel(
            train_model, device_ids=[device] if device.type == "cuda" else None)
    return model, optimizers, train_model, sparse


@dataclass
class Run:
    """What one training run holds: its data, model, optimizers, folder and loop state."""
    train_stream: criteo.CriteoStream
    val_stream: criteo.CriteoStream
    test_stream: criteo.CriteoStream
    model: torch.nn.Module
    optimizers: list
    step: object        # training.make_step: (dense, sparse, label) -> loss on the device
    run_dir: Path
    state: dict         # what last.pt carries: step, epoch, best, history, ...
    bad_rows: dict      # per split: per-file counts of the rows the loader skipped
    autocast: object    # None (fp32) or a factory of bf16 autocast contexts


def prepare(cfg, resume, rank, world, device, say):
    """Data (every input checked first), model, optimizers, run folder and the state to start
    from (a fresh one, or last.pt's with --resume)."""
    bad_rows = check_inputs(cfg, say)
    stats = dense_stats(cfg.stats, cfg.train, rank, say)
    rare = rare_filter(cfg.train, cfg.hash_bits, cfg.min_count, rank, say)
    train_stream = train_source(cfg, stats, rare, device)
    val_stream, test_stream = (criteo.CriteoStream(f, cfg.batch_size, cfg.hash_bits, stats,
                                                   rare_filter=rare) for f in (cfg.val, cfg.test))
    model, optimizers, train_model, sparse = build(cfg, device)
    autocast = autocast_for(device, amp_dtype(cfg.amp, device))
    if cfg.amp == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
        say("notice: --amp bf16 on a CPU without bf16 instructions (no avx512_bf16/amx_bf16): "
            "expect it to run several times slower than fp32 (results/stage2_precision.md)")
    run_dir = Path(cfg.runs_dir) / cfg.run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        common.remove_stale_tmp(run_dir)  # half-written files of a killed run
    state = {"step": 0, "epoch": 0, "batches_in_epoch": 0, "best_auc": -1.0, "best_step": 0,
             "bad_evals": 0, "history": [], "samples": 0, "train_seconds": 0.0,
             "loss_sum": 0.0, "loss_n": 0}
    if resume and (run_dir / "last.pt").exists():
        state = load_last(run_dir / "last.pt", model, optimizers, device, cfg)
        say(f"resumed from {run_dir / 'last.pt'} at step {state['step']}")
    elif resume:
        say(f"--resume: there is no {run_dir / 'last.pt'}; starting from scratch")
    say(f"{cfg.model}: {sum(p.numel() for p in model.parameters()):,} parameters | device "
        f"{device} | world {world} | sparse tables {sparse} | batch {cfg.batch_size} | "
        f"hash 2^{cfg.hash_bits} | {'bf16 autocast' if autocast else 'fp32'} | train from "
        f"{type(train_stream).__name__}")
    return Run(train_stream, val_stream, test_stream, model, optimizers,
               make_step(train_model, optimizers, autocast=autocast), run_dir, state, bad_rows,
               autocast)


def train(cfg, resume=False, quiet=False):
    """One training run; returns the metrics dict that it writes to runs/<name>/metrics.json."""
    t_start = time.perf_counter()
    rank, world, device = setup_distributed(cfg.device)
    common.set_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    say = (lambda *a: None) if quiet or rank else tqdm.write
    run = prepare(cfg, resume, rank, world, device, say)
    state, model, step, run_dir, bad_rows = (run.state, run.model, run.step, run.run_dir,
                                             run.bad_rows)

    bar = tqdm(total=cfg.max_steps or None, initial=state["step"], unit=" step",
               disable=quiet or rank != 0)
    stop, loss_n = False, state["loss_n"]
    loss_sum = torch.tensor(state["loss_sum"], dtype=torch.float64, device=device)
    while state["epoch"] < cfg.epochs and not stop:
        t0, reports = time.perf_counter(), []
        batches = epoch_batches(run.train_stream, state["epoch"], cfg.num_workers,
                                cfg.batch_size, cfg.seed, device, reports)
        for i, ((dense, sparse_ids, label), last) in enumerate(batches):
            if i < state["batches_in_epoch"]:
                continue  # resume: the stream is deterministic, skip what already ran
            # one step; the loss stays on the device (no host sync per step)
            loss = step(dense.to(device, non_blocking=True),
                        sparse_ids.to(device, non_blocking=True),
                        label.to(device, non_blocking=True))
            loss_sum, loss_n = loss_sum + loss, loss_n + 1
            state.update(step=state["step"] + 1, batches_in_epoch=i + 1,
                         samples=state["samples"] + len(label) * world)
            bar.update(1)
            if state["step"] % 50 == 0:  # the progress bar: the only read between evaluations
                seconds = state["train_seconds"] + time.perf_counter() - t0
                bar.set_postfix(loss=f"{loss_sum.item() / loss_n:.4f}",
                                samples_s=f"{state['samples'] / seconds:,.0f}")
            if last:  # the epoch is over: its bad rows, counted by the loader workers
                state.update(epoch=state["epoch"] + 1, batches_in_epoch=0)
                bad_rows["train"] = criteo.merge_reports(reports)
                for line in criteo.describe_bad_rows(bad_rows["train"]):
                    say(f"train, epoch {state['epoch']}: {line}")
            # evaluate and checkpoint: every eval_every steps, at each epoch end, at max_steps
            at_max = cfg.max_steps and state["step"] >= cfg.max_steps
            if last or at_max or (cfg.eval_every and state["step"] % cfg.eval_every == 0):
                state["train_seconds"] += time.perf_counter() - t0
                val = evaluate(model, run.val_stream, device, run.autocast)
                stop = record_eval(state, val, loss_sum.item() / max(loss_n, 1),
                                   cfg.patience, run_dir, model, rank, say) or bool(at_max)
                loss_sum.zero_()
                loss_n, t0 = 0, time.perf_counter()
            if rank == 0 and cfg.ckpt_every and (last or state["step"] % cfg.ckpt_every == 0):
                state.update(loss_sum=loss_sum.item(), loss_n=loss_n)  # the running loss too
                save_last(run_dir / "last.pt", model, run.optimizers, state, cfg)
            if stop:
                break
    bar.close()
    state["bad_rows"] = bad_rows
    return finish(cfg, run, device, rank, world, time.perf_counter() - t_start, quiet)


def record_eval(state, val, train_loss, patience, run_dir, model, rank, say):
    """Log the evaluation, keep best.pt when val AUC improved; True when patience ran out."""
    state["history"].append({"step": state["step"], "train_loss": train_loss,
                             "val_auc": val["auc"], "val_logloss": val["logloss"]})
    if val["auc"] > state["best_auc"]:
        state.update(best_auc=val["auc"], best_step=state["step"], bad_evals=0)
        if rank == 0:
            common.torch_save(model.state_dict(), run_dir / "best.pt")
    else:
        state["bad_evals"] += 1
    say(f"step {state['step']}: train logloss {train_loss:.4f} | val AUC {val['auc']:.4f} "
        f"logloss {val['logloss']:.4f}")
    return state["bad_evals"] >= patience


def finish(cfg, run, device, rank, world, wall_s, quiet):
    """Test with the best checkpoint, write metrics.json and curves.png, print the report."""
    model, state, run_dir = run.model, run.state, run.run_dir
    if (run_dir / "best.pt").exists():
        model.load_state_dict(torch.load(run_dir / "best.pt", weights_only=True,
                                         map_location=device))
    splits = {"val": evaluate(model, run.val_stream, device, run.autocast),
              "test": evaluate(model, run.test_stream, device, run.autocast)}
    for name, files in [("val", cfg.val), ("test", cfg.test)]:
        oracle = oracle_scores(files)
        if oracle:
            splits[name].update(oracle=oracle, auc_gap_to_oracle=oracle["auc"] -
                                splits[name]["auc"], logloss_gap_to_oracle=splits[name][
                                "logloss"] - oracle["logloss"])
    metrics = {"script": "stage2_ctr/train_ctr.py", "model": cfg.model,
               "dataset": Path(cfg.train[0]).parent.name, "device": str(device),
               "seed": cfg.seed, "world_size": world, "config": asdict(cfg), "splits": splits,
               "best_step": state["best_step"], "steps": state["step"],
               "history": state["history"], "bad_rows": state["bad_rows"],
               "parameters": sum(p.numel() for p in model.parameters()),
               "train_samples_per_s": state["samples"] / max(state["train_seconds"], 1e-9),
               "peak_rss_mb": common.peak_rss_mb(),
               "peak_gpu_mb": (torch.cuda.max_memory_allocated(device) / 2**20
                               if device.type == "cuda" else None), "wall_s": wall_s}
    if rank == 0:
        common.write_json(run_dir / "metrics.json", metrics)
        if state["history"]:
            plot_curves(state["history"], run_dir / "curves.png")
        if not quiet:
            report(metrics, run_dir)
    if dist.is_initialized():
        dist.destroy_process_group()
    return metrics


# ------------------------------------------------------------------------------------ report
def plot_curves(history, path):
    plt = common.pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    steps = [h["step"] for h in history]
    ax1.plot(steps, [h["train_loss"] for h in history])
    ax1.set(xlabel="step", ylabel="train logloss (since last eval)", title="training")
    ax2.plot(steps, [h["val_auc"] for h in history], marker="o")
    ax2.set(xlabel="step", ylabel="val AUC", title="validation")
    fig.tight_layout()
    common.save_figure(fig, path, dpi=90)


def report(m, run_dir):
    print(f"{m['model']}: {m['steps']} steps, best at {m['best_step']}, "
          f"{m['train_samples_per_s']:,.0f} train samples/s, peak RSS {m['peak_rss_mb']:,.0f} MB")
    print(f"{'split':<6}{'AUC':>8}{'logloss':>9}{'oracle AUC':>12}{'gap':>8}")
    for name, s in m["splits"].items():
        o = s.get("oracle")
        print(f"{name:<6}{s['auc']:>8.4f}{s['logloss']:>9.4f}"
              + (f"{o['auc']:>12.4f}{s['auc_gap_to_oracle']:>8.4f}" if o else ""))
    written = [n for n in ["metrics.json", "curves.png", "best.pt", "last.pt"]
               if (run_dir / n).exists()]
    print(f"wrote {run_dir}/{{{', '.join(written)}}}")


def main(argv=None):
    cfg, resume, quiet = parse_args(argv)
    try:
        return train(cfg, resume, quiet)
    except (criteo.CriteoFormatError, TrainError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
