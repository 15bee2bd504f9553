"""Parse once, train many times: the binary cache of the loader's output (chapter
stage2_ctr/07_binary_cache.py), read back in blocks (BinaryStream) or whole (read_all), and a
split resident in device memory (Preloaded, the trainer's --preload device).
"""
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from stage2_ctr.criteo import (CriteoFormatError, CriteoStream, check_paths, iter_batches,
                               shard_info)
from stage2_ctr.train_stats import fingerprint, load_stats

COLUMNS = {"dense": np.float32, "sparse": np.int32, "label": np.float32}


def write_cache(files, out, hash_bits=20, stats=None, n_labels=1, workers=2, progress=True):
    """Stream `files` through CriteoStream once and append its arrays to raw files in
    <out>.tmp/, renamed to <out> at the end: an interrupted run leaves no half cache. Rows are
    in the loader's order: with workers, their blocks interleave (deterministically)."""
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    files = check_paths(files)
    dense_stats = load_stats(stats) if stats else None
    stream = CriteoStream(files, 32768, hash_bits, dense_stats, n_labels=n_labels)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers)
    sinks = {name: open(tmp / f"{name}.bin", "wb") for name in COLUMNS}
    rows, t0 = 0, time.perf_counter()
    try:
        with tqdm(unit=" rows", unit_scale=True, desc="caching", disable=not progress) as bar:
            for dense, sparse, label in iter_batches(loader, 32768):
                arrays = {"dense": dense, "sparse": sparse.to(torch.int32),
                          "label": label if label.dim() == 2 else label[:, None]}
                for name, a in arrays.items():
                    sinks[name].write(a.numpy().astype(COLUMNS[name], copy=False).tobytes())
                rows += len(dense)
                bar.update(len(dense))
        if rows == 0:
            raise CriteoFormatError(f"{files[0]}: no data rows (blank or malformed lines only)")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed run leaves nothing behind
        raise
    finally:
        for f in sinks.values():
            f.close()
    meta = {"script": "stage2_ctr/07_binary_cache.py", "rows": rows,
            "sources": [str(f) for f in files], "hash_bits": hash_bits,
            "source_fingerprints": [fingerprint(f) for f in files],
            "dense_stats": str(stats) if stats else None, "n_labels": n_labels,
            "dense_stats_values": ({k: dense_stats[k] for k in ("mean", "std")}
                                   if dense_stats else None),
            "widths": {"dense": int(dense.shape[1]) if rows else 13, "sparse": 26,
                       "label": n_labels},
            "dtypes": {k: np.dtype(v).name for k, v in COLUMNS.items()},
            "seconds": time.perf_counter() - t0}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return meta


class BinaryStream(torch.utils.data.IterableDataset):
    """(dense float32 (B, 13), sparse int64 (B, 26), label float32 (B,) or (B, T)) batches from
    a cache folder. Rows are read in blocks of `group` batches (~64k rows: one read and one
    int32 -> int64 conversion per block, not per batch - per-call costs add up at small
    batches); block k goes to shard k mod n_shards (DataLoader workers x DDP ranks),
    so every row is read exactly once per pass. Memory: one block (the file pages are the OS's).
    """

    def __init__(self, folder, batch_size, shuffle=False, seed=0, group=None, rare_filter=None):
        super().__init__()
        folder = Path(folder)
        self.rare_filter = rare_filter
        meta_path = folder / "meta.json"
        if not meta_path.is_file():
            raise CriteoFormatError(f"{folder}: not a binary cache (no meta.json); make it with "
                                    f"python stage2_ctr/07_binary_cache.py FILE --out {folder}")
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
                    f"stage2_ctr/07_binary_cache.py {source} --out {folder}")

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

    def __iter__(self):
        shard, n_shards = shard_info()
        block_rows = self.batch_size * self.group
        n_blocks = -(-self.rows // block_rows)
        order = np.arange(n_blocks)
        if self.shuffle:  # blocks in a new order each epoch; rows inside a block stay together
            order = np.random.default_rng([self.seed, self.epoch]).permutation(n_blocks)
        for k in order[shard::n_shards]:
            start, stop = k * block_rows, min((k + 1) * block_rows, self.rows)
            dense = torch.from_numpy(self.read_rows("dense", start, stop))
            sparse = self.read_rows("sparse", start, stop).astype(np.int64)
            sparse = torch.from_numpy(self.rare_filter(sparse) if self.rare_filter else sparse)
            label = torch.from_numpy(self.read_rows("label", start, stop))
            if label.shape[1] == 1:
                label = label[:, 0]
            yield from zip(dense.split(self.batch_size), sparse.split(self.batch_size),
                           label.split(self.batch_size))


def is_cache(path):
    """A binary cache folder (written by write_cache) rather than text file(s)."""
    if isinstance(path, (list, tuple)):
        return len(path) == 1 and is_cache(path[0])
    return Path(path).is_dir() and (Path(path) / "meta.json").is_file()


def cache_counts(folder, hash_bits):
    """count_buckets for a binary cache: its ids are already buckets."""
    meta = json.loads((Path(folder) / "meta.json").read_text())
    if meta["hash_bits"] != hash_bits:
        raise CriteoFormatError(f"{folder}: cached at 2^{meta['hash_bits']} buckets, not "
                                f"2^{hash_bits}; rebuild it or pass --hash-bits "
                                f"{meta['hash_bits']}")
    ids = np.fromfile(Path(folder) / "sparse.bin", np.int32)
    return np.bincount(ids, minlength=1 << hash_bits).astype(np.int64)


def read_all(source, hash_bits=20, stats=None, n_labels=1, rare_filter=None):
    """A whole split as three CPU tensors (dense float32, sparse int32, label float32 (N, T)):
    from a binary cache folder (one read per array) or through CriteoStream from text files."""
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
    (ids kept as int32, widened per batch): Criteo Kaggle's 45.8M rows take 7.3 GB."""

    def __init__(self, tensors, batch_size, device, shuffle=False, seed=0):
        self.dense, self.sparse, self.label = (t.to(device) for t in tensors)
        if self.label.dim() == 2 and self.label.shape[1] == 1:
            self.label = self.label[:, 0]
        self.batch_size, self.device = batch_size, torch.device(device)
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0

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
