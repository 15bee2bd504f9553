"""Stage 2, step 2: a streaming Criteo loader - bytes on disk to (dense, sparse, label) batches.

What you learn here: how a CTR pipeline reads a file far larger than memory (byte blocks cut at
line ends, never the whole file), how the hash trick turns 26 open-ended categorical fields into
ids of one 2^20-row embedding table, and why the parser - not the GPU - decides the training
speed: a GPU eats 1-5M rows/s, a textbook pandas loop feeds ~0.1M.

The parser works on the raw bytes with numpy (no per-row Python): find every tab/newline once,
check each line has 40 fields, gather every field as one 8-byte word (unaligned uint64 view),
parse integers with SWAR arithmetic (8 digits in 3 multiplies) and hash categoricals with a
splitmix64 mix of (field salt, length, bytes). Bad rows are skipped, counted and reported.

Run:    python stage2_ctr/02_dataloader.py FILE [FILE ...]             # demo: batches + rows/s
        python stage2_ctr/02_dataloader.py --fit-stats stage2_ctr/data/synthetic/train.txt
        python stage2_ctr/02_dataloader.py --bench stage2_ctr/data/synthetic/train.txt
Import: CriteoStream(paths, batch_size, hash_bits=20, dense_stats=...) from train_ctr.py (by
        path); with DataLoader workers use group=8 and iter_batches() (see there why)
Writes: --fit-stats: <file>.stats.json next to the file;  --bench: runs/bench_loader/metrics.json

Output of CriteoStream, one tuple per batch (B rows, T label columns):
  dense  float32 (B, 13)   log1p(max(x, 0)), standardized with --fit-stats statistics when given;
                           missing -> 0 (the mean after standardization); (B, 26) with
                           missing_indicator=True: 13 values then 13 is-missing flags
  sparse int64   (B, 26)   hash bucket in [0, 2^hash_bits) of (field, value): one shared table,
                           field-salted hashing; a missing value hashes as the empty string of
                           its field, so each field's "missing" has a bucket of its own
  label  float32 (B,)      or (B, T) when n_labels = T > 1 (columns: label_1 .. label_T)
"""
import argparse
import gzip
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import torch

N_DENSE, N_SPARSE = 13, 26
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
HASH_SEED = 0x5EED_C217  # part of the data format: changing it changes every bucket

U64 = np.uint64
# BYTE_MASK[L] keeps the first L bytes (little-endian: the low bytes) of a gathered word.
BYTE_MASK = np.array([(1 << (8 * L)) - 1 for L in range(8)] + [2**64 - 1], dtype=U64)


class CriteoFormatError(ValueError):
    """Bad input file: the message is one line naming the file and what to do."""


# ------------------------------------------------------------------------------------ hashing
def splitmix64(z):
    """The splitmix64 finalizer: a cheap, well-mixed 64-bit -> 64-bit bijection (uint64 wraps)."""
    z = z ^ (z >> U64(30))
    z = z * U64(0xBF58476D1CE4E5B9)
    z = z ^ (z >> U64(27))
    z = z * U64(0x94D049BB133111EB)
    return z ^ (z >> U64(31))


FIELD_SALT = splitmix64(np.arange(1, N_SPARSE + 1, dtype=U64) + U64(HASH_SEED))


def hash_strings(field, strings):
    """Reference hash of Python strings for one field - the same numbers the vectorized parser
    computes. For tests and for reading one value by hand, never in the hot path."""
    out = []
    for s in strings:
        b = s.encode() if isinstance(s, str) else bytes(s)
        words = [int.from_bytes(b[i:i + 8].ljust(8, b"\0"), "little") for i in
                 range(0, max(len(b), 1), 8)]
        h = splitmix64(np.array([words[0]], U64) ^ U64(len(b) << 56) ^ FIELD_SALT[field])
        for w in words[1:]:
            h = splitmix64(h ^ U64(w))
        out.append(int(h[0]))
    return np.array(out, dtype=U64)


def bucket_of(hashes, hash_bits):
    """Top hash_bits bits of the 64-bit hash: the row of the shared embedding table."""
    return (hashes >> U64(64 - hash_bits)).astype(np.int64)


# ------------------------------------------------------------------------------------ parsing
def words_view(block):
    """Every byte offset of `block` seen as the start of a little-endian uint64 (unaligned)."""
    return np.ndarray(shape=(len(block) - 7,), dtype=U64, buffer=block, strides=(1,))


def parse_int_fields(block, words, starts, lens):
    """Decimal integers (optional leading '-') at byte offsets `starts`, lengths `lens`.
    Returns (float64 values with NaN where empty, bool ok). Up to 8 digits: SWAR, i.e. the
    word's digits are right-aligned with '0' padding and combined pairwise in 3 multiplies.
    Longer numbers (rare) take a per-digit loop over just those fields."""
    neg = (lens > 0) & (block[starts] == ord("-"))
    s, n = starts + neg, lens - neg
    w = words[s] & BYTE_MASK[np.minimum(n, 8)]
    shift = (8 - np.minimum(n, 8)).astype(U64) * U64(8)
    w = (w << shift) | (U64(0x3030303030303030) & BYTE_MASK[8 - np.minimum(n, 8)])
    # every byte must be an ASCII digit: high nibble 3 and low nibble <= 9
    ok = ((w & U64(0xF0F0F0F0F0F0F0F0)) == U64(0x3030303030303030)) & \
         (((w + U64(0x0606060606060606)) & U64(0xF0F0F0F0F0F0F0F0)) == U64(0x3030303030303030))
    w = ((w & U64(0x0F0F0F0F0F0F0F0F)) * U64(2561)) >> U64(8)
    w = ((w & U64(0x00FF00FF00FF00FF)) * U64(6553601)) >> U64(16)
    w = ((w & U64(0x0000FFFF0000FFFF)) * U64(42949672960001)) >> U64(32)
    values = w.astype(np.float64)
    long = np.flatnonzero(n > 8)
    if len(long):  # "a huge integer is valid": float64 keeps its magnitude
        acc, ok_long = np.zeros(len(long)), np.ones(len(long), bool)
        for k in range(int(n[long].max())):
            active = n[long] > k
            digit = block[s[long] + np.where(active, k, 0)].astype(np.int64) - 48
            ok_long &= ~active | ((digit >= 0) & (digit <= 9))
            acc = np.where(active, acc * 10 + digit, acc)
        values[long], ok[long] = acc, ok_long
    ok &= ~(neg & (n == 0))  # a lone "-"
    values = np.where(neg, -values, values)
    values[lens == 0] = np.nan
    return values, ok


def hash_fields(block, words, starts, lens):
    """64-bit hash per (row, field) of the bytes at starts/lens; shape (n, 26)."""
    w = words[starts] & BYTE_MASK[np.minimum(lens, 8)]
    h = splitmix64(w ^ (lens.astype(U64) << U64(56)) ^ FIELD_SALT)
    long_r, long_c = np.nonzero(lens > 8)
    if len(long_r):  # values longer than 8 bytes: fold in one more word at a time
        for k in range(1, int((lens[long_r, long_c].max() + 7) // 8)):
            rest = lens[long_r, long_c] - 8 * k
            sel = rest > 0
            r, c = long_r[sel], long_c[sel]
            wk = words[starts[r, c] + 8 * k] & BYTE_MASK[np.minimum(rest[sel], 8)]
            h[r, c] = splitmix64(h[r, c] ^ wk)
    return h


def parse_block(block, n_labels=1):
    """Parse a block of whole lines (uint8 array ending in b'\\n', followed by >= 8 pad bytes).

    Returns dict: label (n, T) float32 or None, dense_raw (n, 13) float64 with NaN = missing,
    hashes (n, 26) uint64, and bad = [(line index within block, why), ...] for skipped lines.
    """
    n_cols = n_labels + N_DENSE + N_SPARSE
    data_len = len(block) - 8
    seps = np.flatnonzero(block[:data_len] < 11)
    seps = seps[(block[seps] == 9) | (block[seps] == 10)]
    is_nl = block[seps] == 10
    nl_at = np.flatnonzero(is_nl)  # index into seps of each line's newline
    fields_per_line = np.diff(nl_at, prepend=-1)
    line_start = np.concatenate([[0], seps[nl_at[:-1]] + 1])
    blank = (fields_per_line == 1) & (seps[nl_at] == line_start)
    good = fields_per_line == n_cols
    bad = [(int(i), f"expected {n_cols} fields, got {int(fields_per_line[i])}")
           for i in np.flatnonzero(~good & ~blank)[:5]]
    n_bad_fields = int((~good & ~blank).sum())
    if good.all():
        ends = seps.reshape(-1, n_cols)
    else:
        ends = seps[np.repeat(good, fields_per_line)].reshape(-1, n_cols)
    good_lines = np.flatnonzero(good)
    starts = np.empty_like(ends)
    starts[:, 0] = line_start[good_lines]
    starts[:, 1:] = ends[:, :-1] + 1
    lens = ends - starts
    words = words_view(block)

    row_ok = np.ones(len(ends), bool)
    why = np.full(len(ends), "", dtype=object) if len(ends) else np.array([], dtype=object)
    label = None
    if n_labels:
        lab = block[starts[:, :n_labels]]
        lab_ok = ((lab == ord("0")) | (lab == ord("1"))) & (lens[:, :n_labels] == 1)
        row_bad = ~lab_ok.all(1)
        why[row_bad & row_ok] = "label is not 0/1"
        row_ok &= ~row_bad
        label = (lab == ord("1")).astype(np.float32)
    d = slice(n_labels, n_labels + N_DENSE)
    dense_raw, int_ok = parse_int_fields(block, words, starts[:, d].ravel(), lens[:, d].ravel())
    int_ok = int_ok.reshape(-1, N_DENSE).all(1)
    why[~int_ok & row_ok] = "an integer field does not parse"
    row_ok &= int_ok
    hashes = hash_fields(block, words, starts[:, n_labels + N_DENSE:],
                         lens[:, n_labels + N_DENSE:])

    bad_idx = np.flatnonzero(~row_ok)
    bad += [(int(good_lines[i]), why[i]) for i in bad_idx[:5]]
    out = {"dense_raw": dense_raw.reshape(-1, N_DENSE), "hashes": hashes,
           "label": label, "n_bad": n_bad_fields + len(bad_idx),
           "bad": sorted(bad)[:5], "n_lines": int(len(nl_at) - blank.sum())}
    if len(bad_idx):
        out = {**out, **{k: out[k][row_ok] for k in ["dense_raw", "hashes", "label"]
                         if out[k] is not None}}
    return out


def transform_dense(dense_raw, stats=None, missing_indicator=False):
    """log1p(max(x, 0)): Criteo counts are heavy-tailed and a few are negative (I2 = -1, -2, -3:
    clipped to 0, as in DLRM). Then (x - mean) / std when stats are given; missing -> 0."""
    missing = np.isnan(dense_raw)
    x = np.log1p(np.maximum(dense_raw, 0.0))
    if stats is not None:
        x = (x - np.asarray(stats["mean"])) / np.asarray(stats["std"])
    x[missing] = 0.0
    x = x.astype(np.float32)
    if missing_indicator:
        x = np.concatenate([x, missing.astype(np.float32)], axis=1)
    return x


# ------------------------------------------------------------------------------------ reading
def check_path(path):
    path = Path(path)
    if not path.exists():
        raise CriteoFormatError(f"{path}: file not found (make one with "
                                "`python stage2_ctr/01_make_subset.py --synthetic 200000`)")
    if path.is_dir():
        raise CriteoFormatError(f"{path}: is a directory; pass the data files in it "
                                "(e.g. train.txt), not the folder")
    if path.stat().st_size == 0:
        raise CriteoFormatError(f"{path}: file is empty")
    return path


def is_gzip(path):
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def iter_blocks(path, chunk_bytes, shard=0, n_shards=1):
    """Yield (first_line_number or None, first_byte_offset, bytes) blocks of whole lines.

    Plain files are cut into n_shards byte ranges; a line belongs to the range holding its first
    byte, so shards are disjoint and cover every line. Gzip cannot seek: every shard inflates
    the stream, cuts the same blocks, and keeps block i when i % n_shards == shard.
    Line numbers are exact for gzip and for shard 0; other byte-range shards give None.
    """
    if is_gzip(path):
        yield from _iter_gzip_blocks(path, chunk_bytes, shard, n_shards)
        return
    size = os.path.getsize(path)
    begin, end = size * shard // n_shards, size * (shard + 1) // n_shards
    with open(path, "rb") as f:
        if begin > 0:  # skip the line that started in the previous shard
            f.seek(begin - 1)
            f.readline()
        pos = f.tell()
        line_no = 1 if shard == 0 else None
        carry = b""
        while pos < end or carry:
            data = f.read(chunk_bytes) if pos < end else b""
            buf = carry + data
            if not buf:
                break
            if not data and not buf.endswith(b"\n"):
                buf += b"\n"  # last line without a newline
            cut = buf.rfind(b"\n") + 1
            block_begin = pos - len(carry)
            if block_begin + cut > end:  # keep only lines starting before `end`
                cut = buf.find(b"\n", max(end - 1 - block_begin, 0)) + 1
                buf, carry = buf[:cut], b""
                pos = end
                yield line_no, block_begin, buf
                break
            carry = buf[cut:]
            pos += len(data)
            if cut:
                yield line_no, block_begin, buf[:cut]
                if line_no is not None:
                    line_no += buf.count(b"\n", 0, cut)


def _iter_gzip_blocks(path, chunk_bytes, shard, n_shards):
    line_no, offset, carry, i = 1, 0, b"", 0
    try:
        with gzip.open(path, "rb") as f:
            while True:
                data = f.read(chunk_bytes)
                buf = carry + data
                if not data:
                    if buf:
                        buf = buf if buf.endswith(b"\n") else buf + b"\n"
                        if i % n_shards == shard:
                            yield line_no, offset, buf
                    return
                cut = buf.rfind(b"\n") + 1
                if cut:
                    if i % n_shards == shard:
                        yield line_no, offset, buf[:cut]
                    line_no += buf.count(b"\n", 0, cut)
                    offset += cut
                    i += 1
                carry = buf[cut:]
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise CriteoFormatError(f"{path}: truncated or corrupt gzip ({e}); download it again "
                                "or decompress what is there with `zcat FILE > file.txt`")


def shard_info():
    """(shard, n_shards) for this process: DDP rank x DataLoader worker."""
    rank, world = 0, 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    info = torch.utils.data.get_worker_info()
    worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
    return rank * n_workers + worker, world * n_workers


class CriteoStream(torch.utils.data.IterableDataset):
    """Whole batches (dense, sparse, label) streamed from Criteo-format files (plain or .gz).

    Use with DataLoader(stream, batch_size=None, num_workers=k): each worker (and each DDP rank)
    reads a disjoint share. Memory is bounded by chunk_bytes (+ shuffle_buffer rows) per worker.
    """

    def __init__(self, paths, batch_size, hash_bits=20, dense_stats=None, n_labels=1,
                 chunk_bytes=1 << 20, shuffle_buffer=0, seed=0, drop_last=False,
                 max_bad_fraction=0.01, missing_indicator=False, verbose=True, group=1):
        super().__init__()
        self.paths = [check_path(p) for p in ([paths] if isinstance(paths, (str, Path))
                                              else paths)]
        if not 1 <= hash_bits <= 40:
            raise ValueError("hash_bits must be in [1, 40]")
        if isinstance(dense_stats, (str, Path)):
            dense_stats = json.loads(Path(dense_stats).read_text())
        self.batch_size, self.hash_bits, self.dense_stats = batch_size, hash_bits, dense_stats
        self.n_labels, self.chunk_bytes = n_labels, chunk_bytes
        self.shuffle_buffer, self.seed, self.epoch = shuffle_buffer, seed, 0
        self.drop_last, self.max_bad_fraction = drop_last, max_bad_fraction
        self.missing_indicator, self.verbose = missing_indicator, verbose
        # group > 1: each item carries `group` batches stacked, split again by iter_batches()
        # in the consuming process - one transfer between processes instead of `group`
        self.group = group
        # after a full single-process pass: rows yielded, bad rows skipped, per-file counts
        self.stats = {"rows": 0, "bad_rows": 0, "files": {}}

    def set_epoch(self, epoch):
        """Reshuffle differently each epoch (same seed + epoch -> same order)."""
        self.epoch = epoch

    def _parsed_chunks(self, shard, n_shards):
        """Parsed blocks as numpy arrays, with the bad-row bookkeeping per file."""
        for path in self.paths:
            counts = {"rows": 0, "bad_rows": 0, "first_bad": []}
            self.stats["files"][str(path)] = counts
            for line_no, offset, raw in iter_blocks(path, self.chunk_bytes, shard, n_shards):
                block = np.frombuffer(raw + b"\0" * 8, dtype=np.uint8)
                p = parse_block(block, self.n_labels)
                counts["rows"] += len(p["hashes"])
                counts["bad_rows"] += p["n_bad"]
                for i, why in p["bad"]:
                    if len(counts["first_bad"]) < 5:
                        where = (f"line {line_no + i}" if line_no is not None else
                                 f"line {i + 1} after byte {offset}")
                        counts["first_bad"].append(f"{where}: {why}")
                seen = counts["rows"] + counts["bad_rows"]
                if counts["bad_rows"] > self.max_bad_fraction * max(seen, 1000):
                    raise CriteoFormatError(
                        f"{path}: {counts['bad_rows']} of {seen} rows malformed (more than "
                        f"{self.max_bad_fraction:.0%}); first: {'; '.join(counts['first_bad'])}."
                        f" Is it a Criteo file with {self.n_labels} label column(s)? "
                        "(--no-label for test.txt)")
                yield p
            self.stats["rows"] += counts["rows"]
            self.stats["bad_rows"] += counts["bad_rows"]
            if counts["bad_rows"] and self.verbose:
                print(f"{path}: skipped {counts['bad_rows']} malformed rows "
                      f"({'; '.join(counts['first_bad'])})", file=sys.stderr)

    def _to_arrays(self, p):
        dense = transform_dense(p["dense_raw"], self.dense_stats, self.missing_indicator)
        sparse = bucket_of(p["hashes"], self.hash_bits)
        label = p["label"] if p["label"] is not None else np.zeros((len(dense), 0), np.float32)
        return [dense, sparse, label]

    def __iter__(self):
        shard, n_shards = shard_info()
        rng = np.random.default_rng([self.seed, self.epoch, shard])
        self.stats = {"rows": 0, "bad_rows": 0, "files": {}}
        emit = self.batch_size * self.group  # rows per item handed to the DataLoader
        need = max(emit, self.shuffle_buffer)
        parts, n_rows = [], 0  # parsed blocks not yet emitted; concatenated once per emit
        for p in self._parsed_chunks(shard, n_shards):
            parts.append(self._to_arrays(p))
            n_rows += len(parts[-1][0])
            if n_rows < need:
                continue
            pending = [np.concatenate(cols) for cols in zip(*parts)]
            if self.shuffle_buffer:
                perm = rng.permutation(n_rows)
                pending = [a[perm] for a in pending]
            n_full = n_rows // emit * emit
            for i in range(0, n_full, emit):
                yield self._batch(pending, i, i + emit)
            parts = [[a[n_full:] for a in pending]]
            n_rows -= n_full
        if n_rows:
            pending = [np.concatenate(cols) for cols in zip(*parts)]
            if self.shuffle_buffer:
                perm = rng.permutation(n_rows)
                pending = [a[perm] for a in pending]
            stop = n_rows // self.batch_size * self.batch_size if self.drop_last else n_rows
            for i in range(0, stop, emit):
                yield self._batch(pending, i, min(i + emit, stop))

    def _batch(self, arrays, i, j):
        dense, sparse, label = (torch.from_numpy(np.ascontiguousarray(a[i:j])) for a in arrays)
        if self.n_labels == 1:
            label = label[:, 0]
        return dense, sparse, label


def iter_batches(loader, batch_size):
    """Batches of batch_size rows from items of group * batch_size rows (views, no copy).
    Handing a worker's batches over costs a shared-memory segment per tensor; at batch 4096
    that alone capped a DataLoader at ~0.2-0.3M rows/s here, grouping 8 batches at ~1M."""
    for dense, sparse, label in loader:
        if len(dense) <= batch_size:
            yield dense, sparse, label
        else:
            yield from zip(dense.split(batch_size), sparse.split(batch_size),
                           label.split(batch_size))


# ----------------------------------------------------------------------------- dense statistics
def fit_stats(paths, max_rows=2_000_000, n_labels=1, chunk_bytes=8 << 20):
    """One pass over (the first max_rows of) train: mean/std of log1p(max(x, 0)) per dense
    column over the non-missing values, plus each column's missing rate."""
    s1, s2 = np.zeros(N_DENSE), np.zeros(N_DENSE)
    count, missing, rows = np.zeros(N_DENSE), np.zeros(N_DENSE), 0
    for path in paths:
        for _, _, raw in iter_blocks(check_path(path), chunk_bytes):
            p = parse_block(np.frombuffer(raw + b"\0" * 8, dtype=np.uint8), n_labels)
            x = p["dense_raw"][: max_rows - rows]
            present = ~np.isnan(x)
            v = np.where(present, np.log1p(np.maximum(np.nan_to_num(x), 0)), 0.0)
            s1, s2 = s1 + v.sum(0), s2 + (v * v).sum(0)
            count, missing = count + present.sum(0), missing + (~present).sum(0)
            rows += len(x)
            if rows >= max_rows:
                break
    mean = s1 / np.maximum(count, 1)
    std = np.sqrt(np.maximum(s2 / np.maximum(count, 1) - mean ** 2, 0)) + 1e-6
    return {"rows": rows, "transform": "log1p(max(x, 0))", "mean": mean.tolist(),
            "std": std.tolist(), "missing_rate": (missing / max(rows, 1)).tolist(),
            "files": [str(p) for p in paths]}


def write_json_atomic(path, obj):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp.json")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600 files
    os.replace(tmp, path)


def collision_report(paths, hash_bits, n_labels=1, max_rows=None):
    """Distinct (field, value) pairs vs distinct buckets they land in. The 64-bit hash stands in
    for the value (two different values sharing all 64 bits is vanishingly unlikely)."""
    uniques, rows = [], 0
    for path in paths:
        for _, _, raw in iter_blocks(check_path(path), 8 << 20):
            p = parse_block(np.frombuffer(raw + b"\0" * 8, dtype=np.uint8), n_labels)
            uniques.append(np.unique(p["hashes"]))
            rows += len(p["hashes"])
            if len(uniques) > 16:
                uniques = [np.unique(np.concatenate(uniques))]
            if max_rows and rows >= max_rows:
                break
    values = np.unique(np.concatenate(uniques))
    buckets = np.unique(bucket_of(values, hash_bits))
    return {"rows": rows, "hash_bits": hash_bits, "distinct_values": int(len(values)),
            "distinct_buckets": int(len(buckets)),
            "values_sharing_a_bucket": float(1 - len(buckets) / max(len(values), 1))}


# ------------------------------------------------------------------------------ demo / bench
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("files", nargs="*", help="Criteo-format files (plain or .gz)")
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--hash-bits", type=int, default=20, help="2^bits buckets in the shared table")
    p.add_argument("--stats", default=None, help="dense statistics JSON from --fit-stats")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--labels", type=int, default=1, help="label columns before I1 (0..2)")
    p.add_argument("--no-label", action="store_true", help="files have no label (test.txt)")
    p.add_argument("--shuffle-buffer", type=int, default=0, help="rows shuffled together")
    p.add_argument("--max-bad-fraction", type=float, default=0.01)
    p.add_argument("--chunk-kb", type=int, default=1024,
                   help="bytes read per block, in KiB (~1 MiB keeps a block's arrays in cache)")
    p.add_argument("--max-batches", type=int, default=0, help="stop after this many (0 = all)")
    p.add_argument("--group", type=int, default=8,
                   help="batches per transfer from a worker process (see iter_batches)")
    p.add_argument("--fit-stats", metavar="FILE", nargs="+",
                   help="compute dense statistics over FILE(s) and write FILE.stats.json")
    p.add_argument("--stats-rows", type=int, default=2_000_000, help="rows used by --fit-stats")
    p.add_argument("--report-collisions", action="store_true",
                   help="count distinct values vs buckets at --hash-bits")
    p.add_argument("--bench", metavar="FILE", help="loader vs pandas/pyarrow rows/s on FILE")
    p.add_argument("--bench-one", default=None, help=argparse.SUPPRESS)  # internal: one config
    p.add_argument("--repeats", type=int, default=3, help="bench: runs per config (median)")
    p.add_argument("--threads", type=int, default=1, help="torch threads in the main process")
    p.add_argument("--runs-dir", default=str(ROOT / "runs"), help="bench: where metrics go")
    args = p.parse_args(argv)
    if not 1 <= args.hash_bits <= 40:
        p.error("--hash-bits must be in [1, 40]")
    if args.no_label:
        args.labels = 0
    if not 0 <= args.labels <= 8:
        p.error("--labels must be in [0, 8]")
    if not (args.files or args.fit_stats or args.bench or args.bench_one):
        p.error("give Criteo files to read, or --fit-stats FILE, or --bench FILE")
    return args


def peak_rss_mb():
    """Peak resident memory of this process and its finished children, in MiB (Linux: KiB)."""
    self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    child_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return (self_kb + child_kb) / 1024


def run_loader(args, files, num_workers, max_batches=0, progress=False, group=None):
    """Read files through CriteoStream + DataLoader; return rows and seconds."""
    group = group or (args.group if num_workers else 1)
    stream = CriteoStream(files, args.batch_size, args.hash_bits, args.stats, args.labels,
                          chunk_bytes=args.chunk_kb << 10, shuffle_buffer=args.shuffle_buffer,
                          max_bad_fraction=args.max_bad_fraction, group=group)
    loader = iter_batches(torch.utils.data.DataLoader(stream, batch_size=None,
                                                      num_workers=num_workers), args.batch_size)
    rows, t0 = 0, time.perf_counter()
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(unit=" rows", unit_scale=True, desc="reading")
    first = None
    for i, (dense, sparse, label) in enumerate(loader):
        first = first or (dense, sparse, label)
        rows += len(dense)
        if bar is not None:
            bar.update(len(dense))
        if max_batches and i + 1 >= max_batches:
            break
    if bar is not None:
        bar.close()
    return rows, time.perf_counter() - t0, first, stream


def baseline_pandas(path, hash_bits, n_labels, chunk_rows=200_000):
    """The textbook way: pandas.read_csv in chunks, then the same log1p + hash per column."""
    import pandas as pd
    names = [f"label{i}" for i in range(n_labels)] + [f"I{i}" for i in range(1, 14)] + \
            [f"C{i}" for i in range(1, 27)]
    rows = 0
    for df in pd.read_csv(path, sep="\t", header=None, names=names, chunksize=chunk_rows,
                          dtype={f"C{i}": str for i in range(1, 27)}):
        dense = np.log1p(np.maximum(df[[f"I{i}" for i in range(1, 14)]].to_numpy(np.float64), 0))
        dense = np.nan_to_num(dense).astype(np.float32)
        sparse = np.stack([pd.util.hash_array(df[f"C{i}"].fillna("").to_numpy(object),
                                              hash_key=f"C{i:015d}") >> (64 - hash_bits)
                           for i in range(1, 27)], 1).astype(np.int64)
        rows += len(dense) + 0 * sparse.shape[0]
    return rows


def baseline_pyarrow(path, hash_bits, n_labels):
    """pyarrow's streaming CSV reader (one core here), same transform; only if installed."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.csv as pacsv
    names = [f"label{i}" for i in range(n_labels)] + [f"I{i}" for i in range(1, 14)] + \
            [f"C{i}" for i in range(1, 27)]
    types = {f"C{i}": pa.string() for i in range(1, 27)}
    types.update({f"I{i}": pa.float64() for i in range(1, 14)})
    reader = pacsv.open_csv(path, read_options=pacsv.ReadOptions(column_names=names,
                                                                 block_size=8 << 20),
                            parse_options=pacsv.ParseOptions(delimiter="\t"),
                            convert_options=pacsv.ConvertOptions(column_types=types))
    rows = 0
    for batch in reader:
        dense = np.stack([batch.column(f"I{i}").to_numpy(zero_copy_only=False)
                          for i in range(1, 14)], 1)
        dense = np.nan_to_num(np.log1p(np.maximum(dense, 0))).astype(np.float32)
        for i in range(1, 27):
            col = batch.column(f"C{i}").to_numpy(zero_copy_only=False)
            pd.util.hash_array(col.astype(object), hash_key=f"C{i:015d}")
        rows += batch.num_rows
    return rows


def bench_one(args):
    """One benchmark configuration in this (fresh) process: print a JSON line."""
    kind = args.bench_one
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    if kind == "pandas":
        rows = baseline_pandas(args.bench, args.hash_bits, args.labels)
    elif kind == "pyarrow":
        rows = baseline_pyarrow(args.bench, args.hash_bits, args.labels)
    else:  # "loader workers=W" or "loader workers=W group=G"
        opts = dict(kv.split("=") for kv in kind.split()[1:])
        rows, _, _, _ = run_loader(args, [args.bench], int(opts["workers"]),
                                   group=int(opts.get("group", 1)))
    seconds = time.perf_counter() - t0
    print(json.dumps({"config": kind, "rows": rows, "seconds": seconds,
                      "rows_per_s": rows / seconds, "peak_rss_mb": peak_rss_mb()}))


def bench(args):
    """Every configuration in its own process (clean peak RSS), repeated, median reported."""
    import statistics
    configs = ["pandas"]
    try:
        import pyarrow  # noqa: F401
        configs.append("pyarrow")
    except ImportError:
        pass
    configs += ["loader workers=0", "loader workers=2 group=1", "loader workers=1 group=8",
                "loader workers=2 group=8"]
    size_mb = os.path.getsize(args.bench) / 2**20
    print(f"bench: {args.bench} ({size_mb:.0f} MiB), {args.repeats} repeats per config, "
          "parse + log1p + hash to arrays")
    # repeats go round-robin over the configs, so a machine that speeds up or slows down
    # during the bench shifts every config alike and the same-run ratios stay fair
    runs = {config: [] for config in configs}
    for _ in range(args.repeats):
        for config in configs:
            cmd = [sys.executable, __file__, "--bench", args.bench, "--bench-one", config,
                   "--hash-bits", str(args.hash_bits), "--labels", str(args.labels),
                   "--batch-size", str(args.batch_size), "--chunk-kb", str(args.chunk_kb),
                   "--repeats", "1"]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit(f"bench config {config} failed: {out.stderr.strip()[-500:]}")
            runs[config].append(json.loads(out.stdout.strip().splitlines()[-1]))
    results = {config: {"rows": r[0]["rows"],
                        "rows_per_s": statistics.median(x["rows_per_s"] for x in r),
                        "all_rows_per_s": [x["rows_per_s"] for x in r],
                        "peak_rss_mb": max(x["peak_rss_mb"] for x in r)}
               for config, r in runs.items()}
    base = results["pandas"]["rows_per_s"]
    single = results["loader workers=0"]["rows_per_s"]
    print(f"{'config':<26}{'rows/s':>12}{'vs pandas':>11}{'peak RSS MiB':>14}")
    for config, r in results.items():
        print(f"{config:<26}{r['rows_per_s']:>12,.0f}{r['rows_per_s'] / base:>10.2f}x"
              f"{r['peak_rss_mb']:>14,.0f}")
    two = results["loader workers=2 group=8"]["rows_per_s"]
    print(f"2 workers (group 8) vs single process: {two / single:.2f}x")
    metrics = {"script": "stage2_ctr/02_dataloader.py", "model": None,
               "dataset": str(args.bench), "device": "cpu", "seed": None,
               "config": {"batch_size": args.batch_size, "hash_bits": args.hash_bits,
                          "chunk_kb": args.chunk_kb, "repeats": args.repeats,
                          "file_mib": size_mb, "cpus": os.cpu_count()},
               "results": results,
               "ratios": {"loader_vs_pandas": single / base, "workers2_vs_single": two / single}}
    write_json_atomic(Path(args.runs_dir) / "bench_loader" / "metrics.json", metrics)
    print("wrote runs/bench_loader/metrics.json")
    return metrics


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.bench_one:
            return bench_one(args)
        if args.bench:
            check_path(args.bench)
            return bench(args)
        if args.fit_stats:
            stats = fit_stats(args.fit_stats, args.stats_rows, args.labels)
            out = Path(str(args.fit_stats[0]) + ".stats.json")
            write_json_atomic(out, stats)
            print(f"dense statistics over {stats['rows']:,} rows -> {out}")
            print("mean " + " ".join(f"{m:.2f}" for m in stats["mean"]))
            print("missing " + " ".join(f"{m:.0%}" for m in stats["missing_rate"]))
            return stats
        torch.set_num_threads(args.threads)
        rows, seconds, first, stream = run_loader(args, args.files, args.num_workers,
                                                  args.max_batches, progress=True)
        dense, sparse, label = first
        print(f"first batch: dense {tuple(dense.shape)} {dense.dtype}, sparse "
              f"{tuple(sparse.shape)} {sparse.dtype} (ids < 2^{args.hash_bits}), label "
              f"{tuple(label.shape)} {label.dtype}")
        print(f"read {rows:,} rows in {seconds:.2f} s = {rows / seconds:,.0f} rows/s "
              f"({args.num_workers} workers, batch {args.batch_size}); peak RSS "
              f"{peak_rss_mb():,.0f} MiB (this process + finished workers)")
        if args.num_workers == 0 and not args.max_batches:
            print(f"bad rows skipped: {stream.stats['bad_rows']}")
        if args.report_collisions:
            r = collision_report(args.files, args.hash_bits, args.labels)
            print(f"hash collisions at 2^{args.hash_bits}: {r['distinct_values']:,} distinct "
                  f"(field, value) pairs -> {r['distinct_buckets']:,} buckets; "
                  f"{r['values_sharing_a_bucket']:.2%} of values share a bucket")
    except CriteoFormatError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
