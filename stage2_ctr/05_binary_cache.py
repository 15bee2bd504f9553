"""Stage 2, step 6: parse once, train many times - a binary cache of the loader's output.

What you learn here: parsing text is the one cost of a CTR pipeline that does not shrink with
the model. 02_dataloader.py parses ~0.3M rows/s per core here, which keeps an MLP model busy,
but LR and FM train from memory at 0.1-1M rows/s (Stage 3's 05_throughput.py): for them the
parser is the bottleneck whatever it overlaps with. Production pipelines therefore convert the
text once (Criteo 1TB for DLRM is preprocessed to binary the same way) and stream fixed-width
records from then on. This script stores exactly what CriteoStream yields - dense float32
(N, 13), hashed ids int32 (N, 26), labels float32 (N, T) - as three raw arrays, and
BinaryStream reads them back in blocks of rows: a batch is a slice (no parsing, no
hashing), the OS page cache does the buffering, memory stays bounded by one block of rows.

The cache is tied to its settings (hash bits, dense statistics, label columns): they are in its
meta.json, and BinaryStream refuses a cache whose files do not match it.

Run:    python stage2_ctr/05_binary_cache.py stage2_ctr/data/synthetic/train.txt \\
            --out stage2_ctr/data/synthetic/train.bin [--stats FILE.stats.json] [--workers 2]
        python stage2_ctr/05_binary_cache.py --read stage2_ctr/data/synthetic/train.bin
Import: BinaryStream(folder, batch_size) - the same (dense, sparse, label) batches as
        CriteoStream, sharded over DataLoader workers and DDP ranks the same way
Writes: <out>/{dense,sparse,label}.bin + meta.json (written as <out>.tmp, renamed when complete)
Time:   one pass of the loader: 2M rows in 3.5 s with 2 workers here; reading them back: 0.1 s
"""
import argparse
import importlib.util
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

HERE = Path(__file__).resolve().parent
COLUMNS = {"dense": np.float32, "sparse": np.int32, "label": np.float32}


def load_loader_module():
    """02_dataloader.py starts with a digit: load it by path."""
    if "criteo_loader" in sys.modules:
        return sys.modules["criteo_loader"]
    spec = importlib.util.spec_from_file_location("criteo_loader", HERE / "02_dataloader.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["criteo_loader"] = module
    spec.loader.exec_module(module)
    return module


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("files", nargs="*", help="Criteo-format files (plain or .gz) to convert")
    p.add_argument("--out", help="cache folder to write (e.g. .../train.bin)")
    p.add_argument("--hash-bits", type=int, default=20, help="2^bits buckets (<= 31 for int32)")
    p.add_argument("--stats", default=None, help="dense statistics JSON (02 --fit-stats)")
    p.add_argument("--labels", type=int, default=1, help="label columns before I1 (0..2)")
    p.add_argument("--workers", type=int, default=2, help="parser processes")
    p.add_argument("--read", metavar="FOLDER", help="read a cache once and print rows/s")
    p.add_argument("--batch-size", type=int, default=4096, help="--read: rows per batch")
    args = p.parse_args(argv)
    if not args.read and not (args.files and args.out):
        p.error("give Criteo files and --out FOLDER to convert, or --read FOLDER")
    if not 1 <= args.hash_bits <= 31:
        p.error("--hash-bits must be in [1, 31]: ids are stored as int32")
    if not 0 <= args.labels <= 2 or args.workers < 0 or args.batch_size < 1:
        p.error("--labels must be in [0, 2], --workers >= 0, --batch-size >= 1")
    return args


# ------------------------------------------------------------------------------- writing
def write_cache(files, out, hash_bits=20, stats=None, n_labels=1, workers=2, progress=True):
    """Stream `files` through CriteoStream once and append its arrays to raw files in
    <out>.tmp/, renamed to <out> at the end: an interrupted run leaves no half cache. Rows are
    in the loader's order: with workers, their blocks interleave (deterministically)."""
    loader_mod = load_loader_module()
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    dense_stats = json.loads(Path(stats).read_text()) if stats else None
    stream = loader_mod.CriteoStream(files, 32768, hash_bits, dense_stats, n_labels=n_labels,
                                     verbose=False)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers)
    sinks = {name: open(tmp / f"{name}.bin", "wb") for name in COLUMNS}
    rows, t0 = 0, time.perf_counter()
    try:
        with tqdm(unit=" rows", unit_scale=True, desc="caching", disable=not progress) as bar:
            for dense, sparse, label in loader:
                arrays = {"dense": dense, "sparse": sparse.to(torch.int32),
                          "label": label if label.dim() == 2 else label[:, None]}
                for name, a in arrays.items():
                    sinks[name].write(a.numpy().astype(COLUMNS[name], copy=False).tobytes())
                rows += len(dense)
                bar.update(len(dense))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed run leaves nothing behind
        raise
    finally:
        for f in sinks.values():
            f.close()
    meta = {"script": "stage2_ctr/05_binary_cache.py", "rows": rows,
            "sources": [str(f) for f in files], "hash_bits": hash_bits,
            "dense_stats": str(stats) if stats else None, "n_labels": n_labels,
            "widths": {"dense": int(dense.shape[1]) if rows else 13, "sparse": 26,
                       "label": n_labels},
            "dtypes": {k: np.dtype(v).name for k, v in COLUMNS.items()},
            "seconds": time.perf_counter() - t0}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return meta


# ------------------------------------------------------------------------------- reading
class BinaryStream(torch.utils.data.IterableDataset):
    """(dense float32 (B, 13), sparse int64 (B, 26), label float32 (B,) or (B, T)) batches from
    a cache folder. Rows are read in blocks of `group` batches (~64k rows: one read and one
    int32 -> int64 conversion per block, not per batch - at batch 1024 the per-call costs were
    a third of LR's step); block k goes to shard k mod n_shards (DataLoader workers x DDP ranks),
    so every row is read exactly once per pass. Memory: one block (the file pages are the OS's).
    """

    def __init__(self, folder, batch_size, shuffle=False, seed=0, group=None):
        super().__init__()
        folder = Path(folder)
        meta_path = folder / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{folder}: not a binary cache (no meta.json); make it with "
                                    f"python stage2_ctr/05_binary_cache.py FILE --out {folder}")
        self.meta = json.loads(meta_path.read_text())
        self.rows, self.batch_size = self.meta["rows"], batch_size
        self.group = group or max(1, 65536 // batch_size)
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0
        self.paths = {}
        for name, dtype in COLUMNS.items():
            path = folder / f"{name}.bin"
            width = self.meta["widths"][name]
            expected = self.rows * width * np.dtype(dtype).itemsize
            if not path.is_file() or path.stat().st_size != expected:
                raise ValueError(f"{path}: expected {expected:,} bytes for {self.rows:,} rows x "
                                 f"{width} {np.dtype(dtype).name}; rebuild the cache")
            self.paths[name] = (path, dtype, width)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def _read(self, name, start, stop):
        """Rows [start, stop) of one array: a plain read into a fresh array. (np.memmap would
        do too, but every page it touches stays counted in the process's RSS: a pass over a
        3 GB cache showed 3.4 GB RSS, although it is all reclaimable page cache.)"""
        path, dtype, width = self.paths[name]
        itemsize = np.dtype(dtype).itemsize
        a = np.fromfile(path, dtype, count=(stop - start) * width,
                        offset=start * width * itemsize)
        return a.reshape(stop - start, width)

    def __iter__(self):
        shard, n_shards = load_loader_module().shard_info()
        block_rows = self.batch_size * self.group
        n_blocks = -(-self.rows // block_rows)
        order = np.arange(n_blocks)
        if self.shuffle:  # blocks in a new order each epoch; rows inside a block stay together
            order = np.random.default_rng([self.seed, self.epoch]).permutation(n_blocks)
        for k in order[shard::n_shards]:
            start, stop = k * block_rows, min((k + 1) * block_rows, self.rows)
            dense = torch.from_numpy(self._read("dense", start, stop))
            sparse = torch.from_numpy(self._read("sparse", start, stop).astype(np.int64))
            label = torch.from_numpy(self._read("label", start, stop))
            if label.shape[1] == 1:
                label = label[:, 0]
            yield from zip(dense.split(self.batch_size), sparse.split(self.batch_size),
                           label.split(self.batch_size))


def main(argv=None):
    args = parse_args(argv)
    if args.read:
        try:
            stream = BinaryStream(args.read, args.batch_size)
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(str(e))
        t0, rows = time.perf_counter(), 0
        for dense, sparse, label in tqdm(stream, unit=" batches", desc="reading"):
            rows += len(dense)
        seconds = time.perf_counter() - t0
        print(f"read {rows:,} rows in {seconds:.1f} s ({rows / seconds:,.0f} rows/s) "
              f"from {args.read}")
        return {"rows": rows, "rows_per_s": rows / seconds}
    loader_mod = load_loader_module()
    try:
        files = [loader_mod.check_path(f) for f in args.files]
    except (FileNotFoundError, IsADirectoryError, ValueError) as e:
        raise SystemExit(str(e))
    if args.stats and not Path(args.stats).is_file():
        raise SystemExit(f"{args.stats}: no such statistics file (make it with "
                         f"python stage2_ctr/02_dataloader.py --fit-stats {files[0]})")
    try:
        meta = write_cache(files, args.out, args.hash_bits, args.stats, args.labels,
                           args.workers)
    except ValueError as e:  # too many malformed rows: the loader's line (a worker's error
        raise SystemExit(str(e).strip().splitlines()[-1])  # arrives with its traceback)
    print(f"cached {meta['rows']:,} rows in {meta['seconds']:.1f} s "
          f"({meta['rows'] / max(meta['seconds'], 1e-9):,.0f} rows/s) -> {args.out}")
    return meta


if __name__ == "__main__":
    main()
