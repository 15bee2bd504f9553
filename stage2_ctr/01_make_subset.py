"""Stage 2, step 1: Criteo-format train/val/test files - a subset of real Criteo, or synthetic.

What you learn here: the Criteo Display Ads format (label, I1-I13 integer counts, C1-C26 hashed
categoricals, tab-separated, empty = missing), random vs time-ordered splits (Criteo is
chronological: a random split leaks the future), and - with --synthetic - data drawn from a
known click model, so every later experiment can be measured against the best possible score
(the oracle's AUC and log loss) instead of against a leaderboard.

Read with it: stage2_ctr/synthetic.py (the click model), stage2_ctr/dataset_files.py (the
        fast TSV writer, the splits and the folder written whole).
Run:    python stage2_ctr/01_make_subset.py --synthetic 200000              # no download needed
        python stage2_ctr/01_make_subset.py --input train.txt --rows 2000000 --split time
        python stage2_ctr/01_make_subset.py --input day_0.gz --sample-rate 0.05
Writes: <out-dir>/{train,val,test}.txt + meta.json (+ with --synthetic: {split}.oracle.npy)
        default out-dir: stage2_ctr/data/synthetic or stage2_ctr/data/subset
Time:   --synthetic 200000: ~1 s; 2M rows ~4 s; 20M rows ~40 s (the disk decides).
"""
import argparse
import os
import shutil
import sys
import time
from dataclasses import fields
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: plain imports
import numpy as np  # noqa: E402

import common  # noqa: E402
from stage2_ctr import criteo, synthetic  # noqa: E402
from stage2_ctr.dataset_files import DatasetFolderError, DatasetWriter, split_of  # noqa: E402

HERE = Path(__file__).resolve().parent
DOWNLOAD_HELP = """no input file. Real Criteo data is not downloaded by this project:
  - Kaggle Display Advertising Challenge: dac.tar.gz (train.txt 45,840,617 rows, ~11 GB),
    from https://ailab.criteo.com/ressources/ (or Kaggle's "criteo-display-ad-challenge")
  - Criteo 1TB click logs: day_0.gz ... day_23.gz, from the same page
Then: python stage2_ctr/01_make_subset.py --input /path/to/train.txt --rows 2000000
Or, with no download: python stage2_ctr/01_make_subset.py --synthetic 200000"""


def parse_args(argv=None):
    d = synthetic.SyntheticConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", help="real Criteo files (plain or .gz), read in order")
    p.add_argument("--synthetic", type=common.positive_int, metavar="N",
                   help="generate N synthetic rows instead")
    p.add_argument("--rows", type=common.positive_int, help="real data: keep the first N rows")
    p.add_argument("--sample-rate", type=float, help="real data: keep each row with prob. p")
    p.add_argument("--split", choices=["random", "time"], default=d.split,
                   help="random = seeded 8:1:1 per row; time = last 10%% val, then 10%% test")
    p.add_argument("--val-frac", type=float, default=d.val_frac)
    p.add_argument("--test-frac", type=float, default=d.test_frac)
    p.add_argument("--out-dir", help="output folder (default stage2_ctr/data/synthetic|subset)")
    p.add_argument("--seed", type=int, default=d.seed, help="split, sampling and generator seed")
    p.add_argument("--ctr", type=float, default=d.ctr, help="synthetic: target click rate")
    p.add_argument("--tasks", type=task_mode, choices=[1, 2, "funnel"], default=d.tasks,
                   help="synthetic: 2 adds a conversion label after the click label; funnel: "
                        "a conversion that only follows a click (label2 = 1 needs label = 1)")
    p.add_argument("--task-corr", type=float, default=d.task_corr,
                   help="synthetic, --tasks 2: correlation rho of the two tasks' signals "
                        "(funnel: |rho|, its sign from --cvr-relation)")
    p.add_argument("--ctr2", type=float, default=d.ctr2,
                   help="synthetic: second task's rate (funnel: mean pCVR over all impressions)")
    p.add_argument("--selection", choices=["observables", "latent"], default=d.selection,
                   help="synthetic funnel: what drives the click besides the features: nothing "
                        "(observables) or also the latent u the CVR depends on (latent)")
    p.add_argument("--cvr-relation", choices=list(synthetic.CVR_RELATIONS),
                   default=d.cvr_relation,
                   help="synthetic funnel: the CVR signal vs the click signal (rho = +, 0, - "
                        "--task-corr)")
    p.add_argument("--latent-std", type=common.non_negative_float, default=d.latent_std,
                   help="synthetic funnel: weight of the unseen latent u ~ N(0, 1) in the logits")
    p.add_argument("--strength", type=float, default=d.strength,
                   help="synthetic: scale of the planted interactions (0 = first order only)")
    p.add_argument("--interactions", choices=synthetic.REGIMES, default=d.interactions,
                   help="synthetic: what is planted beside first order: lowrank (FM-like pairs "
                        "of rank 4 + three 3rd-order crosses), dot (k-dim dot products between "
                        "four id fields of 300 equally frequent values, sparse side fields), "
                        "fieldpair (a full-rank quadratic form, its own matrix per field pair)")
    p.add_argument("--cross-rank", type=common.positive_int, default=d.cross_rank,
                   help="synthetic, --interactions dot: k of the planted dot products")
    p.add_argument("--side-missing", type=common.fraction, default=d.side_missing,
                   help="synthetic, --interactions dot: share of rows in which each of the 22 "
                        "side fields is missing (0: as informative as in the other regimes)")
    p.add_argument("--chunk-rows", type=common.positive_int, default=d.chunk_rows,
                   help="synthetic: rows per chunk (small chunks stay in the CPU cache)")
    p.add_argument("--workers", type=common.positive_int, default=min(os.cpu_count() or 1, 4),
                   help="synthetic: processes generating chunks in parallel")
    args = p.parse_args(argv)
    if args.synthetic is None and not args.input:
        p.error(DOWNLOAD_HELP)
    if args.sample_rate is not None and not 0 < args.sample_rate <= 1:
        p.error("--sample-rate must be in (0, 1]")
    if not 0 < args.ctr < 1 or not 0 < args.ctr2 < 1:
        p.error("--ctr and --ctr2 must be in (0, 1)")
    if not -1 <= args.task_corr <= 1 or (args.tasks == "funnel" and args.task_corr < 0):
        p.error("--task-corr must be in [-1, 1] (funnel: [0, 1], the sign is --cvr-relation)")
    if args.val_frac < 0 or args.test_frac < 0 or args.val_frac + args.test_frac >= 1:
        p.error("--val-frac and --test-frac must be >= 0 and sum to < 1")
    return args


def task_mode(text):
    """--tasks: 1, 2 or funnel."""
    return text if text == "funnel" else int(text)


def synthetic_config(args):
    """The generator's settings out of the command line (SyntheticConfig's fields)."""
    given = dict(vars(args), rows=args.synthetic)
    return synthetic.SyntheticConfig(**{f.name: given[f.name]
                                        for f in fields(synthetic.SyntheticConfig)})


# ---------------------------------------------------------------------------------- real files
def count_rows(paths):
    return sum(raw.count(b"\n") for path in paths
               for _, _, raw in criteo.iter_blocks(criteo.check_path(path), 16 << 20))


def make_subset(paths, out_dir, rows=None, sample_rate=None, split="random", val_frac=0.1,
                test_frac=0.1, seed=0):
    """Stream real files: keep the first `rows` and/or a `sample_rate` share, split, write.
    Whole lines are copied as bytes (gathered with one index array per block and split)."""
    from tqdm import tqdm
    t0 = time.perf_counter()
    paths = [criteo.check_path(p) for p in paths]
    rng = np.random.default_rng([seed, 5])
    total = None
    if split == "time":  # the split points need the row count first
        total = rows if rows and not sample_rate else None
        if total is None:
            print("time split: counting rows first ...")
            n = count_rows(paths)
            total = min(n, rows or n)
            if sample_rate:
                total = int(total * sample_rate)  # expected; the split uses this estimate
    writer = DatasetWriter(out_dir)  # a temporary folder, swapped in at the end
    seen = kept = 0
    with tqdm(unit=" rows", unit_scale=True, desc="reading") as bar:
        for path in paths:
            for _, _, raw in criteo.iter_blocks(path, 16 << 20):
                arr = np.frombuffer(raw, np.uint8)
                ends = np.flatnonzero(arr == 10) + 1
                begins = np.concatenate([[0], ends[:-1]])
                lengths = ends - begins  # blank lines ("\n", "\r\n") are not rows
                keep = ~((lengths == 1) | ((lengths == 2) & (arr[begins] == 13)))
                if sample_rate:
                    keep &= rng.random(len(ends)) < sample_rate
                if rows:
                    keep &= np.cumsum(keep) <= rows - kept
                seen += len(ends)
                bar.update(len(ends))
                sel = np.flatnonzero(keep)
                which = split_of(rng, len(sel), kept, total or 0, split, val_frac,
                                           test_frac)
                for s in range(3):
                    write_lines(writer, s, arr, begins[sel[which == s]], ends[sel[which == s]])
                kept += len(sel)
                if rows and kept >= rows:
                    break
            if rows and kept >= rows:
                break
    writer.close_splits()
    if kept == 0:
        shutil.rmtree(writer.folder, ignore_errors=True)
        raise criteo.CriteoFormatError(f"{paths[0]}: no data rows (blank lines only?); nothing "
                                       "to split")
    writer.refuse_empty_splits([1 - val_frac - test_frac, val_frac, test_frac],
                               "keep more rows (--rows, --sample-rate), or set --val-frac / "
                               "--test-frac to 0 for a split you do not need")
    report = {name: {"rows": writer.rows[s],
                     "positive_rate": writer.positives[s] / max(writer.rows[s], 1)}
              for s, name in enumerate(DatasetWriter.NAMES)}
    meta = {"script": "stage2_ctr/01_make_subset.py", "kind": "subset",
            "config": {"input": [str(p) for p in paths], "rows": rows,
                       "sample_rate": sample_rate, "split": split, "val_frac": val_frac,
                       "test_frac": test_frac, "seed": seed},
            "rows_read": seen, "splits": report, "seconds": time.perf_counter() - t0}
    common.write_json(writer.folder / "meta.json", meta)
    writer.commit()
    return meta


def write_lines(writer, split, arr, begins, ends):
    """Append the lines [begins[i], ends[i]) of the byte array to one split's file, with LF
    line endings (a CRLF input's '\r' would otherwise stay part of its last field)."""
    if len(begins) == 0:
        return
    lengths = ends - begins
    within = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    data = arr[np.repeat(begins, lengths) + within].tobytes()
    if b"\r" in data:
        data = data.replace(b"\r\n", b"\n")
    writer.write(split, data, len(begins), int((arr[begins] == ord("1")).sum()))


# ---------------------------------------------------------------------------------- main
def print_report(meta, out_dir):
    for name, r in meta["splits"].items():
        line = f"{name:<6}{r['rows']:>12,} rows  positive rate {r['positive_rate']}"
        if "oracle_auc" in r:
            line += (f"  oracle AUC {r['oracle_auc'][0]:.4f} logloss {r['oracle_logloss'][0]:.4f}"
                     f"  (first-order part alone: AUC {r['oracle_auc_first_order_only']:.4f})")
        print(line)
        if "funnel" in r:
            f = r["funnel"]
            print(f"      funnel: pCTR {f['mean_pctr']:.4f}, pCVR {f['mean_pcvr']:.4f} (among "
                  f"clicks {f['cvr_among_clicks']:.4f}), pCTCVR {f['mean_pctcvr']:.4f}; "
                  f"entire-space CVR AUC: best from x {f['cvr_auc_given_x']:.4f}, a clicked-"
                  f"rows fit's target {f['cvr_auc_given_x_click']:.4f}")
    print(f"wrote {out_dir}/{{train,val,test}}.txt"
          + (", *.oracle.npy, meta.json" if meta["kind"] == "synthetic" else ", meta.json"))


def main(argv=None):
    args = parse_args(argv)
    out_dir = Path(args.out_dir) if args.out_dir else HERE / "data" / (
        "synthetic" if args.synthetic else "subset")
    try:
        if args.synthetic:
            cfg = synthetic_config(args)
            meta = synthetic.make_synthetic(cfg, out_dir)
            print(f"generated {cfg.rows:,} rows in {meta['seconds']:.1f} s "
                  f"({meta['rows_per_s']:,.0f} rows/s), {cfg.split} split, seed {cfg.seed}")
        else:
            meta = make_subset(args.input, out_dir, args.rows, args.sample_rate, args.split,
                               args.val_frac, args.test_frac, args.seed)
            print(f"read {meta['rows_read']:,} rows in {meta['seconds']:.1f} s")
    except (criteo.CriteoFormatError, DatasetFolderError) as e:
        sys.exit(f"error: {e}")
    print_report(meta, out_dir)
    return meta


if __name__ == "__main__":
    main()
