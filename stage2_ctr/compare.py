"""The harness behind stage2_ctr/03_compare_models.py: the data sets it trains on, finished runs
read back instead of retrained, and a pool of trainings side by side.

A finished run (runs/<name>/metrics.json) is reused only when its whole recorded TrainConfig
equals the one asked for AND the fingerprints of the files it was trained and scored on equal
those on disk now: a data folder regenerated in place (another seed, another size) retrains
its runs instead of reporting old AUCs next to a new oracle.
"""
import json
import statistics
from dataclasses import asdict
from pathlib import Path

import common
from stage2_ctr import synthetic, train_stats
from stage2_ctr.train_ctr import TrainConfig, data_fingerprints, train


def dataset(regime, total_rows, data_dir, data_seed=0):
    """<data-dir>/compare_<regime>_<rows>_seed<data seed>: made once with the generator's
    defaults (a generator seed draws another click model: other vocabularies, weights, oracle)."""
    folder = Path(data_dir) / f"compare_{regime}_{total_rows}_seed{data_seed}"
    if not (folder / "meta.json").exists():
        synthetic.make_synthetic(synthetic.SyntheticConfig(rows=total_rows, seed=data_seed,
                                                           interactions=regime), folder)
    return folder


def finished_run(cfg):
    """The metrics of a finished run of cfg, else None (and why, printed). A field added to
    TrainConfig after a run was recorded is absent from its record; a new field's default is
    the behaviour runs had before it."""
    done = Path(cfg.runs_dir) / cfg.run_name / "metrics.json"
    if not done.exists():
        return None
    try:
        metrics = json.loads(done.read_text())
        recorded = {**json.loads(json.dumps(asdict(TrainConfig()))), **metrics["config"]}
        same_config = recorded == json.loads(json.dumps(asdict(cfg)))
        complete = all(k in metrics["splits"][s] for s in ("val", "test")
                       for k in ("auc", "logloss")) and metrics["history"]
        same_data = metrics.get("data") == json.loads(json.dumps(data_fingerprints(cfg)))
    except (ValueError, KeyError, TypeError, AttributeError):
        print(f"{done}: unreadable or incomplete, training the run again", flush=True)
        return None
    if same_config and not complete:
        print(f"{done}: incomplete (no scores or no history), training the run again")
    elif same_config and not same_data:
        print(f"{done}: trained on other data (the files changed since), training it again")
    return metrics if same_config and complete and same_data else None


def train_quiet(cfg):
    return train(cfg, quiet=True)


def run_all(configs, pool, log, fresh=False):
    """{run name: metrics} for every config: finished runs read back (unless fresh), the rest
    trained in the pool. log counts runs, reused runs and training seconds; log["seen"] keeps
    what this invocation already has (experiments share runs)."""
    seen = log["seen"]
    out, todo = {c.run_name: seen[c.run_name] for c in configs if c.run_name in seen}, []
    for cfg in (c for c in configs if c.run_name not in seen):
        metrics = None if fresh else finished_run(cfg)
        if metrics is None:
            todo.append(cfg)
        else:
            out[cfg.run_name] = seen[cfg.run_name] = metrics
            log["reused"] += 1
            log["runs"] += 1
            log["train_s"] += metrics.get("wall_s", 0.0)
    for cfg, metrics in zip(todo, pool.map(train_quiet, todo)):
        out[cfg.run_name] = seen[cfg.run_name] = metrics
        log["runs"] += 1
        log["train_s"] += metrics.get("wall_s", 0.0)
        print(f"  {cfg.run_name}: test AUC {metrics['splits']['test']['auc']:.4f}", flush=True)
    return out


def best_epoch(metrics):
    """The (fractional) epoch of the best validation step."""
    per_epoch = metrics["steps"] / max(len(metrics["history"]), 1)
    return metrics["best_step"] / max(per_epoch, 1)


def collisions(folder, hash_bits, max_rows=None):
    """train_stats.collision_report of a folder's train.txt (what a table of 2^bits costs)."""
    return train_stats.collision_report([folder / "train.txt"], hash_bits, max_rows=max_rows)


# ------------------------------------------------------------------------------------ report
def expected_wins_of(expected, rows, margin):
    """Each expected (loser, winner) pair: holds when the winner's mean test AUC over training
    seeds is higher by at least `margin` and by more than 3x the larger seed std, and when the
    winner is ahead on every generated data set as well (rows without data_auc: seeds only)."""
    by = {r["model"]: r for r in rows}
    out = []
    for lo, hi in expected:
        if lo not in by or hi not in by:
            continue
        diff = statistics.mean(by[hi]["auc"]) - statistics.mean(by[lo]["auc"])
        sd = max(statistics.pstdev(by[hi]["auc"]), statistics.pstdev(by[lo]["auc"]))
        ok = diff >= margin and diff > 3 * sd
        line = f"{hi} - {lo} = {diff:+.4f} (3 x std {3 * sd:.4f})"
        if len(by[hi].get("data_auc", [])) > 1:
            per_data = [a - b for a, b in zip(by[hi]["data_auc"], by[lo]["data_auc"])]
            ok = ok and min(per_data) > 0
            line += "; per data set " + " / ".join(f"{d:+.4f}" for d in per_data)
        out.append(line + ": " + ("holds" if ok else "does not hold"))
    return out


def regime_lines(args, regime, r, wins, epochs):
    o = r["rows"][0]["oracle"]
    lines = [f"## {regime}", "", f"{args.rows_of[regime]:,} rows (8:1:1), up to {epochs} "
             f"epoch(s) with early stopping on val AUC; oracle test AUC per data set (seeds "
             f"{', '.join(map(str, args.data_seeds))}): " + " / ".join(f"{x:.4f}" for x in o)
             + "; the oracle with one planted part removed (data seed "
             f"{args.data_seeds[0]}): " + ", ".join(f"{k} {v:.4f}" for k, v in r["meta"][
                 "oracle_auc_without"].items()) + ".", ""]
    lines += common.markdown_table(
        ["model", "lr", f"test AUC, {len(args.seeds)} training seeds",
         f"test AUC, {len(args.data_seeds)} data sets", "AUC gap to oracle, data sets",
         "test logloss", "best epoch", "samples/s", "parameters"],
        [[x["model"], f"{x['lr']:g}", common.mean_std(x["auc"]), common.mean_std(x["data_auc"]),
          common.mean_std(x["data_gap"]), common.mean_std(x["logloss"]),
          f"{statistics.mean(x['best_epoch']):.1f}",
          f"{statistics.median(x['samples_per_s']):,.0f}", f"{x['parameters']:,}"]
         for x in r["rows"]])
    lines += ["", "Test AUC per data set (first training seed):", ""]
    lines += common.markdown_table(["model"] + [f"data seed {d}" for d in args.data_seeds],
                                   [[x["model"]] + [f"{a:.4f}" for a in x["data_auc"]]
                                    for x in r["rows"]])
    lines += [""] + [f"- expected: {w}" for w in wins] + [""]
    if epochs > 1:
        lines += ["Validation AUC after each epoch, per data set (first training seed; a run "
                  "stops after the first epoch without a gain):", ""]
        lines += common.markdown_table(
            ["model"] + [f"data seed {d}" for d in args.data_seeds],
            [[x["model"]] + [" -> ".join(f"{v:.4f}" for v in c) for c in x["val_curve"]]
             for x in r["rows"]])
        lines.append("")
    return lines


def part_lines(args, results, parts):
    lines, curve = [], parts["curve"]
    if len(curve) > 1:
        models = [m for m in curve if m != "oracle"]
        lines += ["## Learning curve, dot regime (first seeds): test AUC vs training rows", ""]
        lines += common.markdown_table(["training rows"] + models + ["oracle"], [
            [f"{n:,}"] + [f"{curve[m][i][1]:.4f}" for m in models]
            + [f"{curve['oracle'][i][1]:.4f}"] for i, (n, _) in enumerate(curve["oracle"])])
        lines.append("")
    if parts["min_count"]:
        lines += [f"## The frequency threshold (first seeds): test AUC without / with "
                  f"--min-count {args.min_count}", ""]
        lines += common.markdown_table(
            ["regime", "model", "min count 0", f"min count {args.min_count}", "difference"],
            [[g, m, f"{a:.4f}", f"{b:.4f}", f"{b - a:+.4f}"]
             for (g, m), (a, b) in parts["min_count"].items()])
        lines.append("")
    if parts["hash_bits"]:
        regime, table = parts["hash_bits"]
        models = [m for m in args.hash_models.split(",") if m]
        lines += [f"## What collisions cost ({regime}, first seeds): test AUC vs the table's "
                  "size 2^bits", "", "A value shares its bucket when another (field, value) "
                  "of the train split hashes to the same row; 'excess' counts the values "
                  "beyond one per bucket (1 - buckets / values).", ""]
        lines += common.markdown_table(
            ["hash bits", "buckets used", "values sharing a bucket", "excess values"] + models,
            [[b, f"{t['collisions']['distinct_buckets']:,}",
              f"{t['collisions']['values_in_shared_buckets']:.2%}",
              f"{t['collisions']['excess_values']:.2%}"] + [f"{t[m]:.4f}" for m in models]
             for b, t in table.items()])
        lines.append("")
    return lines


def write_report(args, results, parts, log, seconds, wins, epochs):
    """results/stage2_models.md (+ stage2_weight_decay.md, the PNGs) in args.out_dir."""
    hash_bits = TrainConfig().hash_bits
    lines = ["# Stage 2: explicit vs implicit crosses - CTR models per planted regime", "",
             f"Same budget for every model: batch {args.batch_size}, emb {args.emb_dim}, MLP "
             f"{'-'.join(map(str, args.mlp))}, {args.cross_layers} cross layers (DCN, DCN-v2), "
             f"hash 2^{hash_bits}, values seen < {args.min_count} times -> their field's rare "
             "bucket, learning rate per model and regime picked on val from "
             f"{{{', '.join(f'{x:g}' for x in args.lrs)}}} (data seed {args.data_seeds[0]}, "
             f"seed {args.seeds[0]}); training seeds {', '.join(map(str, args.seeds))} on data "
             f"seed {args.data_seeds[0]}, and seed {args.seeds[0]} on each data seed "
             f"{', '.join(map(str, args.data_seeds))} (another generated data set: other "
             f"vocabularies, weights and oracle); {args.jobs} runs at a time with 1 thread "
             "each (samples/s are those of a shared machine).", ""]
    for regime, r in results.items():
        lines += regime_lines(args, regime, r, wins[regime], epochs[regime])
    lines += part_lines(args, results, parts)
    if log["reused"]:
        lines.append(f"{log['reused']} of the {log['runs']} runs were read back from "
                     f"{Path(args.runs_dir).name}/cmp_*/metrics.json (finished earlier with the "
                     "same config and data; --fresh retrains).")
    lines += ["", f"Written by `{args.command}` in {seconds / 60:.0f} min; the runs behind it "
              f"took {log['train_s'] / 60:.0f} min of training in all.",
              common.machine_line("cpu", 1)]
    common.write_text(args.out_dir / "stage2_models.md", "\n".join(lines) + "\n")
    if parts["optimizer"]:
        write_optimizer(args, parts["optimizer"], epochs)
    plot(args, results, parts["curve"])
    print(f"wrote {args.out_dir / 'stage2_models.md'} (+ PNGs)")


def write_optimizer(args, part, epochs):
    """results/stage2_weight_decay.md: the trainer's optimizer rule and the runs that decided it."""
    regime, lr, runs, deepfm = part
    best = max(runs, key=lambda k: runs[k]["val"])
    base = runs[(0.0, True)] if (0.0, True) in runs else runs[best]
    seed_sd = statistics.pstdev(deepfm["val_auc"]) if deepfm and len(deepfm["val_auc"]) > 1 \
        else None
    lines = ["# Stage 2: the optimizer rule of the trainer - AdamW vs Adam + L2", "",
             f"DeepFM on the {regime} comparison data (data seed {args.data_seeds[0]}, seed "
             f"{args.seeds[0]}, lr {lr:g}, {epochs[regime]} epoch(s)), the comparison's budget; "
             "the embedding tables use RowSparseAdam (no decay: a row would decay only on the "
             "steps that see it), the rest AdamW (decay decoupled from the gradient) or Adam "
             "with L2 in the gradient (the decay a weight gets then depends on its gradient "
             "history). Decided on validation AUC.", ""]
    lines += common.markdown_table(
        ["weight decay", "dense optimizer", "val AUC", "test AUC"],
        [[f"{wd:g}", "AdamW" if dec else "Adam + L2", f"{r['val']:.4f}", f"{r['test']:.4f}"]
         for (wd, dec), r in runs.items()])
    gain = runs[best]["val"] - base["val"]
    lines += ["", f"Best on val: weight decay {best[0]:g} with "
              f"{'AdamW' if best[1] else 'Adam + L2'}, {gain:+.4f} val AUC over AdamW without "
              "decay" + (f"; DeepFM's val AUC std over {len(deepfm['val_auc'])} training seeds "
                         f"is {seed_sd:.4f}" if seed_sd is not None else "") + ".",
              "Rule kept by the trainer: AdamW, weight decay 0 - " + (
                  "no setting beats it by more than 3x the seed std" if seed_sd is not None
                  and gain <= 3 * seed_sd else "but this run cannot confirm it (a single "
                  "training seed, or a setting ahead by more than 3x the seed std: a second "
                  "look is due)"), "",
              f"Written by `{args.command}`.", common.machine_line("cpu", 1)]
    common.write_text(args.out_dir / "stage2_weight_decay.md", "\n".join(lines) + "\n")


def plot(args, results, curve):
    plt = common.pyplot()
    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 3.5), squeeze=False)
    for ax, (regime, r) in zip(axes[0], results.items()):
        gaps = [statistics.mean(x["data_gap"]) for x in r["rows"]]
        ax.bar([x["model"] for x in r["rows"]], gaps,
               yerr=[statistics.pstdev(x["data_gap"]) for x in r["rows"]], capsize=3)
        ax.set(title=f"{regime} ({len(args.data_seeds)} data sets)",
               ylabel="test AUC gap to the oracle (lower is better)")
        ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    common.save_figure(fig, args.out_dir / "stage2_models.png")
    dot = results.get("dot")
    if len(curve) > 1 or dot:
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
        for m, pts in curve.items():
            axes[0].plot(*zip(*pts), marker="o", label=m, ls="--" if m == "oracle" else "-")
        axes[0].set(xscale="log", xlabel="training rows", ylabel="test AUC",
                    title="dot regime: learning curve (first seeds)")
        if curve:
            axes[0].legend(fontsize=8)
        for x in (dot["rows"] if dot else []):
            for i, (d, c) in enumerate(zip(args.data_seeds, x["val_curve"])):
                axes[1].plot(range(1, len(c) + 1), c, marker="o", ls=["-", "--", ":"][i % 3],
                             color=f"C{args.model_list.index(x['model'])}",
                             label=f"{x['model']}, data seed {d}")
        axes[1].set(xlabel="epoch", ylabel="val AUC", title="dot regime: per data set")
        axes[1].legend(fontsize=6, ncol=2)
        fig.tight_layout()
        common.save_figure(fig, args.out_dir / "stage2_learning_curve.png")
