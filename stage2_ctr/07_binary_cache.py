"""Stage 2, step 7: parse once, train many times - a binary cache of the loader's output.

What you learn here: parsing text is the one cost of a CTR pipeline that does not shrink with
the model. The text loader (02) parses ~0.3M rows/s per core here, which keeps an MLP model busy,
but LR and FM train from memory at 0.1-1M rows/s (Stage 3's 05_throughput.py): for them the
parser is the bottleneck whatever it overlaps with. Production pipelines therefore convert the
text once (Criteo 1TB for DLRM is preprocessed to binary the same way) and stream fixed-width
records from then on. This script stores exactly what CriteoStream yields - dense float32
(N, 13), hashed ids int32 (N, 26), labels float32 (N, T) - as three raw arrays, and
BinaryStream reads them back in blocks of rows: a batch is a slice (no parsing, no
hashing), the OS page cache does the buffering, memory stays bounded by one block of rows.

The cache is tied to its settings (hash bits, dense statistics, label columns), its sources
(fingerprints) and the bad rows skipped while making it: all in its meta.json. BinaryStream
refuses a cache whose files do not match it, the trainer one made with other hash bits or
statistics than the run's. Without --stats the dense statistics are the ones the trainer fits
on the same file (<train>.stats.json when it is fresh, else fitted here the same way), so a run
from the cache trains on what a run from the text would. --out is only ever replaced when it is
a cache: a folder holding anything else is refused.

Read with it: stage2_ctr/binary_cache.py.
Run:    python stage2_ctr/07_binary_cache.py stage2_ctr/data/synthetic/train.txt \\
            --out stage2_ctr/data/synthetic/train.bin [--stats FILE.stats.json] [--workers 2]
        python stage2_ctr/07_binary_cache.py --read stage2_ctr/data/synthetic/train.bin
Import: binary_cache.BinaryStream(folder, batch_size) - the same (dense, sparse, label) batches as
        CriteoStream, sharded over DataLoader workers and DDP ranks the same way
Writes: <out>/{dense,sparse,label}.bin + meta.json (written as <out>.tmp, renamed when complete)
Time:   one pass of the loader: 2M rows in 3.5 s with 2 workers here; reading them back: 0.1 s
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: plain imports
from tqdm import tqdm  # noqa: E402

import common  # noqa: E402
from stage2_ctr import binary_cache, criteo, train_stats  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("files", nargs="*", help="Criteo-format files (plain or .gz) to convert")
    p.add_argument("--out", help="cache folder to write (e.g. .../train.bin)")
    p.add_argument("--hash-bits", type=common.checked(int, lambda v: 1 <= v <= 31,
                                                      "in [1, 31] (ids are stored as int32)"),
                   default=20, help="2^bits buckets")
    p.add_argument("--stats", default=None, help="dense statistics JSON (02 --fit-stats; "
                   "default: the trainer's, <first file>.stats.json or fitted the same way)")
    p.add_argument("--labels", type=common.checked(int, lambda v: 0 <= v <= 2, "in [0, 2]"),
                   default=1, help="label columns before I1")
    p.add_argument("--workers", type=common.non_negative_int, default=2, help="parser processes")
    p.add_argument("--read", metavar="FOLDER", help="read a cache once and print rows/s")
    p.add_argument("--batch-size", type=common.positive_int, default=4096,
                   help="--read: rows per batch")
    args = p.parse_args(argv)
    if not args.read and not (args.files and args.out):
        p.error("give Criteo files and --out FOLDER to convert, or --read FOLDER")
    return args


def trainer_stats(files, n_labels):
    """What train_ctr.py would standardize with on these files: <first>.stats.json when it was
    fitted on them as they are now, else the same fit (first 1M rows) done here."""
    beside = Path(str(files[0]) + ".stats.json")
    try:
        return train_stats.load_stats(beside, files)
    except criteo.CriteoFormatError:  # missing, broken or stale
        return train_stats.fit_stats(files, 1_000_000, n_labels=n_labels)


def read_once(folder, batch_size):
    """One pass over a cache in this process: rows/s."""
    stream = binary_cache.BinaryStream(folder, batch_size)
    t0, rows = time.perf_counter(), 0
    for dense, sparse, label in tqdm(stream, unit=" batches", desc="reading"):
        rows += len(dense)
    seconds = time.perf_counter() - t0
    print(f"read {rows:,} rows in {seconds:.1f} s ({rows / seconds:,.0f} rows/s) from {folder}")
    return {"rows": rows, "rows_per_s": rows / seconds}


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.read:
            return read_once(args.read, args.batch_size)
        files = criteo.check_paths(args.files)
        if args.stats and not Path(args.stats).is_file():
            raise criteo.CriteoFormatError(
                f"{args.stats}: no such statistics file (make it with python "
                f"stage2_ctr/02_dataloader.py --fit-stats {files[0]})")
        binary_cache.check_out(args.out)  # before the statistics pass: nothing to lose
        stats = args.stats or (trainer_stats(files, args.labels) if args.labels else None)
        meta = binary_cache.write_cache(files, args.out, args.hash_bits, stats,
                                        args.labels, args.workers)
    except (criteo.CriteoFormatError, common.OutputError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit(f"error: interrupted (Ctrl-C); {args.out} is as it was (the cache is swapped "
                 "in only when complete)")
    for line in criteo.describe_bad_rows(meta["bad_rows"]):
        print(line)
    print(f"cached {meta['rows']:,} rows in {meta['seconds']:.1f} s "
          f"({meta['rows'] / max(meta['seconds'], 1e-9):,.0f} rows/s) -> {args.out}")
    return meta


if __name__ == "__main__":
    main()
