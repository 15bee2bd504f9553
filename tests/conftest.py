"""Shared test helpers: load a numbered chapter by path, tiny Adult files made from the real ones
(a few hundred rows, with both dialects' quirks kept), and DDP runs on a free port.

load_script is the project's one import by path: a chapter's file name starts with a digit, so
`import` cannot name it, and the tests call its main() in-process. Everything a chapter shares
with others lives in plain modules (common.py, stage2_ctr/criteo.py, ...) imported normally."""
import importlib.util
import os
import random
import re
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ADULT = ROOT / "stage1_adult" / "data"
sys.path.insert(0, str(ROOT))  # the repo root: `import common`, `from stage2_ctr import ...`


def load_script(relpath):
    """Import a script whose file name starts with a digit (01_..., 02_...)."""
    path = ROOT / relpath
    name = "script_" + path.stem.replace("-", "_")
    if name in sys.modules:  # one module object per script, so pickling by name works
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # so multiprocessing can pickle its functions by name
    spec.loader.exec_module(module)
    return module


def one_line_exit(fn, *args):
    """Run fn, which must exit with one 'error: ...' line (no traceback); return that line."""
    with pytest.raises(SystemExit) as e:
        fn(*args)
    msg = str(e.value.code)
    assert msg.startswith("error: ") and "\n" not in msg and "Traceback" not in msg, msg
    return msg


def free_port(n=1):
    """The first of n consecutive free ports (one per rendezvous), below the kernel's ephemeral
    range (32768-60999 by default): a port from that range can be taken, between this check and
    a later run's bind, by the ranks' own outgoing connections - rank 0 then cannot listen and
    rank 1 waits for it until the test's timeout (seen once in a fresh-clone run)."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    while True:
        first = random.randrange(max(1024, low - 12000), low - n)
        try:
            for k in range(n):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", first + k))
            return first
        except OSError:
            continue


def ddp_env(**extra):
    """The environment of a DDP rank under test: one OpenMP thread per rank (2 ranks share the
    2 cores) and faulthandler on, so that a rank killed by a signal prints its Python stack."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1", **extra}


def crash_report(output):
    """What a rank printed from its faulthandler on a fatal signal ('Fatal Python error: ...'
    and its stack), else None."""
    start = output.find("Fatal Python error")
    return None if start < 0 else output[start:start + 3000]


def torchrun(script, make_argv, timeout=300):
    """`python -m torch.distributed.run --nproc_per_node 2 script ARGV` on a free port, as a user
    runs it; make_argv(attempt) gives ARGV. A rank killed by a signal (a SIGSEGV in rank 1 of
    the two-process test, once in CI on 2026-12-02, with no stack printed; 64 runs of the same
    command here, 24 beside two busy processes, never crashed) runs once more under attempt 1,
    with a warning carrying the crashed rank's stack; a Python error, a wrong result, a hang or
    a second crash still fails."""
    for attempt in range(2):
        result = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
             "--master_port", str(free_port()), str(script), *make_argv(attempt)],
            capture_output=True, text=True, env=ddp_env(), cwd=ROOT, timeout=timeout)
        # torchrun's summary names each failed rank's exit code; -15 is its own SIGTERM to the
        # others. A crash after Python's shutdown prints no faulthandler stack
        signal_death = re.search(r"exitcode\s*: -(?!15\b)\d+", result.stderr)
        crash = signal_death and (crash_report(result.stderr) or signal_death[0] + " (no stack)")
        if result.returncode == 0 or not crash or attempt:
            assert result.returncode == 0, crash or result.stderr[-3000:]
            return result
        warnings.warn(f"a DDP rank died of a signal; running once more. Its stack:\n{crash}")


def write_tiny_adult(folder, n_train=800, n_test=400):
    """First rows of the real files, keeping adult.test's header line, the '.' labels and the
    blank last line."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    train = ADULT.joinpath("adult.data").read_text().split("\n")[:n_train]
    test = ADULT.joinpath("adult.test").read_text().split("\n")[:n_test + 1]
    folder.joinpath("adult.data").write_text("\n".join(train) + "\n\n")
    folder.joinpath("adult.test").write_text("\n".join(test) + "\n\n")
    return folder


@pytest.fixture(scope="session")
def tiny_adult(tmp_path_factory):
    return write_tiny_adult(tmp_path_factory.mktemp("adult"))


@pytest.fixture(scope="session")
def tiny_npz(tiny_adult, tmp_path_factory):
    """02_preprocess.py run on the tiny files: (leak-free npz, leaky npz)."""
    out = tmp_path_factory.mktemp("npz")
    pre = load_script("stage1_adult/02_preprocess.py")
    pre.main(["--data-dir", str(tiny_adult), "--out", str(out / "adult.npz"), "--min-count", "3"])
    pre.main(["--data-dir", str(tiny_adult), "--out", str(out / "adult_leaky.npz"),
              "--min-count", "3", "--keep-leaky"])
    return out / "adult.npz", out / "adult_leaky.npz"
