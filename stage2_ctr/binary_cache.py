"""Parse once, train many times: the binary cache of the loader's output (chapter
stage2_ctr/07_binary_cache.py), read back in blocks (BinaryStream) or whole (read_all), and a
split resident in device memory (Preloaded, the trainer's --preload device, made by preload in
chunks so that host memory stays one chunk whatever the split's size).
"""
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import common
from stage2_ctr.criteo import (CriteoFormatError, CriteoStream, check_paths, iter_batches,
                               merge_reports, shard_info)
from stage2_ctr.train_stats import fingerprint, load_stats

COLUMNS = {"dense": np.float32, "sparse": np.int32, "label": np.float32}
SCRIPT = "stage2_ctr/07_binary_cache.py"
META_KEYS = ("rows", "hash_bits", "widths", "n_labels")  # what a reader of a cache relies on


def check_out(out):
    """The folder write_cache may fill: absent, empty, or an older cache (its meta.json written
    by this script and nothing but a cache's files in it). Anything else - a data set folder, a
    file - would be lost when the new cache is swapped in: one line instead."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise common.OutputError(f"--out {out}: is a file, not a cache folder; choose a new "
                                 f"folder name (e.g. {out.with_suffix('.bin')})")
    if out.is_dir() and any(out.iterdir()):
        try:
            is_ours = json.loads((out / "meta.json").read_text()).get("script") == SCRIPT
        except (OSError, ValueError, AttributeError):
            is_ours = False
        others = sorted(p.name for p in out.iterdir()
                        if p.name not in {f"{n}.bin" for n in COLUMNS} | {"meta.json"})
        if not is_ours or others:
            raise common.OutputError(
                f"--out {out}: holds files that are not a binary cache "
                f"({', '.join(others[:3]) or 'meta.json of another script'}); a cache replaces "
                "its whole folder, so give a new folder (e.g. .../train.bin)")
    common.check_writable(out.parent, "--out")
    return out


def write_cache(files, out, hash_bits=20, stats=None, n_labels=1, workers=2, progress=True):
    """Stream `files` through CriteoStream once and append its arrays to raw files in a temp
    folder beside <out>, swapped in at the end: an interrupted run leaves no half cache, and an
    existing <out> is replaced only when it is a cache (check_out). `stats`: a statistics JSON
    path, its loaded dict, or None (raw log1p values). meta.json records the hash bits, the
    statistics used, the sources' fingerprints and the bad rows skipped per file. Rows are in
    the loader's order: with workers, their blocks interleave (deterministically)."""
    out = check_out(out)
    files = check_paths(files)
    dense_stats = load_stats(stats) if isinstance(stats, (str, Path)) else stats
    try:
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=out.name + ".", suffix=".tmp"))
    except OSError as e:
        raise common.output_problem(out, e) from None
    stream = CriteoStream(files, 32768, hash_bits, dense_stats, n_labels=n_labels, report=True)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers)
    rows, t0, reports = 0, time.perf_counter(), []
    try:
        sinks = {name: open(tmp / f"{name}.bin", "wb") for name in COLUMNS}
        try:
            with tqdm(unit=" rows", unit_scale=True, desc="caching", disable=not progress) as bar:
                for dense, sparse, label in iter_batches(loader, 32768, reports):
                    arrays = {"dense": dense, "sparse": sparse.to(torch.int32),
                              "label": label if label.dim() == 2 else label[:, None]}
                    for name, a in arrays.items():
                        sinks[name].write(a.numpy().astype(COLUMNS[name], copy=False).tobytes())
                    rows += len(dense)
                    bar.update(len(dense))
        finally:
            for f in sinks.values():
                f.close()
        if rows == 0:
            raise CriteoFormatError(f"{files[0]}: no data rows (blank or malformed lines only)")
        meta = {"script": SCRIPT, "rows": rows,
                "sources": [str(f) for f in files], "hash_bits": hash_bits,
                "source_fingerprints": [fingerprint(f) for f in files],
                "dense_stats": str(stats) if isinstance(stats, (str, Path)) else (
                    "fitted on the sources" if stats else None), "n_labels": n_labels,
                "dense_stats_values": ({k: list(dense_stats[k]) for k in ("mean", "std")}
                                       if dense_stats else None),
                "bad_rows": merge_reports(reports),
                "widths": {"dense": int(dense.shape[1]), "sparse": 26, "label": n_labels},
                "dtypes": {k: np.dtype(v).name for k, v in COLUMNS.items()},
                "seconds": time.perf_counter() - t0}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        old = out.with_name(out.name + f".old{os.getpid()}.tmp")
        if out.exists():
            os.replace(out, old)  # a cache (check_out): set aside, then removed
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        raise common.output_problem(out, e) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed run leaves nothing behind
    return meta


def read_meta(folder):
    """A cache's meta.json, checked: readable JSON with the fields a reader needs, or one line."""
    path = Path(folder) / "meta.json"
    try:
        meta = json.loads(path.read_text())
        missing = [k for k in META_KEYS if k not in meta]
    except (OSError, ValueError, AttributeError, TypeError) as e:
        meta, missing = None, [type(e).__name__]
    if meta is None or missing:
        raise CriteoFormatError(f"{path}: broken or incomplete meta.json of a binary cache "
                                f"({'no ' + ', '.join(missing) if meta else missing[0]}); "
                                f"rebuild it with python {SCRIPT} FILE --out {folder}")
    return meta


class BinaryStream(torch.utils.data.IterableDataset):
    """(dense float32 (B, 13), sparse int64 (B, 26), label float32 (B,) or (B, T)) batches from
    a cache folder. Rows are read in blocks of whole batches (~64k rows: one read and one
    int32 -> int64 conversion per block, not per batch - per-call costs add up at small
    batches); block k goes to shard k mod n_shards (DataLoader workers x DDP ranks), so every
    row is read exactly once per pass. The number of blocks is a multiple of n_shards, so the
    shards differ by less than one block's remainder (a small cache still gives every shard
    rows). shuffle: blocks in a new order each epoch and the rows inside each block permuted
    (a cache of one block is shuffled too). Memory: one block (the file pages are the OS's)."""

    def __init__(self, folder, batch_size, shuffle=False, seed=0, group=None, rare_filter=None):
        super().__init__()
        folder = Path(folder)
        self.rare_filter = rare_filter
        if not (folder / "meta.json").is_file():
            raise CriteoFormatError(f"{folder}: not a binary cache (no meta.json); make it with "
                                    f"python {SCRIPT} FILE --out {folder}")
        self.meta = read_meta(folder)
        self.rows, self.batch_size = self.meta["rows"], batch_size
        self.group = group or max(1, 65536 // batch_size)
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0
        self.paths = {}
        for name, dtype in COLUMNS.items():
            path = folder / f"{name}.bin"
            width = self.meta["widths"][name]
            expected = self.rows * width * np.dtype(dtype).itemsize
            if not path.is_file() or path.stat().st_size != expected:
                raise CriteoFormatError(f"{path}: expected {expected:,} bytes for "
                                        f"{self.rows:,} rows x {width} "
                                        f"{np.dtype(dtype).name}; rebuild the cache")
            self.paths[name] = (path, dtype, width)
        for before in self.meta.get("source_fingerprints", []):  # a source that changed since
            source = Path(before["path"])
            if source.is_file() and fingerprint(source) != before:
                raise CriteoFormatError(
                    f"{folder}: made from {source} as it was then ({before['size']:,} bytes); "
                    "that file has changed since: rebuild the cache with python "
                    f"{SCRIPT} {source} --out {folder}")

    def set_epoch(self, epoch):
        self.epoch = epoch

    def read_rows(self, name, start, stop):
        """Rows [start, stop) of one array: a plain read into a fresh array. (np.memmap would
        do too, but every page it touches stays counted in the process's RSS, although it is
        all reclaimable page cache: a pass over a large cache would look like a leak.)"""
        path, dtype, width = self.paths[name]
        itemsize = np.dtype(dtype).itemsize
        a = np.fromfile(path, dtype, count=(stop - start) * width,
                        offset=start * width * itemsize)
        return a.reshape(stop - start, width)

    def blocks(self, n_shards):
        """(n_blocks, rows per block): at most group batches a block, whole batches, and a
        multiple of n_shards blocks."""
        target = self.batch_size * self.group
        n_blocks = n_shards * -(-self.rows // (n_shards * target))
        per_block = self.batch_size * -(-self.rows // (self.batch_size * n_blocks))
        return n_blocks, per_block

    def __iter__(self):
        shard, n_shards = shard_info()
        n_blocks, block_rows = self.blocks(n_shards)
        order = np.arange(n_blocks)
        rng = np.random.default_rng([self.seed, self.epoch])
        if self.shuffle:
            order = rng.permutation(n_blocks)
        for k in order[shard::n_shards]:
            start, stop = k * block_rows, min((k + 1) * block_rows, self.rows)
            if start >= stop:
                continue
            rows = (np.random.default_rng([self.seed, self.epoch, k]).permutation(stop - start)
                    if self.shuffle else slice(None))
            dense = torch.from_numpy(self.read_rows("dense", start, stop)[rows])
            sparse = self.read_rows("sparse", start, stop)[rows].astype(np.int64)
            sparse = torch.from_numpy(self.rare_filter(sparse) if self.rare_filter else sparse)
            label = torch.from_numpy(self.read_rows("label", start, stop)[rows])
            if label.shape[1] == 1:
                label = label[:, 0]
            yield from zip(dense.split(self.batch_size), sparse.split(self.batch_size),
                           label.split(self.batch_size))


def is_cache(path):
    """A binary cache folder (written by write_cache) rather than text file(s)."""
    if isinstance(path, (list, tuple)):
        return len(path) == 1 and is_cache(path[0])
    return Path(path).is_dir() and (Path(path) / "meta.json").is_file()


def check_for_training(folder, hash_bits, batch_size):
    """A cache as a trainer's train split: whole (BinaryStream checks its files and that its
    sources did not change), one label column, and hashed into as many buckets as val and test
    will be (else their ids would mean other rows of the table). Returns its meta.json."""
    meta = BinaryStream(folder, batch_size).meta
    if meta["n_labels"] != 1:
        raise CriteoFormatError(f"--train {folder}: a cache of {meta['n_labels']} label columns"
                                " (07 --labels); this trainer learns one: rebuild it with "
                                "--labels 1")
    if meta["hash_bits"] != hash_bits:
        raise CriteoFormatError(f"--train {folder}: cached at 2^{meta['hash_bits']} buckets, "
                                f"but val/test would be hashed into 2^{hash_bits}: pass "
                                f"--hash-bits {meta['hash_bits']}, or rebuild the cache with "
                                f"--hash-bits {hash_bits}")
    return meta


def baked_stats(folder, stats_path=None):
    """The dense statistics a cache was made with (None: raw values), which val and test must
    use too; a --stats file that differs from them is refused."""
    meta = read_meta(folder)
    baked = meta.get("dense_stats_values")
    given = stats_path and load_stats(stats_path)
    if given and (baked is None or any([float(x) for x in given[k]] != baked[k]
                                       for k in ("mean", "std"))):
        raise CriteoFormatError(f"--stats {stats_path}: other dense statistics than the cache "
                                f"{folder} was made with ({meta.get('dense_stats')}); leave "
                                "--stats out (the cache's are used), or rebuild the cache with "
                                f"--stats {stats_path}")
    return baked


def cache_counts(folder, hash_bits):
    """count_buckets for a binary cache: its ids are already buckets."""
    meta = read_meta(folder)
    if meta["hash_bits"] != hash_bits:
        raise CriteoFormatError(f"{folder}: cached at 2^{meta['hash_bits']} buckets, not "
                                f"2^{hash_bits}; rebuild it or pass --hash-bits "
                                f"{meta['hash_bits']}")
    ids = np.fromfile(Path(folder) / "sparse.bin", np.int32)
    return np.bincount(ids, minlength=1 << hash_bits).astype(np.int64)


def read_all(source, hash_bits=20, stats=None, n_labels=1, rare_filter=None):
    """A whole split as three CPU tensors (dense float32, sparse int32, label float32 (N, T)):
    from a binary cache folder (one read per array) or through CriteoStream from text files.
    Holds the whole split in host memory: for the trainer's --preload, preload() is the
    chunked way."""
    if is_cache(source):
        stream = BinaryStream(source[0] if isinstance(source, (list, tuple)) else source, 1)
        dense, sparse, label = (torch.from_numpy(stream.read_rows(name, 0, stream.rows))
                                for name in COLUMNS)
    else:
        parts = list(CriteoStream(source, 1 << 16, hash_bits, stats, n_labels))
        if not parts:
            raise CriteoFormatError(f"{source}: no data rows")
        dense, sparse, label = (torch.cat(p) for p in zip(*parts))
        sparse, label = sparse.to(torch.int32), label.reshape(len(label), -1)
    if rare_filter is not None:
        sparse = rare_filter(sparse.long()).to(torch.int32)
    return dense, sparse, label


class Preloaded:
    """A whole split resident in device memory (GPU memory, or CPU RAM), batched by index:
    the next batch is a gather from tensors already on the device, so nothing crosses the
    PCIe bus and no process parses. shuffle: a new permutation per epoch, drawn on the
    device from (seed, epoch); without it, batches are slices in file order (the same batches
    as the text loader's). Memory: 13 x 4 + 26 x 4 + 4 x T = 160 bytes a row for one label
    (ids kept as int32, widened per batch): Criteo Kaggle's 45.8M rows take 7.3 GB.
    `bad_rows`: the per-file counts of the rows skipped while loading (preload)."""

    def __init__(self, tensors, batch_size, device, shuffle=False, seed=0, bad_rows=None):
        self.dense, self.sparse, self.label = (t.to(device) for t in tensors)
        if self.label.dim() == 2 and self.label.shape[1] == 1:
            self.label = self.label[:, 0]
        self.batch_size, self.device = batch_size, torch.device(device)
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0
        self.bad_rows = bad_rows or {}

    def __len__(self):
        return len(self.label)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        n, b = len(self.label), self.batch_size
        if not self.shuffle:
            for i in range(0, n, b):
                yield self.dense[i:i + b], self.sparse[i:i + b].long(), self.label[i:i + b]
            return
        g = torch.Generator(device=self.device).manual_seed(self.seed * 1_000_003 + self.epoch)
        for idx in torch.randperm(n, generator=g, device=self.device).split(b):
            yield self.dense[idx], self.sparse[idx].long(), self.label[idx]


CHUNK_ROWS = 1 << 16  # rows a preload moves to the device at a time
ROW_BYTES = 13 * 4 + 26 * 4 + 4  # a row on the device, one label


def preload_plan(source):
    """(rows, device bytes, host bytes) a preload of `source` (this rank's shard) will need,
    before it starts. A cache knows its rows; for text they are estimated from the size of
    the files and the bytes per line of the first MiB. Device: the rows at ROW_BYTES, twice for
    text (its chunks are joined at the end, not written into place: the row count is not known
    before the pass). Host: one chunk as the parser holds it (its raw bytes, the parsed
    float64/uint64 arrays and the tensors: ~4 x ROW_BYTES a row) - bounded, whatever the split."""
    shard, n_shards = shard_info()
    if is_cache(source):
        rows = read_meta(source[0] if isinstance(source, (list, tuple)) else source)["rows"]
        rows = rows * (shard + 1) // n_shards - rows * shard // n_shards
        return rows, rows * ROW_BYTES, CHUNK_ROWS * ROW_BYTES * 2
    paths = check_paths(source)
    with open(paths[0], "rb") as f:
        head = f.read(1 << 20)
    per_line = max(len(head) / max(head.count(b"\n"), 1), 1)
    rows = int(sum(os.path.getsize(p) for p in paths) / per_line / n_shards)
    return rows, 2 * rows * ROW_BYTES, CHUNK_ROWS * ROW_BYTES * 4 + (2 << 20)


def preload(source, batch_size, device, hash_bits=20, stats=None, rare_filter=None,
            shuffle=False, seed=0):
    """Preloaded from a cache folder or text files, streamed to the device CHUNK_ROWS rows at a
    time (the RareFilter applied there, per chunk): the host never holds the whole split. Under
    DDP each rank loads its shard only (a cache: its contiguous 1/world of the rows; text: its
    byte range, as CriteoStream shards it)."""
    device = torch.device(device)
    reports = []
    if is_cache(source):
        stream = BinaryStream(source[0] if isinstance(source, (list, tuple)) else source, 1)
        shard, n_shards = shard_info()
        lo, hi = stream.rows * shard // n_shards, stream.rows * (shard + 1) // n_shards
        out = [torch.empty((hi - lo, stream.meta["widths"][n]), device=device,
                           dtype=torch.int32 if n == "sparse" else torch.float32)
               for n in COLUMNS]
        for start in range(lo, hi, CHUNK_ROWS):
            stop = min(start + CHUNK_ROWS, hi)
            for t, name in zip(out, COLUMNS):
                t[start - lo:stop - lo] = torch.from_numpy(stream.read_rows(name, start, stop))
            if rare_filter is not None:
                ids = out[1][start - lo:stop - lo]
                ids.copy_(rare_filter(ids.long()))
        bad_rows = stream.meta.get("bad_rows", {})
    else:
        text = CriteoStream(source, CHUNK_ROWS, hash_bits, stats, report=True)
        parts = []
        for item in text:
            if isinstance(item, dict):
                reports.append(item)
                continue
            dense, sparse, label = (t.to(device) for t in item)
            sparse = rare_filter(sparse) if rare_filter is not None else sparse
            parts.append((dense, sparse.to(torch.int32), label.reshape(len(label), -1)))
        if not parts:
            raise CriteoFormatError(f"{text.paths[0]}: no data rows")
        out = [torch.cat(p) for p in zip(*parts)]
        del parts
        bad_rows = merge_reports(reports)
    return Preloaded(out, batch_size, device, shuffle=shuffle, seed=seed, bad_rows=bad_rows)
