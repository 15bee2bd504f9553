"""Stage 1, step 6: batch size and DataLoader tuning, measured - what is fast, and what it costs.

What you learn here, on the Adult npz and the shared-bottom MLP of 03:
  (a) batch size 32 ... 16,384 with the learning rate scaled by a stated rule (sqrt by default):
      train samples/s, epochs to the best validation AUC, test AUC - speed against quality;
  (b) four input paths: a map-style Dataset + DataLoader per sample, a BatchSampler that indexes
      whole batches, slices of preloaded tensors, tensors already on the device;
  (c) DataLoader settings - num_workers 0/1/2, persistent_workers, prefetch_factor, pin_memory -
      and what each costs at start-up and per epoch;
  (d) with --device cuda: the host-to-device copy's share of a step, non_blocking from pinned
      memory, and the batch from which the GPU waits for its input (stage3's 07_gpu.py runs it).

Read with it: stage1_adult/loader_bench.py (each measurement), mtml.py (LOADERS, train_step).
Run:    python stage1_adult/06_dataloader_tuning.py                  # CPU: (a)-(c), 1 thread
        python stage1_adult/06_dataloader_tuning.py --device cuda    # adds (d)
        python stage1_adult/06_dataloader_tuning.py --quick          # a minute: the code path
Reads:  stage1_adult/adult_stage1.npz (02_preprocess.py)
Writes: results/stage1_dataloader.md + .png (only the default run; --device cuda writes
        stage1_dataloader_cuda.md, other flags runs/partial/), runs/stage1_dataloader/metrics.json
Time:   ~15 min on one CPU core (part (c) uses up to 2 loader workers: give it 2 cores).
"""
import argparse
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: plain imports
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import common  # noqa: E402
from stage1_adult import loader_bench as lb  # noqa: E402
from stage1_adult import mtml  # noqa: E402

HERE = Path(__file__).resolve().parent
HARMLESS = common.HARMLESS_FLAGS | {"--device"}  # a CUDA run writes its own *_cuda.md
PATHS = {"dataloader": "map-style Dataset + DataLoader, one sample at a time (collate)",
         "batch-sampler": "DataLoader + BatchSampler: one list index per batch, no collate",
         "slice": "slices of preloaded tensors (one gather per batch)",
         "device": "slices of tensors already on the device"}
# (name, DataLoader keyword arguments): each row of part (c)
SETTINGS = [("workers 0", {}),
            ("workers 1", {"workers": 1}),
            ("workers 2", {"workers": 2}),
            ("workers 2, persistent_workers", {"workers": 2, "persistent": True}),
            ("workers 2, persistent, prefetch_factor 8",
             {"workers": 2, "persistent": True, "prefetch": 8}),
            ("workers 0, pin_memory", {"pin_memory": True}),
            ("BatchSampler, workers 0", {"whole_batches": True}),
            ("BatchSampler, workers 2, persistent", {"whole_batches": True, "workers": 2,
                                                     "persistent": True})]


@dataclass
class TuningConfig:
    """Everything that decides this chapter's numbers (written into metrics.json)."""
    npz: str = str(HERE / "adult_stage1.npz")
    batch_sizes: tuple = (32, 128, 512, 2048, 8192, 16384)
    seeds: tuple = (0, 1, 2)
    base_lr: float = 1e-3          # mtml's default lr at its default batch
    base_batch: int = 256
    lr_rule: str = "sqrt"          # loader_bench.lr_for
    max_epochs: int = 60           # large batches take few steps per epoch: more epochs
    patience: int = 5
    path_batches: tuple = (256, 4096)
    repeats: int = 3               # timed epochs per input path (median)
    setting_batch: int = 256
    setting_epochs: int = 3
    device_batches: tuple = (256, 1024, 4096, 16384)
    device: str = "auto"
    threads: int = 1


def parse_args(argv=None):
    d = TuningConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--npz", default=d.npz, help="output of 02_preprocess.py")
    p.add_argument("--batch-sizes", type=common.int_list, default=d.batch_sizes)
    p.add_argument("--seeds", type=common.seed_list, default=d.seeds, help="training seeds")
    p.add_argument("--lr-rule", choices=lb.LR_RULES, default=d.lr_rule,
                   help=f"lr at batch B = {d.base_lr:g} x (B/{d.base_batch})^(1/2, 1 or 0)")
    p.add_argument("--max-epochs", type=common.positive_int, default=d.max_epochs)
    p.add_argument("--repeats", type=common.positive_int, default=d.repeats)
    p.add_argument("--device", type=common.device_arg, default=d.device,
                   help="auto | cpu | cuda | cuda:N; cuda adds part (d) and writes *_cuda.md")
    p.add_argument("--threads", type=common.positive_int, default=d.threads,
                   help="torch CPU threads of the main process")
    p.add_argument("--quick", action="store_true",
                   help="batches 256 and 4096, one seed, 2 epochs, 1 repeat: the code path")
    p.add_argument("--runs-dir", default=str(common.RUNS))
    p.add_argument("--out-dir", default=None, help="where the table and plot go (default "
                   "results/ for the default run, runs/quick/ or runs/partial/ otherwise)")
    args = p.parse_args(argv)
    given = set(common.non_default_flags(argv))
    cfg = replace(d, npz=args.npz, batch_sizes=tuple(args.batch_sizes), seeds=tuple(args.seeds),
                  lr_rule=args.lr_rule, max_epochs=args.max_epochs, repeats=args.repeats,
                  device=args.device, threads=args.threads)
    if args.quick:  # only the flags not given
        quick = {"batch_sizes": (256, 4096), "seeds": (0,), "max_epochs": 2, "repeats": 1}
        cfg = replace(cfg, path_batches=(256,), setting_epochs=2, device_batches=(256, 2048),
                      **{k: v for k, v in quick.items()
                         if f"--{k.replace('_', '-')}" not in given})
    out = common.results_file(argv, args.quick, "stage1_dataloader",  # the device: in the name
                              common.resolve_device(cfg.device), HARMLESS)
    out = Path(args.out_dir) / out.name if args.out_dir else out
    return cfg, out, Path(args.runs_dir), common.command_line(__file__, argv)


# ---------------------------------------------------------------------------------- parts
def batch_sweep(cfg, device):
    """(a) one early-stopped training per batch size and seed, lr scaled by cfg.lr_rule."""
    rows = []
    for b in tqdm(cfg.batch_sizes, desc="(a) batch sizes"):
        lr = lb.lr_for(b, cfg.base_lr, cfg.base_batch, cfg.lr_rule)
        runs = [mtml.run(mtml.MTMLConfig(npz=cfg.npz, batch_size=b, lr=lr, epochs=cfg.max_epochs,
                                         patience=cfg.patience, seed=s, device=str(device),
                                         threads=cfg.threads), quiet=True) for s in cfg.seeds]
        rows.append({"batch": b, "lr": lr,
                     "samples_per_s": statistics.median(r["train_samples_per_s"] for r in runs),
                     "best_epoch": [r["best_epoch"] for r in runs],
                     "epochs_run": [len(r["history"]) for r in runs],
                     "val_auc": [r["splits"]["val"]["income"]["auc"] for r in runs],
                     "test_auc": [r["splits"]["test"]["income"]["auc"] for r in runs],
                     "test_auc_married": [r["splits"]["test"]["married"]["auc"] for r in runs],
                     "train_s": statistics.median(r["wall_s"] for r in runs)})
        tqdm.write(f"batch {b:>6} lr {lr:.2e}: {rows[-1]['samples_per_s']:>9,.0f} samples/s, "
                   f"best epoch {rows[-1]['best_epoch']}, test income AUC "
                   f"{common.mean_std(rows[-1]['test_auc'])}")
    return rows


def input_paths(cfg, device, train, meta):
    """(b) each path alone (batches only) and feeding training steps, per batch size."""
    rows = []
    for b in cfg.path_batches:
        for path in tqdm(PATHS, desc=f"(b) input paths, batch {b}", leave=False):
            model = lb.model_for(meta, mtml.MTMLConfig(), device)
            rows.append({"batch": b, "path": path,
                         "batches_only": lb.input_path_speed(train, path, b, device, None,
                                                             cfg.repeats),
                         "training": lb.input_path_speed(train, path, b, device, model,
                                                         cfg.repeats)})
            tqdm.write(f"batch {b:>5} {path:<14} batches only {rows[-1]['batches_only']:>11,.0f}"
                       f" | training {rows[-1]['training']:>9,.0f} samples/s")
    return rows


def loader_settings(cfg, device, train, meta):
    """(c) start-up and epoch seconds of each DataLoader setting (pin_memory: CUDA only)."""
    rows = []
    for name, kw in tqdm(SETTINGS, desc="(c) DataLoader settings", leave=False):
        if kw.get("pin_memory") and device.type != "cuda":
            rows.append({"setting": name, "skipped": "pinned memory needs CUDA"})
            continue
        loader = lb.settings_loader(train, cfg.setting_batch, **kw)
        model = lb.model_for(meta, mtml.MTMLConfig(), device)
        rows.append({"setting": name, **lb.settings_cost(loader, list(train), model, device,
                                                         cfg.setting_epochs)})
        tqdm.write(f"{name:<42} start-up {rows[-1]['startup_first_s'] * 1e3:>6.0f} ms, epoch "
                   f"{rows[-1]['later_epoch_s']:.2f} s, {rows[-1]['samples_per_s']:,.0f} samples/s")
    return rows


# --------------------------------------------------------------------------------- report
def report(cfg, results, command, device, seconds):
    a, b, c, d = (results[k] for k in ("batch_sweep", "input_paths", "settings", "device"))
    lines = ["# Stage 1: batch size and DataLoader tuning", "",
             f"Adult npz, shared-bottom MLP (256-128, `ple+tokens`), AdamW, device {device}, "
             f"{cfg.threads} torch thread(s) in the main process. Samples/s are medians.", "",
             f"## (a) Batch size, lr = {cfg.base_lr:g} × (B / {cfg.base_batch})"
             f"{'^0.5' if cfg.lr_rule == 'sqrt' else '' if cfg.lr_rule == 'linear' else '^0'} "
             f"({cfg.lr_rule} rule), {len(cfg.seeds)} training seeds", "",
             f"Early stopping on val income AUC (patience {cfg.patience}, at most "
             f"{cfg.max_epochs} epochs); test AUC mean ± std over seeds.", ""]
    lines += common.markdown_table(
        ["batch", "lr", "train samples/s", "best epoch (per seed)", "val income AUC",
         "test income AUC", "test married AUC", "wall s per run"],
        [[f"{r['batch']:,}", f"{r['lr']:.2e}", f"{r['samples_per_s']:,.0f}",
          ", ".join(map(str, r["best_epoch"])) + (" (cap)" if max(r["epochs_run"]) >=
                                                  cfg.max_epochs else ""),
          common.mean_std(r["val_auc"]), common.mean_std(r["test_auc"]),
          common.mean_std(r["test_auc_married"]), f"{r['train_s']:.0f}"] for r in a])
    lines += ["", f"## (b) Input paths ({cfg.repeats} timed epochs each)", "",
              "'batches only' makes the batches (and moves them to the device) without a model;"
              " 'training' also takes a step per batch." + (
                  " On the CPU 'already on the device' is the same tensors as slicing."
                  if device.type == "cpu" else ""), ""]
    base = {r["batch"]: r["training"] for r in b if r["path"] == "dataloader"}
    lines += common.markdown_table(
        ["batch", "input path", "batches only, samples/s", "training, samples/s",
         "training vs per-sample DataLoader"],
        [[f"{r['batch']:,}", PATHS[r["path"]], f"{r['batches_only']:,.0f}",
          f"{r['training']:,.0f}", f"{r['training'] / base[r['batch']]:.2f}×"] for r in b])
    lines += ["", f"## (c) DataLoader settings (batch {cfg.setting_batch}, per-sample unless "
              f"said, {cfg.setting_epochs} epochs with a training step)", "",
              "Start-up: from `iter(loader)` to the first batch (workers forked, first "
              "prefetch). Without persistent_workers every epoch pays it again.", ""]
    lines += common.markdown_table(
        ["setting", "start-up, 1st epoch (ms)", "start-up, later epochs (ms)",
         "1st epoch (s)", "later epoch (s)", "samples/s"],
        [[r["setting"]] + (["-"] * 4 + [r["skipped"]] if "skipped" in r else
                           [f"{r['startup_first_s'] * 1e3:,.0f}",
                            f"{r['startup_later_s'] * 1e3:,.0f}", f"{r['first_epoch_s']:.2f}",
                            f"{r['later_epoch_s']:.2f}", f"{r['samples_per_s']:,.0f}"])
         for r in c])
    lines += ["", "## (d) One step on the device: gather, copy, compute", ""]
    if d is None:
        lines += ["Not measured on this machine: part (d) needs `--device cuda` "
                  "(`make gpu` runs it)."]
    else:
        lines += common.markdown_table(
            ["batch", "gather (ms)", "copy pageable (ms)", "copy pinned non_blocking (ms)",
             "device compute (ms)", "full step (ms)", "copy share", "waits for input"],
            [[f"{r['batch']:,}", f"{r['gather_ms']:.3f}", f"{r['copy_pageable_ms']:.3f}",
              f"{r['copy_pinned_ms']:.3f}", f"{r['compute_ms']:.3f}", f"{r['full_step_ms']:.3f}",
              f"{r['copy_share']:.0%}", "no" if r["device_bound"] else "yes"] for r in d["rows"]])
        knee = d["input_bound_from_batch"]
        lines += ["", f"The device waits for its input from batch {knee:,} on." if knee else
                  "The device step is the bottleneck at every batch measured."]
    lines += ["", f"Command: `{command}` ({seconds / 60:.1f} min).",
              common.machine_line(device, cfg.threads)]
    return "\n".join(lines) + "\n"


def plot(results, path):
    """Speed against quality over batch size (a), and the input paths (b)."""
    plt = common.pyplot()
    fig, (ax1, ax3) = plt.subplots(1, 2, figsize=(11, 4))
    a = results["batch_sweep"]
    sizes = [r["batch"] for r in a]
    ax1.plot(sizes, [r["samples_per_s"] for r in a], "o-", color="tab:blue")
    ax1.set(xscale="log", yscale="log", xlabel="batch size (lr scaled)",
            ylabel="train samples/s", title="(a) speed vs quality")
    ax1.minorticks_off()
    ax1.set_xticks(sizes, [f"{s:,}" for s in sizes], rotation=30)
    ax2 = ax1.twinx()
    ax2.errorbar(sizes, [statistics.mean(r["test_auc"]) for r in a],
                 yerr=[statistics.pstdev(r["test_auc"]) for r in a], fmt="s--",
                 color="tab:red")
    ax2.set_ylabel("test income AUC", color="tab:red")
    b = results["input_paths"]
    batches = sorted({r["batch"] for r in b})
    width = 0.8 / len(batches)
    for i, bs in enumerate(batches):
        rows = [r for r in b if r["batch"] == bs]
        ax3.barh([j + i * width for j in range(len(rows))], [r["training"] for r in rows],
                 height=width, label=f"batch {bs:,}")
    ax3.set_yticks([j + width * (len(batches) - 1) / 2 for j in range(len(PATHS))],
                   list(PATHS))
    ax3.set(xscale="log", xlabel="training samples/s", title="(b) input paths")
    ax3.minorticks_off()
    ax3.legend()
    fig.tight_layout()
    common.save_figure(fig, path)


@common.one_line_errors(mtml.NpzError)
def main(argv=None):
    cfg, out, runs_dir, command = parse_args(argv)
    for folder, flag in [(out.parent, "results folder"), (runs_dir, "--runs-dir")]:
        common.check_writable(folder, flag)
    t0 = time.perf_counter()
    common.set_threads(cfg.threads)
    device = common.resolve_device(cfg.device)
    data, meta = mtml.load_npz(cfg.npz)
    print(f"device {device} | train {len(data['train']['y_income']):,} rows | "
          f"{cfg.threads} thread(s) | lr rule {cfg.lr_rule}")
    results = {"batch_sweep": batch_sweep(cfg, device),
               "input_paths": input_paths(cfg, device, data["train"], meta),
               "settings": loader_settings(cfg, device, data["train"], meta),
               "device": (lb.device_part(cfg.npz, device, cfg.device_batches, mtml.MTMLConfig())
                          if device.type == "cuda" else None)}
    seconds = time.perf_counter() - t0
    text = report(cfg, results, command, device, seconds)
    common.write_text(out, text)
    plot(results, out.with_suffix(".png"))
    common.write_json(runs_dir / "stage1_dataloader" / "metrics.json", {
        "script": "stage1_adult/06_dataloader_tuning.py", "device": str(device),
        "command": command, "config": asdict(cfg), "results": results, "wall_s": seconds,
        "machine": common.machine_line(device, cfg.threads)})
    print(text)
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return results


if __name__ == "__main__":
    main()
