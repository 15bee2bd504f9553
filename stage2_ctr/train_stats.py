"""What is fitted on the train split, and tied to it: the dense statistics, the bucket counts
behind the frequency threshold (RareFilter), the hash collisions, and the file fingerprints that
tell a statistic fitted on today's train file from a stale one. Read it with
stage2_ctr/02_dataloader.py (--fit-stats, --report-collisions) and the trainer (--min-count).
"""
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

import common
from stage2_ctr.criteo import (N_DENSE, N_SPARSE, CriteoFormatError, bucket_of, check_path,
                               check_paths, hash_strings, iter_blocks, open_binary, parse_block)


# ------------------------------------------------------------------------------ fingerprints
def fingerprint(path):
    """What identifies a file's content cheaply: its size and the md5 of its first and last
    MiB (a regenerated or appended file changes one of them; reading 2 MiB takes a moment)."""
    size = os.path.getsize(path)
    h = hashlib.md5()
    with open_binary(path) as f:
        h.update(f.read(1 << 20))
        if size > 1 << 20:
            f.seek(max(size - (1 << 20), 1 << 20))
            h.update(f.read())
    return {"path": str(path), "size": size, "md5_head_tail": h.hexdigest()}


def fit_stats(paths, max_rows=2_000_000, n_labels=1, chunk_bytes=8 << 20):
    """One pass over (the first max_rows of) train: mean/std of log1p(max(x, 0)) per dense
    column over the non-missing values, plus each column's missing rate. Records the
    fingerprint of every file it read, so stale statistics can be told apart (load_stats)."""
    s1, s2 = np.zeros(N_DENSE), np.zeros(N_DENSE)
    count, missing, rows = np.zeros(N_DENSE), np.zeros(N_DENSE), 0
    paths = check_paths(paths)
    for path in paths:
        if rows >= max_rows:
            break
        for _, _, raw in iter_blocks(path, chunk_bytes):
            p = parse_block(np.frombuffer(raw + b"\0" * 8, dtype=np.uint8), n_labels)
            x = p["dense_raw"][: max_rows - rows]
            present = ~np.isnan(x)
            v = np.where(present, np.log1p(np.maximum(np.nan_to_num(x), 0)), 0.0)
            s1, s2 = s1 + v.sum(0), s2 + (v * v).sum(0)
            count, missing = count + present.sum(0), missing + (~present).sum(0)
            rows += len(x)
            if rows >= max_rows:
                break
    if rows == 0:
        raise CriteoFormatError(f"{paths[0]}: no data rows (blank or malformed lines only); "
                                "nothing to fit statistics on")
    mean = s1 / np.maximum(count, 1)
    std = np.sqrt(np.maximum(s2 / np.maximum(count, 1) - mean ** 2, 0)) + 1e-6
    return {"rows": rows, "transform": "log1p(max(x, 0))", "mean": mean.tolist(),
            "std": std.tolist(), "missing_rate": (missing / max(rows, 1)).tolist(),
            "files": [str(p) for p in paths], "n_labels": n_labels,
            "sources": [fingerprint(p) for p in paths]}


def load_stats(path, train_files=None):
    """Dense statistics from a fit_stats JSON, checked: 13 finite means and positive stds. With
    train_files, also that they were fitted on exactly these files as they are now (size and
    head/tail checksum); StaleStats when not."""
    path = Path(path)
    try:
        stats = json.loads(path.read_text())
        mean, std = np.asarray(stats["mean"], float), np.asarray(stats["std"], float)
        ok = mean.shape == std.shape == (N_DENSE,) and np.isfinite(mean).all() and \
            np.isfinite(std).all() and (std > 0).all()
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CriteoFormatError(f"{path}: not a statistics file of 02_dataloader.py --fit-stats "
                                f"({type(e).__name__}: {e}); delete it and fit again") from None
    if not ok:
        raise CriteoFormatError(f"{path}: needs 13 finite means and positive stds; delete it "
                                "and fit again with 02_dataloader.py --fit-stats")
    if train_files is not None:
        now = [fingerprint(p) for p in check_paths(train_files)]
        before = stats.get("sources")
        if before is None or [(s["size"], s["md5_head_tail"]) for s in before] != \
                [(s["size"], s["md5_head_tail"]) for s in now]:
            was = ("no record of the files it was fitted on" if before is None else
                   f"fitted on {', '.join(s['path'] for s in before)} as they were then "
                   f"({', '.join(str(s['size']) for s in before)} bytes)")
            files_now = ", ".join(f"{s['path']} ({s['size']} bytes)" for s in now)
            raise StaleStats(f"{path}: {was}; the train file(s) now: {files_now}")
    return stats


class StaleStats(CriteoFormatError):
    """Statistics fitted on other data than the train file(s) now on disk."""


# --------------------------------------------------------------- rare values -> one bucket
RARE_VALUE = "\x00rare"  # what a value seen fewer than min_count times is hashed as instead


def count_buckets(paths, hash_bits, n_labels=1, chunk_bytes=8 << 20):
    """How many rows of the files use each bucket of the shared table (int64, 2^hash_bits):
    the counts behind a frequency threshold. Counted per bucket, not per value: two values
    that share a bucket (a collision) count together."""
    counts = np.zeros(1 << hash_bits, np.int64)
    for path in check_paths(paths):
        for _, _, raw in iter_blocks(path, chunk_bytes):
            p = parse_block(np.frombuffer(raw + b"\0" * 8, dtype=np.uint8), n_labels)
            counts += np.bincount(bucket_of(p["hashes"], hash_bits).ravel(),
                                  minlength=1 << hash_bits)
    return counts


def cached_bucket_counts(path, paths, hash_bits):
    """count_buckets, kept in an .npz at `path` with the fingerprints of the files they were
    counted on: read back while those are unchanged, else counted again and written."""
    now = json.dumps([fingerprint(p) for p in check_paths(paths)])
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["sources"]) == now:
                return z["counts"]
    except (OSError, KeyError, ValueError):
        pass
    counts = count_buckets(paths, hash_bits)

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, counts=counts, sources=np.array(now))
    common.atomic_write(path, write)
    return counts


class RareFilter:
    """Values seen fewer than min_count times in the training file(s) go to their field's
    "rare" bucket (the hash of RARE_VALUE in that field), as industrial pipelines do (BARS's
    Criteo_x4_001 maps values seen < 10 times to OOV): one well-estimated embedding per field
    for the long tail, instead of thousands of rows each seen a few times, which are noise in
    every model and worse than noise in the FM term, where each enters every pair."""

    def __init__(self, counts, min_count, hash_bits):
        self.keep = counts >= min_count
        self.rare = np.array([bucket_of(hash_strings(f, [RARE_VALUE]), hash_bits)[0]
                              for f in range(N_SPARSE)], np.int64)
        self.min_count = min_count
        self._torch = None  # the same tables as tensors, made on first use per device

    def __call__(self, sparse):
        """Filtered ids: numpy in, numpy out; a torch tensor in, a tensor out (same device)."""
        if isinstance(sparse, np.ndarray):
            return np.where(self.keep[sparse], sparse, self.rare)
        if self._torch is None or self._torch[0].device != sparse.device:
            self._torch = (torch.from_numpy(self.keep).to(sparse.device),
                           torch.from_numpy(self.rare).to(sparse.device, sparse.dtype))
        keep, rare = self._torch
        return torch.where(keep[sparse], sparse, rare)

    def share_kept(self, counts):
        """The share of (row, field) values that keep their own bucket."""
        return float(counts[self.keep].sum() / max(counts.sum(), 1))


def collision_report(paths, hash_bits, n_labels=1, max_rows=None):
    """Distinct (field, value) pairs vs the distinct buckets they land in, and two ways to say
    what the collisions are: values_in_shared_buckets, the share of values whose bucket holds
    at least one other value (their embedding row is a compromise), and excess_values,
    1 - buckets / values, the share of values beyond the first one of each bucket (the rows a
    larger table would add). The first is about twice the second when collisions are rare.
    The 64-bit hash stands in for the value (two values sharing all 64 bits is unlikely)."""
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
    buckets, per_bucket = np.unique(bucket_of(values, hash_bits), return_counts=True)
    n = max(len(values), 1)
    return {"rows": rows, "hash_bits": hash_bits, "distinct_values": int(len(values)),
            "distinct_buckets": int(len(buckets)),
            "values_in_shared_buckets": float(per_bucket[per_bucket > 1].sum() / n),
            "excess_values": float(1 - len(buckets) / n)}


def oracle_scores(files, scan):
    """The oracle's scores of a split that 01_make_subset.py generated (its meta.json), for the
    trainer to print next to the model's; `scan`: criteo.scan of the file. Used only
    when the file is the one they were scored on (its rows, and its fingerprint where
    recorded), not after the split was edited or cut."""
    meta_path = Path(files[0]).parent / "meta.json"
    split = Path(files[0]).name.split(".")[0]
    if len(files) != 1 or not meta_path.exists():
        return None
    r = json.loads(meta_path.read_text()).get("splits", {}).get(split, {})
    counted = next(iter(scan["files"].values()))
    same = r.get("rows") == counted["rows"] + counted["bad_rows"] and (
        "file" not in r or [r["file"][k] for k in ("size", "md5_head_tail")] == [
            fingerprint(files[0])[k] for k in ("size", "md5_head_tail")])
    if "oracle_auc" not in r or not same:
        return None
    return {"auc": r["oracle_auc"][0], "logloss": r["oracle_logloss"][0]}
