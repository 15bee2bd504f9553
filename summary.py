"""What `make demo` measured, on one screen: per stage the AUCs, the gap to the oracle, rows/s,
samples/s and latency, read from the runs' metrics.json files, with the path of each.

Run:    python summary.py [--runs-dir runs]       (make demo runs it last)
A run that is missing is named with the command that makes it; nothing is recomputed here.
"""
import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent


def rel(path):
    """A path as the reader typed it: relative to the repository when inside it."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def read(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def described(path, describe):
    """describe(metrics) -> lines, for a readable file; a file that is not JSON, or that lacks
    what the summary reads (a run killed mid-way, an older version's file), is one line naming
    it instead of a traceback."""
    if not Path(path).exists():
        return []
    m = read(path)
    try:
        if not isinstance(m, dict):
            raise ValueError("is not readable JSON (cut short?)" if m is None
                             else "is not a JSON object")
        return describe(m)
    except (KeyError, IndexError, TypeError, ValueError, ZeroDivisionError) as e:
        why = f"lacks {e}" if isinstance(e, KeyError) else str(e) or type(e).__name__
        return [f"  (incomplete: {rel(path)} {why}; rerun the command that wrote it)"]


def latest(runs, script):
    """(path, metrics) of the newest runs/*/metrics.json written by `script`, or (None, None):
    found by what the file says wrote it, not by a run name kept here."""
    found = [(p.stat().st_mtime, p) for p in runs.glob("*/metrics.json")]
    for _, path in sorted(found, reverse=True):
        m = read(path)
        if isinstance(m, dict) and m.get("script") == script:
            return path, m
    return None, None


def stage1(runs):
    path, _ = latest(runs, "stage1_adult/03_train_mtml.py")

    def describe(m):
        t = m["splits"]["test"]
        return [f"  shared-bottom MTL: test AUC income {t['income']['auc']:.4f}, married "
                f"{t['married']['auc']:.4f} | best epoch {m['best_epoch']} | "
                f"{m['train_samples_per_s']:,.0f} train samples/s", f"    {rel(path)}"]
    return (described(path, describe) if path else
            [f"  (no run: python stage1_adult/03_train_mtml.py -> {rel(runs)}/<name>/)"])


def stage2(runs, data):
    def synthetic(meta):
        if "oracle_auc" not in meta["splits"].get("test", {}):
            return []
        return [f"  synthetic data: {sum(s['rows'] for s in meta['splits'].values()):,} "
                f"rows, oracle test AUC {meta['splits']['test']['oracle_auc'][0]:.4f} "
                f"(generated at {meta['rows_per_s']:,.0f} rows/s)"]

    def loader(m):
        collisions = m.get("collisions")
        return [f"  loader: {m['rows']:,} rows at {m['rows_per_s']:,.0f} rows/s"
                + (f", {collisions['values_in_shared_buckets']:.1%} of the values share "
                   f"a bucket at 2^{collisions['hash_bits']}" if collisions else ""),
                f"    {rel(runs / 'dataloader' / 'metrics.json')}"]

    def ctr(path):
        def describe(m):
            t = m["splits"]["test"]
            gap = (f", gap to the oracle {t['auc_gap_to_oracle']:.4f}"
                   if "auc_gap_to_oracle" in t else "")
            return [f"  {m['model']}: test AUC {t['auc']:.4f}, logloss {t['logloss']:.4f}{gap} "
                    f"| {m['train_samples_per_s']:,.0f} train samples/s on {m['device']}",
                    *epochs_line(m), f"    {rel(path)}"]
        return describe

    def epochs_line(m):
        """Which epoch was best (train_ctr records it), and the chapter that says why."""
        ends = [h["val_auc"] for h in m.get("history", []) if h.get("epoch_end")]
        if m.get("best_epoch") is None or len(ends) < 2:
            return []
        return [f"    best epoch {m['best_epoch']} of {len(ends)} (val AUC at the epoch ends "
                + " -> ".join(f"{a:.4f}" for a in ends) + "); why the second epoch hurts the "
                "MLP models: stage2_ctr/08_one_epoch.py"]

    def movielens(ml):
        lines = []
        for model, r in ml["results"].items():
            for split, seeds in r["runs"].items():
                auc = sum(s["test"]["auc"] for s in seeds) / len(seeds)
                loss = sum(s["test"]["logloss"] for s in seeds) / len(seeds)
                lines.append(f"  MovieLens-100k {model} ({split} split, {len(seeds)} seed(s)): "
                             f"test AUC {auc:.4f}, logloss {loss:.4f}")
        return lines + [f"    {rel(runs / 'stage2_movielens.json')}"]

    lines = described(data / "synthetic" / "meta.json", synthetic)
    lines += described(runs / "dataloader" / "metrics.json", loader)
    for path in sorted(runs.glob("ctr_*/metrics.json")):
        lines += described(path, ctr(path))
    lines += described(runs / "stage2_movielens.json", movielens)
    return lines or ["  (no runs: python stage2_ctr/train_ctr.py)"]


def stage3(runs):
    def mtl(m):
        by_arch = {}
        for r in m["runs"]:
            if len(r["tasks"]) == 2:
                by_arch.setdefault(r["arch"], []).append(r["test_auc"])
        cells = [f"{a} {sum(x['income'] for x in v) / len(v):.4f}/"
                 f"{sum(x['married'] for x in v) / len(v):.4f}" for a, v in by_arch.items()]
        return ["  multi-task on Adult (income/married test AUC): " + ", ".join(cells),
                f"    {rel(runs / 'stage3_mtl_adult.json')}"]

    def latency(lat):
        lines = []
        for model in dict.fromkeys(r["model"] for r in lat["rows"]):
            rows = [r for r in lat["rows"] if r["model"] == model]
            cells = [f"batch {r['batch']:,} {r['p50_ms']:.2f} ms ({r['samples_per_s']:,.0f}/s)"
                     for r in rows]
            lines.append(f"  {model} p50 latency: " + ", ".join(cells))
        return lines + [f"    {rel(runs / 'stage3_latency.json')}"]

    lines = described(runs / "stage3_mtl_adult.json", mtl)
    lines += described(runs / "stage3_latency.json", latency)
    return lines or ["  (no runs: python stage3_advanced/01_mtl_adult.py --quick)"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs-dir", default=str(ROOT / "runs"))
    p.add_argument("--data-dir", default=str(ROOT / "stage2_ctr" / "data"))
    args = p.parse_args(argv)
    runs = Path(args.runs_dir)
    lines = ["", "=" * 78, "What the demo measured (quick sizes: the full tables are in results/)",
             "=" * 78, "Stage 1: UCI Adult", *stage1(runs),
             "Stage 2: CTR on Criteo-format data", *stage2(runs, Path(args.data_dir)),
             "Stage 3: multi-task blocks and serving", *stage3(runs),
             "Read next: README.md (the learning path) and each stage's README.md."]
    print("\n".join(lines))
    return lines


if __name__ == "__main__":
    main()
