"""Stage 2, step 2: a streaming Criteo loader - bytes on disk to (dense, sparse, label) batches.

What you learn here: how a CTR pipeline reads a file far larger than memory (byte blocks cut at
line ends, never the whole file), how the hash trick turns 26 open-ended categorical fields into
ids of one 2^20-row embedding table (and what the collisions cost), how DataLoader workers split
a file into disjoint byte ranges, and why the parser - not the model - often decides the speed:
this parser is 3.44x pandas.read_csv with the same transform, in the same run
(results/stage2_loader.md, written by 06_bench_throughput.py --parts loader).

Read with it: stage2_ctr/criteo.py (the format, the parser, CriteoStream) and train_stats.py (the
statistics, the rare-value filter, the collision counts), top to bottom.
Run:    python stage2_ctr/02_dataloader.py stage2_ctr/data/synthetic/train.txt [--num-workers 2]
        python stage2_ctr/02_dataloader.py --fit-stats stage2_ctr/data/synthetic/train.txt
        python stage2_ctr/02_dataloader.py FILE --report-collisions --hash-bits 18
        (the loader against pandas and pyarrow: stage2_ctr/06_bench_throughput.py --parts loader)
Writes: runs/dataloader/metrics.json (rows, rows/s, bad rows, collisions);
        --fit-stats: <file>.stats.json next to the file
Time:   a few seconds for the 200k-row demo file.
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: plain imports
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import common  # noqa: E402
from stage2_ctr import criteo, train_stats  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("files", nargs="*", help="Criteo-format files (plain or .gz)")
    p.add_argument("--batch-size", type=common.positive_int, default=4096)
    p.add_argument("--hash-bits", type=int, default=20, help="2^bits buckets in the shared table")
    p.add_argument("--stats", default=None, help="dense statistics JSON from --fit-stats")
    p.add_argument("--num-workers", type=common.non_negative_int, default=0,
                   help="DataLoader worker processes")
    p.add_argument("--labels", type=int, default=1, help="label columns before I1 (0..2)")
    p.add_argument("--no-label", action="store_true", help="files have no label (test.txt)")
    p.add_argument("--shuffle-buffer", type=common.non_negative_int, default=0,
                   help="rows shuffled together")
    p.add_argument("--max-bad-fraction", type=common.fraction, default=0.01,
                   help="stop when more rows than this share of a file are malformed")
    p.add_argument("--chunk-kb", type=common.positive_int, default=1024,
                   help="bytes read per block, in KiB (~1 MiB keeps a block's arrays in cache)")
    p.add_argument("--max-batches", type=common.non_negative_int, default=0,
                   help="stop after this many (0 = all)")
    p.add_argument("--group", type=common.positive_int, default=8,
                   help="batches per transfer from a worker process (see iter_batches)")
    p.add_argument("--fit-stats", metavar="FILE", nargs="+",
                   help="compute dense statistics over FILE(s) and write FILE.stats.json")
    p.add_argument("--stats-rows", type=common.positive_int, default=2_000_000,
                   help="rows used by --fit-stats")
    p.add_argument("--report-collisions", action="store_true",
                   help="count distinct values vs buckets at --hash-bits")
    p.add_argument("--threads", type=common.positive_int, default=1,
                   help="torch threads in the main process")
    p.add_argument("--runs-dir", default=str(common.RUNS), help="where metrics.json goes")
    args = p.parse_args(argv)
    if not 1 <= args.hash_bits <= 40:
        p.error("--hash-bits must be in [1, 40]")
    if args.no_label:
        args.labels = 0
    if not 0 <= args.labels <= 8:
        p.error("--labels must be in [0, 8]")
    if not (args.files or args.fit_stats):
        p.error("give Criteo files to read, or --fit-stats FILE")
    return args


def read_through(files, batch_size, hash_bits, stats, n_labels, num_workers, group, chunk_kb,
                 shuffle_buffer=0, max_bad_fraction=0.01, max_batches=0):
    """Every batch of `files` through CriteoStream + DataLoader (workers read disjoint byte
    ranges; each hands over `group` batches per transfer and reports its bad rows at the end).
    Returns rows, seconds, the first batch and the bad-row counts per file (summed over the
    workers; empty when stopped early by max_batches)."""
    stream = criteo.CriteoStream(files, batch_size, hash_bits, stats, n_labels,
                                 chunk_bytes=chunk_kb << 10, shuffle_buffer=shuffle_buffer,
                                 max_bad_fraction=max_bad_fraction,
                                 group=group if num_workers else 1, report=True)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=num_workers)
    rows, first, reports, t0 = 0, None, [], time.perf_counter()
    with tqdm(unit=" rows", unit_scale=True, desc="reading") as bar:
        for i, batch in enumerate(criteo.iter_batches(loader, batch_size, reports)):
            first = first or batch
            rows += len(batch[0])
            bar.update(len(batch[0]))
            if max_batches and i + 1 >= max_batches:
                break
    if first is None:
        raise criteo.CriteoFormatError(f"{files[0]}: no data rows (blank or malformed lines "
                                       "only)")
    return rows, time.perf_counter() - t0, first, criteo.merge_reports(reports)


def show_first_batch(first, hash_bits):
    dense, sparse, label = first
    print(f"first batch: dense {tuple(dense.shape)} {dense.dtype}, sparse "
          f"{tuple(sparse.shape)} {sparse.dtype} (ids < 2^{hash_bits}), label "
          f"{tuple(label.shape)} {label.dtype}")
    print("row 0: dense " + " ".join(f"{v:+.2f}" for v in dense[0, :6].tolist()) + " ... | ids "
          + " ".join(str(v) for v in sparse[0, :4].tolist()) + " ... | label "
          + str(label[0].tolist()))


def fit_and_write_stats(files, max_rows, n_labels):
    stats = train_stats.fit_stats(files, max_rows, n_labels)
    out = Path(str(files[0]) + ".stats.json")
    common.write_json(out, stats)
    print(f"dense statistics over {stats['rows']:,} rows -> {out}")
    print("mean " + " ".join(f"{m:.2f}" for m in stats["mean"]))
    print("missing " + " ".join(f"{m:.0%}" for m in stats["missing_rate"]))
    return stats


def main(argv=None):
    args = parse_args(argv)
    common.set_threads(args.threads)
    try:
        if args.fit_stats:
            return fit_and_write_stats(args.fit_stats, args.stats_rows, args.labels)
        stats = train_stats.load_stats(args.stats) if args.stats else None
        rows, seconds, first, bad = read_through(
            args.files, args.batch_size, args.hash_bits, stats, args.labels,
            args.num_workers, args.group, args.chunk_kb, args.shuffle_buffer,
            args.max_bad_fraction, args.max_batches)
        show_first_batch(first, args.hash_bits)
        print(f"read {rows:,} rows in {seconds:.2f} s = {rows / seconds:,.0f} rows/s "
              f"({args.num_workers} workers, batch {args.batch_size}); peak RSS "
              f"{common.peak_rss_mb(children=True):,.0f} MiB (this process + finished workers)")
        metrics = {"script": "stage2_ctr/02_dataloader.py", "files": args.files,
                   "config": {k: v for k, v in vars(args).items() if k != "files"},
                   "rows": rows, "seconds": seconds, "rows_per_s": rows / seconds,
                   "peak_rss_mb": common.peak_rss_mb(children=True)}
        if bad:
            metrics["bad_rows"] = bad
            print(f"bad rows skipped: {sum(c['bad_rows'] for c in bad.values()):,}")
            for line in criteo.describe_bad_rows(bad):
                print(line)
        if args.report_collisions:
            r = metrics["collisions"] = train_stats.collision_report(
                args.files, args.hash_bits, args.labels)
            print(f"hash collisions at 2^{args.hash_bits}: {r['distinct_values']:,} distinct "
                  f"(field, value) pairs -> {r['distinct_buckets']:,} buckets; "
                  f"{r['values_in_shared_buckets']:.2%} of the values share their bucket with "
                  f"another value ({r['excess_values']:.2%} are values beyond one per bucket)")
    except criteo.CriteoFormatError as e:
        sys.exit(f"error: {e}")
    common.write_json(Path(args.runs_dir) / "dataloader" / "metrics.json", metrics)
    return metrics


if __name__ == "__main__":
    main()
