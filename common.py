"""What every stage needs, written once: atomic writes, mean ± std, peak memory, the matmul peak,
markdown tables, metrics (AUC, log loss, calibration) and the argparse types of every chapter.

Chapters import it after putting the repository root on sys.path (the two lines at the top of
each numbered script), so `import common` and `from stage2_ctr.criteo import ...` are plain
imports that an IDE and an import-graph tool follow.
"""
import sys

if sys.platform == "win32":  # before `import resource`, which native Windows lacks
    sys.exit("error: ML-Playground runs on Linux and in WSL2 (it reads /proc, uses `resource`"
             " and forks workers), not on native Windows: `wsl --install`, then run it there")

import argparse  # noqa: E402
import ctypes  # noqa: E402
import errno  # noqa: E402
import functools  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
RUNS = ROOT / "runs"


# ------------------------------------------------------------------------------ atomic writes
class OutputError(OSError):
    """A file or folder that cannot be written (read-only, full disk, a name too long, a file
    where a folder belongs): the message is one line naming the path and what to do."""


_IN_THE_WAY = "a file stands where a folder of this path belongs; remove it or choose another path"
_READ_ONLY = "not writable (read-only or no permission); choose a writable folder"
_FULL = "the disk is full; free some space or write elsewhere"
WHY_NOT_WRITTEN = {errno.EEXIST: _IN_THE_WAY, errno.ENOTDIR: _IN_THE_WAY, errno.EACCES: _READ_ONLY,
                   errno.EPERM: _READ_ONLY, errno.EROFS: _READ_ONLY, errno.ENOSPC: _FULL,
                   errno.EDQUOT: _FULL, errno.ENAMETOOLONG: "a name on this path is longer than "
                   "the file system allows (255 bytes); choose a shorter one",
                   errno.EISDIR: "a folder stands where this file belongs; choose another path"}


def output_problem(path, e):
    """The OutputError (one line) for an OSError met while writing `path`."""
    why = WHY_NOT_WRITTEN.get(e.errno, e.strerror or e)
    return OutputError(f"{path}: cannot write here: {why}")


def atomic_write(path, write_fn):
    """write_fn(tmp_path) writes the file; it appears under `path` only once complete (a temp
    file in the same folder, then os.replace), so a reader never sees half a file. Any OSError
    on the way (full disk, read-only folder, ...) becomes an OutputError naming `path`."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name[:200] + ".", suffix=".tmp")
        os.close(fd)
        write_fn(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files
        os.replace(tmp, path)
    except OSError as e:
        raise output_problem(path, e) from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


def check_writable(folder, flag):
    """Before any work: create `folder` (and its parents) and write + remove a probe file in it,
    so a read-only, misplaced or over-long output path ends the run in one line at the start,
    not after an hour of training. `flag` names the option that chose the folder."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write_probe.", suffix=".tmp")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise OutputError(f"{flag} {output_problem(folder, e)}") from None
    return folder


def one_line_errors(*kinds):
    """Decorator for a chapter's main(): an exception of `kinds` (and OutputError always) ends
    the run with its one-line message, `error: ...` and exit status 1, never a traceback;
    Ctrl-C with one line too."""
    def wrap(main):
        @functools.wraps(main)
        def run(*args, **kwargs):
            try:
                return main(*args, **kwargs)
            except (OutputError, *kinds) as e:
                sys.exit(f"error: {e}")
            except KeyboardInterrupt:
                sys.exit("error: interrupted (Ctrl-C); every file is whole or absent (atomic "
                         "writes)")
        return run
    return wrap


def write_text(path, text):
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=1, default=_json_default))


def _json_default(x):
    if isinstance(x, (np.integer, np.floating)):
        return x.item()
    if isinstance(x, (Path, np.ndarray)):
        return str(x) if isinstance(x, Path) else x.tolist()
    raise TypeError(f"not JSON serializable: {type(x).__name__}")


def save_npy(path, array):
    def write(tmp):
        with open(tmp, "wb") as f:  # a file object: np.save would append .npy to a name
            np.save(f, array)
    atomic_write(path, write)


def torch_save(obj, path):
    import torch
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def remove_stale_tmp(folder):
    """Temp files a killed run left behind (atomic_write's `name.XXXX.tmp`): removed on the
    next start, so they do not pile up."""
    for p in Path(folder).glob("*.tmp"):
        if p.is_file():
            p.unlink(missing_ok=True)


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path, dpi=100):
    plt = pyplot()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))
    plt.close(fig)


def quick_or_results(quick):
    """Where a result table goes: results/ (committed, shown by the READMEs) for full runs,
    runs/quick/ for --quick runs, so `make demo` never overwrites a measured table."""
    return RUNS / "quick" if quick else RESULTS


# Flags that change how fast a chapter runs, never what it measures: a run with only these is
# still the chapter's default run and may write its committed results file.
HARMLESS_FLAGS = frozenset({"--threads", "--fresh", "--num-workers", "--workers", "--quiet",
                            "--make-data", "--runs-dir", "--parallel", "--jobs"})


def non_default_flags(argv, harmless=HARMLESS_FLAGS):
    """The flags of argv (a chapter's command line, without the script) that are not harmless:
    what makes a run other than the chapter's default one."""
    argv = sys.argv[1:] if argv is None else argv
    return [a.split("=")[0] for a in argv if a.startswith("--")
            and a.split("=")[0] not in harmless]


def results_folder(argv, quick=False, harmless=HARMLESS_FLAGS):
    """Where a chapter writes its results table. results/ (committed, quoted by the READMEs)
    only for the default run: no flag but harmless ones. --quick runs go to runs/quick/, any
    other run to runs/partial/, so a partial run (one model, one seed, another size) never
    overwrites the full run's file. The file itself names the exact command (command_line)."""
    if quick:
        return RUNS / "quick"
    return RUNS / "partial" if non_default_flags(argv, harmless) else RESULTS


def results_file(argv, quick, name, device="cpu", harmless=HARMLESS_FLAGS):
    """results_folder(argv, quick) / <name>.md, or <name>_cuda.md for a run on CUDA: the
    committed tables are CPU measurements, and a GPU run never overwrites them."""
    cuda = str(device).startswith("cuda")
    return results_folder(argv, quick, harmless) / f"{name}{'_cuda' if cuda else ''}.md"


def command_line(script, argv):
    """The exact command that reproduces a run: `python <script relative to the repo> <argv>`,
    every flag as given (shell-quoted)."""
    import shlex
    argv = sys.argv[1:] if argv is None else argv
    script = Path(script).resolve()
    try:
        script = script.relative_to(ROOT)
    except ValueError:
        pass
    return " ".join(["python", script.as_posix()] + [shlex.quote(str(a)) for a in argv])


def cpu_name():
    """The CPU model as /proc/cpuinfo names it, with its bf16/AMX flags (what decides whether
    bf16 is fast): e.g. 'AMD EPYC (avx512_bf16)'."""
    import platform
    name, flags, fields = platform.processor() or platform.machine(), set(), {}
    try:
        for line in open("/proc/cpuinfo"):
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
            if key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    name = fields.get("model name", name)
    if "cpu family" in fields:  # the same name covers several generations (AMD EPYC)
        name += f" family {fields['cpu family']} model {fields.get('model', '?')}"
    native = sorted({"avx512_bf16", "amx_bf16", "amx_tile"} & flags)
    return f"{name} ({', '.join(native) if native else 'no bf16/AMX instructions'})"


def machine_line(device="cpu", threads=None):
    """One line for every results file: the machine it was measured on. CPU model and its
    bf16/AMX flags, cores, torch version, and the GPU when the device is CUDA."""
    import torch
    parts = [f"CPU {cpu_name()}, {os.cpu_count()} cores"]
    if threads:
        parts.append(f"{threads} torch threads")
    if str(device).startswith("cuda") and torch.cuda.is_available():
        d = torch.device(device)
        parts.append(f"GPU {torch.cuda.get_device_name(d)} "
                     f"(capability {'.'.join(map(str, torch.cuda.get_device_capability(d)))})")
    parts.append(f"torch {torch.__version__}")
    return "Machine: " + ", ".join(parts) + "."


# ---------------------------------------------------------------------------------- reporting
def mean_std(values, digits=4):
    """'mean ± std' (population std, 0 for one value); '-' for no values."""
    v = np.asarray(list(values), dtype=float)
    if v.size == 0:
        return "-"
    return f"{v.mean():.{digits}f} ± {v.std():.{digits}f}"


def markdown_table(header, rows):
    """Lines of a markdown table: header (list of str), rows (lists of cells)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


# ------------------------------------------------------------------------------------ metrics
def expected_calibration_error(y, p, n_bins=15):
    """ECE: bin predictions into equal-width probability bins, then sum over bins of
    (bin share of rows) * |mean label - mean prediction|. 0 = perfectly calibrated."""
    edges = np.linspace(0, 1, n_bins + 1)
    which = np.clip(np.digitize(p, edges[1:-1]), 0, n_bins - 1)
    count = np.bincount(which, minlength=n_bins)
    pos = np.bincount(which, weights=y, minlength=n_bins)
    conf = np.bincount(which, weights=p, minlength=n_bins)
    seen = count > 0
    return float(np.sum(np.abs(pos[seen] - conf[seen])) / len(y))


def auc_logloss(y, p):
    """{'auc', 'logloss', 'rows'} of probabilities p for 0/1 labels y."""
    from sklearn.metrics import log_loss, roc_auc_score
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-7, 1 - 1e-7)
    y = np.asarray(y, dtype=np.float64)
    return {"auc": float(roc_auc_score(y, p)), "logloss": float(log_loss(y, p, labels=[0, 1])),
            "rows": int(len(y))}


def binary_metrics(y, p):
    """AUC and log loss plus calibration: ECE, mean prediction, positive rate."""
    out = auc_logloss(y, p)
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-7, 1 - 1e-7)
    out.update(ece=expected_calibration_error(np.asarray(y, np.float64), p),
               mean_pred=float(p.mean()), pos_rate=float(np.mean(y)))
    return out


# ------------------------------------------------------------------------------------- memory
def peak_rss_mb(children=False):
    """Peak resident memory of this process (plus its finished children), MiB (Linux: KiB)."""
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if children:
        kb += resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return kb / 1024


def reset_peak_rss():
    """Linux: hand freed heap back to the OS, then forget this process's peak (VmHWM), so the
    next measurement's peak is its own. Elsewhere a no-op (the peak is then cumulative)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
    except (OSError, AttributeError):
        pass


def peak_since_reset_mb():
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return peak_rss_mb()


# --------------------------------------------------------------------------- the matmul peak
def matmul_peak_gflops(device="cpu", dtype="float32", n=2048, repeats=20):
    """The best of `repeats` n x n matmuls in `dtype`, in GFLOP/s: the practical peak an MLP's
    matmuls are measured against. (On a shared machine a single reading can come out low:
    callers measure before and after their work and keep the higher one.)"""
    import torch
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b
    times = []
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        a @ b
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / min(times) / 1e9


def synchronize(device):
    import torch
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- argparse types
def checked(kind, ok, rule, many=False):
    """An argparse type: kind(text), rejected with `must be <rule>` unless ok(value). many: a
    comma-separated list of at least one such value ('--seeds ,' and '--ks 0' are errors)."""
    def parse(text):
        try:
            values = [kind(x) for x in text.split(",") if x.strip()] if many else [kind(text)]
        except ValueError:
            values = []
        if not values or not all(ok(v) for v in values):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text!r}")
        return values if many else values[0]
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


positive_int = checked(int, lambda v: v >= 1, "an integer >= 1")
non_negative_int = checked(int, lambda v: v >= 0, "an integer >= 0")
positive_float = checked(float, lambda v: v > 0 and np.isfinite(v), "a number > 0")
non_negative_float = checked(float, lambda v: v >= 0 and np.isfinite(v), "a number >= 0")
probability = checked(float, lambda v: 0 <= v < 1, "a probability in [0, 1)")
fraction = checked(float, lambda v: 0 <= v <= 1, "a fraction in [0, 1]")
correlation = checked(float, lambda v: -1 <= v <= 1, "a correlation (cosine) in [-1, 1]")
hash_bits = checked(int, lambda v: 1 <= v <= 30, "an integer in [1, 30] (2^bits hash buckets)")
rate = checked(float, lambda v: 0 < v < 1, "a rate in (0, 1)")


def layer_list(text):
    """'400,400,400' -> (400, 400, 400); '' -> () (no hidden layer)."""
    try:
        sizes = tuple(int(h) for h in text.split(",") if h.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be comma-separated layer sizes such as 400,400,400, got {text!r}")
    if any(h < 1 for h in sizes):
        raise argparse.ArgumentTypeError(f"layer sizes must be >= 1, got {text!r}")
    return sizes


def int_list(text):
    """'0,1,2' -> [0, 1, 2]."""
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated integers, got {text!r}")


def float_list(text):
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated numbers, got {text!r}")


positive_int_list = checked(int, lambda v: v >= 1, "comma-separated integers >= 1", True)
seed_list = checked(int, lambda v: v >= 0, "comma-separated seeds (integers >= 0)", True)
positive_float_list = checked(float, lambda v: v > 0 and np.isfinite(v),
                              "comma-separated numbers > 0", True)
non_negative_float_list = checked(float, lambda v: v >= 0 and np.isfinite(v),
                                  "comma-separated numbers >= 0", True)
probability_list = checked(float, lambda v: 0 <= v < 1,
                           "comma-separated probabilities in [0, 1)", True)


def parse_with_quick(parser, argv, quick):
    """parser.parse_args(argv) where --quick sets the defaults in `quick` ({dest: value}): a
    flag the user gave keeps the user's value (`--quick --seeds 0,1` runs seeds 0 and 1)."""
    args = parser.parse_args(argv)
    if args.quick:
        parser.set_defaults(**quick)
        args = parser.parse_args(argv)
    return args


def require_finite(values, what, hint="lower --lr or check the inputs"):
    """values: {name: number}. A NaN or infinite metric ends the run with one line naming it,
    before any table is written (a table of `nan ± nan` teaches nothing)."""
    bad = [k for k, v in values.items() if not np.all(np.isfinite(np.asarray(v, float)))]
    if bad:
        sys.exit(f"error: {what} came out NaN or infinite for {'; '.join(map(str, bad[:4]))}"
                 f"{' and more' if len(bad) > 4 else ''}: no table written; {hint}")


def device_arg(text):
    """auto | cpu | cuda | cuda:N, checked against what this machine has."""
    import torch
    if text == "auto":
        return text
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"must be auto, cpu, cuda or cuda:N, got {text!r}")
    if device.type == "cpu":
        if device.index not in (None, 0):
            raise argparse.ArgumentTypeError(f"{text!r}: there is one CPU device; use cpu")
        return "cpu"
    if device.type != "cuda":
        raise argparse.ArgumentTypeError(f"must be auto, cpu, cuda or cuda:N, got {text!r}")
    if not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text}: this machine has no CUDA device visible to "
                                         "torch; use --device auto (or cpu)")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text}: only {torch.cuda.device_count()} CUDA "
                                         "device(s) here")
    return text


def resolve_device(name, local_rank=0):
    """'auto' -> cuda:<local_rank> when CUDA is there, else cpu; otherwise torch.device(name)
    (validated by device_arg)."""
    import torch
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    return torch.device("cuda", 0) if device.type == "cuda" and device.index is None else device


def set_threads(threads):
    """torch CPU threads (0 = torch's default). A flag in every chapter: the machine is shared."""
    import torch
    if threads:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------------ forked workers
def fork_map(fn, shared, tasks, workers):
    """fn(shared, task) for every task, in `workers` forked processes; yields the results as they
    finish (in any order). `shared` (large tables, arrays) reaches the workers through fork -
    copied with the process, never pickled - and is passed to fn explicitly, so no worker reads
    a module global. Tasks and results are pickled (keep them small). An exception in a worker
    is raised here; a worker that dies (killed, out of memory) is an error, not a hang.
    workers <= 1: a plain loop in this process."""
    import multiprocessing as mp
    import queue
    tasks = list(tasks)
    if workers <= 1 or len(tasks) <= 1:
        for task in tasks:
            yield fn(shared, task)
        return
    ctx = mp.get_context("fork")
    todo, done = ctx.Queue(), ctx.Queue()
    for task in tasks:
        todo.put(task)
    procs = [ctx.Process(target=_fork_worker, args=(fn, shared, todo, done), daemon=True)
             for _ in range(min(workers, len(tasks)))]
    for p in procs:
        todo.put(None)  # one stop sign per worker
        p.start()
    try:
        for _ in tasks:
            while True:
                try:
                    ok, value = done.get(timeout=1.0)
                    break
                except queue.Empty:
                    dead = [p for p in procs if p.exitcode not in (None, 0)]
                    if dead:
                        raise RuntimeError(f"a worker process died (exit code "
                                           f"{dead[0].exitcode}); out of memory?") from None
            if not ok:
                raise value
            yield value
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
            p.join()


def _fork_worker(fn, shared, todo, done):
    while (task := todo.get()) is not None:
        try:
            done.put((True, fn(shared, task)))
        except BaseException as e:  # noqa: BLE001 - handed to the parent, which raises it
            done.put((False, e))
