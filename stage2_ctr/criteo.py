"""The Criteo format in code: bytes on disk -> (dense, sparse, label) batches, with no per-row
Python. Read it with stage2_ctr/02_dataloader.py, the chapter that runs it.

The parser works on raw bytes with numpy: find every tab/newline once, check each line has 40
fields, gather every field as one 8-byte word (an unaligned uint64 view), parse integers with
SWAR arithmetic (8 digits in 3 multiplies) and hash categoricals with a splitmix64 mix of
(field salt, length, bytes). Bad rows are skipped, counted and reported with line numbers.

What is here, in reading order:
  hashing         splitmix64, hash_strings (the reference), bucket_of
  parsing         parse_int_fields, hash_fields, parse_block, transform_dense
  reading         check_path, iter_blocks (byte ranges per shard; gzip by round-robin blocks)
  CriteoStream    an IterableDataset of whole batches; iter_batches splits grouped transfers
  bad rows        merge_reports, describe_bad_rows, scan (rows, bad rows, positives per file)
What is fitted on the train split (dense statistics, rare values, collisions) is
stage2_ctr/train_stats.py; the binary cache and preloading are stage2_ctr/binary_cache.py.

Output of CriteoStream (and of binary_cache.BinaryStream), one tuple per batch (B rows, T labels):
  dense  float32 (B, 13)   log1p(max(x, 0)), standardized with train_stats.fit_stats when given;
                           missing -> 0 (the mean after standardization); (B, 26) with
                           missing_indicator=True: 13 values then 13 is-missing flags
  sparse int64   (B, 26)   hash bucket in [0, 2^hash_bits) of (field, value): one shared table,
                           field-salted hashing; a missing value hashes as the empty string of
                           its field, so each field's "missing" has a bucket of its own
  label  float32 (B,)      or (B, T) when n_labels = T > 1 (columns: label_1 .. label_T)
"""
import gzip
import os
import zlib
from pathlib import Path

import numpy as np
import torch

N_DENSE, N_SPARSE = 13, 26
HASH_SEED = 0x5EED_C217  # part of the data format: changing it changes every bucket

U64 = np.uint64
MAX_DIGITS = 18  # longer integer fields are malformed (10^18 is far beyond any count)
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
    9-18 digits (rare) take a per-digit loop over just those fields. More than MAX_DIGITS
    digits is not a count any more (a 400-digit number would overflow float64 to inf and poison
    the statistics): such a field does not parse, and its row is a bad row."""
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
    ok &= n <= MAX_DIGITS
    long = np.flatnonzero((n > 8) & (n <= MAX_DIGITS))
    if len(long):  # a large integer is valid: float64 keeps its magnitude
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


def parse_block(block, n_labels=1, funnel=False):
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
    line_len = seps[nl_at] - line_start
    # a blank line is empty, or holds only the '\r' of a CRLF line ending
    blank = (fields_per_line == 1) & ((line_len == 0) |
                                      ((line_len == 1) & (block[line_start] == 13)))
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
    # CRLF files: the '\r' before a newline belongs to the line ending, not to the last field
    # (else every C26 value would hash differently from the same value in an LF file)
    lens[:, -1] -= block[ends[:, -1] - 1] == 13
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
        if funnel:  # a funnel file (label = click, label2 = conversion): no buy without a click
            why[row_ok & (label[:, 1] > label[:, 0])] = "conversion (label2) on an unclicked row"
            row_ok &= label[:, 1] <= label[:, 0]
    d = slice(n_labels, n_labels + N_DENSE)
    dense_raw, int_ok = parse_int_fields(block, words, starts[:, d].ravel(), lens[:, d].ravel())
    int_ok = int_ok.reshape(-1, N_DENSE).all(1)
    why[~int_ok & row_ok] = f"an integer field does not parse (not 0-9, or > {MAX_DIGITS} digits)"
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
    """The path of a readable, non-empty file, or CriteoFormatError saying what is wrong."""
    path = Path(path)
    if not path.exists():
        raise CriteoFormatError(f"{path}: file not found (make one with "
                                "`python stage2_ctr/01_make_subset.py --synthetic 200000`)")
    if path.is_dir():
        raise CriteoFormatError(f"{path}: is a directory; pass the data files in it "
                                "(e.g. train.txt), not the folder")
    if not os.access(path, os.R_OK):
        raise CriteoFormatError(f"{path}: no permission to read it; `chmod a+r {path}` or run "
                                "as its owner")
    if path.stat().st_size == 0:
        raise CriteoFormatError(f"{path}: file is empty")
    return path


def check_paths(paths):
    """check_path for each, and no file twice (each would be read twice per pass)."""
    paths = [check_path(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths)]
    seen = {}
    for p in paths:
        key = p.resolve()
        if key in seen:
            raise CriteoFormatError(f"{p}: given twice (as {seen[key]} too); each file is read "
                                    "once per pass - remove the duplicate")
        seen[key] = p
    return paths


def open_binary(path):
    """open(path, 'rb') with a permission problem as one line (os.access can say yes to root
    where a network file system says no)."""
    try:
        return open(path, "rb")
    except PermissionError:
        raise CriteoFormatError(f"{path}: no permission to read it; `chmod a+r {path}` or run "
                                "as its owner") from None


def iter_blocks(path, chunk_bytes, shard=0, n_shards=1):
    """Yield (first_line_number or None, first_byte_offset, bytes) blocks of whole lines.

    Plain files are cut into n_shards byte ranges; a line belongs to the range holding its first
    byte, so shards are disjoint and cover every line. Gzip cannot seek: every shard inflates
    the stream, cuts the same blocks, and keeps block i when i % n_shards == shard.
    Line numbers are exact for gzip and for shard 0; other byte-range shards give None.
    """
    with open_binary(path) as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    if gzipped:
        yield from _iter_gzip_blocks(path, chunk_bytes, shard, n_shards)
        return
    size = os.path.getsize(path)
    begin, end = size * shard // n_shards, size * (shard + 1) // n_shards
    with open_binary(path) as f:
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
    Bad rows are skipped and counted per file in .stats (after a single-process pass); with
    report=True each shard also yields its counts as a last item, a dict that iter_batches()
    collects - the only way counts made in a worker process reach the training process.
    """

    def __init__(self, paths, batch_size, hash_bits=20, dense_stats=None, n_labels=1,
                 chunk_bytes=1 << 20, shuffle_buffer=0, seed=0, drop_last=False,
                 max_bad_fraction=0.01, missing_indicator=False, group=1, report=False,
                 rare_filter=None, funnel=False):
        super().__init__()
        self.paths = check_paths(paths)
        if not (1 <= hash_bits <= 40 and min(batch_size, chunk_bytes, group) >= 1
                and shuffle_buffer >= 0 and 0 <= max_bad_fraction <= 1):
            raise ValueError("need hash_bits in [1, 40], batch_size, chunk_bytes, group >= 1, "
                             "shuffle_buffer >= 0, max_bad_fraction in [0, 1]")
        self.batch_size, self.hash_bits, self.dense_stats = batch_size, hash_bits, dense_stats
        self.n_labels, self.chunk_bytes = n_labels, chunk_bytes
        self.shuffle_buffer, self.seed, self.epoch = shuffle_buffer, seed, 0
        self.drop_last, self.max_bad_fraction = drop_last, max_bad_fraction
        self.missing_indicator, self.report, self.funnel = missing_indicator, report, funnel
        self.rare_filter = rare_filter  # train_stats.RareFilter: rare values -> a rare bucket
        self.group = group  # > 1: `group` batches per item, one transfer (iter_batches splits)
        # after a full single-process pass: rows yielded, bad rows skipped, per-file counts
        self.stats = {"rows": 0, "bad_rows": 0, "files": {}}

    def set_epoch(self, epoch):
        """Reshuffle differently each epoch (same seed + epoch -> same order)."""
        self.epoch = epoch

    def _parsed_chunks(self, shard, n_shards):
        """Parsed blocks as numpy arrays, with the bad-row bookkeeping per file. The share of
        bad rows is checked as the file is read (from 1,000 rows on, so a few bad rows at the
        start do not stop a run) and exactly at the end of the file (a 500-row file with 2% bad
        rows fails too)."""
        for path in self.paths:
            counts = {"rows": 0, "bad_rows": 0, "first_bad": []}
            self.stats["files"][str(path)] = counts
            for line_no, offset, raw in iter_blocks(path, self.chunk_bytes, shard, n_shards):
                block = np.frombuffer(raw + b"\0" * 8, dtype=np.uint8)
                p = parse_block(block, self.n_labels, self.funnel)
                counts["rows"] += len(p["hashes"])
                counts["bad_rows"] += p["n_bad"]
                for i, why in p["bad"]:
                    if len(counts["first_bad"]) < 5:
                        where = (f"line {line_no + i}" if line_no is not None else
                                 f"line {i + 1} after byte {offset}")
                        counts["first_bad"].append(f"{where}: {why}")
                self._check_bad_share(path, counts, 1000, shard, n_shards)
                yield p
            self._check_bad_share(path, counts, 0, shard, n_shards)
            self.stats["rows"] += counts["rows"]
            self.stats["bad_rows"] += counts["bad_rows"]

    def _check_bad_share(self, path, counts, floor, shard, n_shards):
        seen = counts["rows"] + counts["bad_rows"]
        if counts["bad_rows"] > self.max_bad_fraction * max(seen, floor):
            share = (f" (in the share of the file read by shard {shard + 1} of {n_shards})"
                     if n_shards > 1 else "")
            raise CriteoFormatError(
                f"{path}: {counts['bad_rows']} of {seen} rows malformed{share}, more than "
                f"{self.max_bad_fraction:.0%}; first: {'; '.join(counts['first_bad'])}. Is it a "
                f"Criteo file with {self.n_labels} label column(s)? (--no-label for test.txt)")

    def _to_arrays(self, p):
        dense = transform_dense(p["dense_raw"], self.dense_stats, self.missing_indicator)
        sparse = bucket_of(p["hashes"], self.hash_bits)
        if self.rare_filter is not None:
            sparse = self.rare_filter(sparse)
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
        if self.report:
            yield {"shard": shard, "n_shards": n_shards, "files": self.stats["files"]}

    def _batch(self, arrays, i, j):
        dense, sparse, label = (torch.from_numpy(np.ascontiguousarray(a[i:j])) for a in arrays)
        if self.n_labels == 1:
            label = label[:, 0]
        return dense, sparse, label


def iter_batches(loader, batch_size, reports=None):
    """Batches of batch_size rows from items of group * batch_size rows (views, no copy).
    Handing a worker's batches over costs a shared-memory segment per tensor, whatever its
    size: grouping batches per transfer divides that fixed cost (results/stage2_loader.md).
    Bad-row reports (CriteoStream(report=True)) are appended to `reports`, not yielded. An
    error raised in a worker process arrives wrapped in the worker's traceback: it is raised
    again as the loader's own one-line message."""
    try:
        for item in loader:
            if isinstance(item, dict):
                if reports is not None:
                    reports.append(item)
                continue
            dense, sparse, label = item
            if len(dense) <= batch_size:
                yield dense, sparse, label
            else:
                yield from zip(dense.split(batch_size), sparse.split(batch_size),
                               label.split(batch_size))
    except (CriteoFormatError, OSError) as e:
        raise CriteoFormatError(one_line(e)) from None


def one_line(error):
    """The message of an error, without the worker traceback a DataLoader wraps around it."""
    lines = [x for x in str(error).strip().splitlines() if x.strip()]
    last = lines[-1] if lines else type(error).__name__
    for prefix in ("CriteoFormatError: ", "Error: "):
        if prefix in last and "Original Traceback" in str(error):
            last = last.split(prefix, 1)[1]
    return last


def merge_reports(reports):
    """Per-file bad-row counts summed over the shards' reports."""
    files = {}
    for r in reports:
        for path, c in r["files"].items():
            f = files.setdefault(path, {"rows": 0, "bad_rows": 0, "first_bad": []})
            f["rows"] += c["rows"]
            f["bad_rows"] += c["bad_rows"]
            f["first_bad"] = (f["first_bad"] + c["first_bad"])[:5]
    return files


def describe_bad_rows(files):
    """One line per file with skipped rows (empty when there were none)."""
    return [f"{path}: skipped {c['bad_rows']:,} malformed rows of {c['rows'] + c['bad_rows']:,}"
            f" (first: {'; '.join(c['first_bad'])})"
            for path, c in files.items() if c["bad_rows"]]


# ------------------------------------------------------------------------ a look at the files
def scan(paths, n_labels=1, max_bad_fraction=0.01, stop_after=None):
    """Read files once without training on them: rows, bad-row counts per file and positives
    per label column. stop_after=N stops after N rows (a quick look at the first block)."""
    stream = CriteoStream(paths, 1 << 16, n_labels=n_labels, max_bad_fraction=max_bad_fraction)
    rows, positives = 0, np.zeros(max(n_labels, 1))
    for _, _, label in stream:
        rows += len(label)
        positives[:n_labels] += label.reshape(len(label), -1).sum(0).numpy()
        if stop_after and rows >= stop_after:
            break
    return {"rows": rows, "positives": positives[:n_labels].tolist(),
            "files": stream.stats["files"]}
