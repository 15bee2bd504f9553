"""Writing Criteo-format data set folders: rows to TSV bytes without per-row Python, the split
each row goes to, and a folder of train/val/test files that appears whole or not at all.

Read it with stage2_ctr/01_make_subset.py, the chapter that writes data sets (real subsets and
the synthetic data of stage2_ctr/synthetic.py).

  format_rows     labels, integers and 8-hex-char categoricals -> TSV bytes, 4 chars per lookup
  hex_word_table  a field's values as their 8 hex chars, one uint64 word per value
  split_of        train / val / test per row: a seeded random 8:1:1, or a cut in time order
  DatasetWriter   the folder written into a temporary sibling and swapped in when complete
"""
import os
import shutil
from pathlib import Path

import numpy as np

N_DENSE, N_SPARSE = 13, 26
U64 = np.uint64


class DatasetFolderError(ValueError):
    """A data set folder that cannot be written: the message is one line saying what to do."""


# ----------------------------------------------------------------------------- TSV bytes
def _ascii_table(n_chars, base):
    """TABLE[v] = the n_chars digits of v in `base` as ASCII bytes packed in a uint32
    (first char in the lowest byte, so the uint32 viewed as bytes reads left to right)."""
    v = np.arange(base ** n_chars)
    chars = np.stack([(v // base ** (n_chars - 1 - i)) % base for i in range(n_chars)], 1)
    ascii_ = np.frombuffer(b"0123456789abcdef", np.uint8)[chars].astype(np.uint32)
    return (ascii_ << (8 * np.arange(n_chars, dtype=np.uint32))).sum(1).astype(np.uint32)


DEC4 = _ascii_table(4, 10)    # 0000 .. 9999
HEX4 = _ascii_table(4, 16)    # 0000 .. ffff
POW10 = 10 ** np.arange(13, dtype=np.int64)
# "x\t" for 0 <= x < 10^5 as a little-endian word, and its digit count
SMALL_INT_LEN = np.ones(100_000, np.int32) + sum(np.arange(100_000) >= 10 ** d for d in range(1, 5))
SMALL_INT_WORD = np.array([int.from_bytes(f"{x}\t".encode(), "little") for x in range(100_000)],
                          dtype=U64)


def hex_word_table(hashes):
    """uint32 value hashes -> their 8 lowercase hex chars as one little-endian uint64 word each,
    so formatting a categorical is a table lookup (popular values stay in cache)."""
    return (HEX4[hashes >> np.uint32(16)].astype(U64)
            | (HEX4[hashes & np.uint32(0xFFFF)].astype(U64) << U64(32)))


def format_rows(labels, dense, dense_missing, hex_words, cat_missing, row_starts=False):
    """Criteo TSV bytes for n rows without any per-row Python or string formatting.

    Each field becomes its first 8 bytes packed in a uint64 `lo` (its trailing tab included when
    it fits) and a length L. A field's output offset is the running sum of L; the `lo` words are
    stored in field order through an unaligned uint64 view of the output, so what spills past a
    field's end is overwritten by the next field's store. The output starts filled with tabs:
    the 9th byte of a categorical (8 hex chars + tab) is never reached by a store and stays a
    tab; the 9th-12th bytes of 8+ digit numbers are set one byte column at a time.
    Digits and hex chars come 4 at a time from lookup tables. With row_starts, the result is a
    uint8 array (slices of it are written without a copy) and the byte offset of every row."""
    n, n_labels = labels.shape
    tab = U64(ord("\t"))
    i0, c0 = n_labels, n_labels + N_DENSE  # first integer / categorical column
    lo = np.empty((n, c0 + N_SPARSE), U64)
    length = np.empty((n, c0 + N_SPARSE), np.int32)
    # labels: "0\t" or "1\t"
    lo[:, :i0] = (labels.astype(U64) + U64(ord("0"))) | (tab << U64(8))
    length[:, :i0] = 2
    # integers: below 10^5 (nearly all) one lookup gives "digits\t" as a word; the rest:
    # left-align the digits (x * 10^(12 - digits)) and take 3 lookups of 4 digits
    small = (dense >= 0) & (dense < len(SMALL_INT_WORD))
    small_value = np.where(small, dense, 0)
    lo[:, i0:c0] = SMALL_INT_WORD[small_value]
    n_chars = SMALL_INT_LEN[small_value]
    r, c = np.nonzero(~small & ~dense_missing)
    mag = np.abs(dense[r, c])
    n_digits = np.ones(len(mag), np.int64)
    for d in range(1, 12):
        n_digits += mag >= 10 ** d
    left = mag * POW10[12 - n_digits]
    big_lo = DEC4[left // 100_000_000].astype(U64) | (
        DEC4[left // 10_000 % 10_000].astype(U64) << U64(32))
    big_hi = DEC4[left % 10_000].astype(U64)
    neg = dense[r, c] < 0  # I2: shift one byte right and put '-' first
    big_hi = np.where(neg, (big_hi << U64(8)) | (big_lo >> U64(56)), big_hi)
    big_lo = np.where(neg, (big_lo << U64(8)) | U64(ord("-")), big_lo)
    n_digits += neg
    sh = (np.minimum(n_digits, 7) * 8).astype(U64)  # the tab, when it fits in lo
    big_lo = np.where(n_digits < 8, (big_lo & ((U64(1) << sh) - U64(1))) | (tab << sh), big_lo)
    lo[r, c + i0] = big_lo
    n_chars[r, c] = n_digits
    np.copyto(lo[:, i0:c0], tab, where=dense_missing)
    np.copyto(n_chars, 0, where=dense_missing)
    length[:, i0:c0] = n_chars + 1
    # categoricals: 8 lowercase hex chars then a tab (newline after C26); missing: tab alone
    lo[:, c0:] = hex_words
    np.copyto(lo[:, c0:], tab, where=cat_missing)
    lo[:, -1][cat_missing[:, -1]] = U64(ord("\n"))
    length[:, c0:] = 9
    np.copyto(length[:, c0:], 1, where=cat_missing)
    # stores, in field order
    length = length.ravel()
    offset = np.cumsum(length, dtype=np.int64)
    offset -= length
    out = np.full(int(offset[-1] + length[-1]) + 16, ord("\t"), np.uint8)
    words = np.ndarray(shape=(len(out) - 7,), dtype=U64, buffer=out, strides=(1,))
    words[offset] = lo.ravel()
    offset = offset.reshape(n, -1)
    out[offset[:, -1][~cat_missing[:, -1]] + 8] = ord("\n")  # after a non-empty C26
    long = n_digits >= 8  # long numbers: bytes 8.. from big_hi, then the tab
    r, c, n_digits, big_hi = r[long], c[long], n_digits[long], big_hi[long]
    for j in range(4):
        sel = n_digits >= 8 + j
        byte = np.where(n_digits[sel] == 8 + j, ord("\t"), (big_hi[sel] >> U64(8 * j)) & U64(255))
        out[offset[r[sel], c[sel] + i0] + 8 + j] = byte.astype(np.uint8)
    if row_starts:  # byte offset where each row begins, and the total
        return out[:-16], np.append(offset[:, 0], len(out) - 16)
    return out[:-16].tobytes()


# ------------------------------------------------------------------------------ splitting
def split_of(rng, n, start, total, split, val_frac, test_frac):
    """Split id per row: 0 train, 1 val, 2 test. `start` = index of the chunk's first row;
    split 'random' draws each row's split, 'time' cuts the `total` rows at 80% / 90%."""
    if split == "random":
        return rng.choice(3, size=n, p=[1 - val_frac - test_frac, val_frac,
                                        test_frac]).astype(np.int8)
    idx = np.arange(start, start + n)
    val_start = int(total * (1 - val_frac - test_frac))
    test_start = int(total * (1 - test_frac))
    return ((idx >= val_start).astype(np.int8) + (idx >= test_start)).astype(np.int8)


# ---------------------------------------------------------------- the data set folder
class DatasetWriter:
    """A data set folder (train/val/test.txt + whatever goes with them) written as a whole:
    every file goes into a temporary sibling folder, and commit() swaps it in for the old one.
    A run killed at any moment leaves the old folder complete (or, between the two renames of
    the swap, no folder) - never new splits next to old ones; its temporary folder is removed
    by the next run. Refuses to replace a folder that is not a data set (no meta.json).
    rows[s] and positives[s] count what was written to split s (the callers say how many)."""
    NAMES = ["train", "val", "test"]

    def __init__(self, out_dir):
        self.final = Path(out_dir)
        if self.final.exists() and not self.final.is_dir():
            raise DatasetFolderError(f"{self.final}: is a file; --out-dir must be a folder")
        if self.final.is_dir() and any(self.final.iterdir()) and \
                not (self.final / "meta.json").is_file():
            raise DatasetFolderError(f"{self.final}: is not empty and is not a data set folder "
                                     "made by 01_make_subset.py (no meta.json); choose another "
                                     "--out-dir")
        for stale in self.final.parent.glob(f".{self.final.name}.*-*"):  # killed earlier runs
            if stale.is_dir() and stale.name.split(".")[-1].split("-")[0] in ("tmp", "old"):
                shutil.rmtree(stale, ignore_errors=True)
        self.folder = self.final.parent / f".{self.final.name}.tmp-{os.getpid()}"
        try:
            self.folder.mkdir(parents=True)
        except OSError as e:
            raise DatasetFolderError(f"{self.final}: cannot write there ({e.strerror}); choose "
                                     "another --out-dir") from None
        self.files = [open(self.folder / f"{s}.txt", "wb") for s in self.NAMES]
        self.rows = [0, 0, 0]
        self.positives = [0, 0, 0]

    def write(self, split, data, rows, positives):
        """Append `rows` rows (bytes or a uint8 array) holding `positives` clicks to a split."""
        self.files[split].write(data)
        self.rows[split] += rows
        self.positives[split] += positives

    def append_part(self, split, part, rows, positives):
        """Append a part file written elsewhere (a generator worker's) to a split, then remove
        it: copied in the kernel (copy_file_range) where the OS offers it."""
        dst = self.files[split]
        dst.flush()
        with open(part, "rb") as src:
            size = os.fstat(src.fileno()).st_size
            try:
                while size > 0:
                    size -= os.copy_file_range(src.fileno(), dst.fileno(), size)
            except (AttributeError, OSError):
                src.seek(os.fstat(src.fileno()).st_size - size)
                shutil.copyfileobj(src, dst, 16 << 20)
        Path(part).unlink()
        self.rows[split] += rows
        self.positives[split] += positives

    def close_splits(self):
        for f in self.files:
            f.close()

    def refuse_empty_splits(self, fractions, hint):
        """After the last write: a split asked for (its fraction of the rows > 0) that got no
        row is a DatasetFolderError, and nothing is swapped in (the temporary folder goes)."""
        empty = [n for n, rows, f in zip(self.NAMES, self.rows, fractions) if rows == 0 and f > 0]
        if empty:
            self.close_splits()
            shutil.rmtree(self.folder, ignore_errors=True)
            raise DatasetFolderError(f"{self.final}: the {' and '.join(empty)} split"
                                     f"{'s' * (len(empty) > 1)} got no rows ({sum(self.rows):,} "
                                     f"rows in all); {hint}")

    def commit(self):
        """Swap the finished folder in: old -> .old-PID, new -> final, then remove the old."""
        self.close_splits()
        old = self.final.parent / f".{self.final.name}.old-{os.getpid()}"
        if self.final.exists():
            os.replace(self.final, old)
        os.replace(self.folder, self.final)
        shutil.rmtree(old, ignore_errors=True)
        return self.final
