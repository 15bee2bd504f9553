"""Shared test helpers: load a numbered chapter by path, and tiny Adult files made from the real
ones (a few hundred rows, with both dialects' quirks kept).

load_script is the project's one import by path: a chapter's file name starts with a digit, so
`import` cannot name it, and the tests call its main() in-process. Everything a chapter shares
with others lives in plain modules (common.py, stage2_ctr/criteo.py, ...) imported normally."""
import importlib.util
import sys
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
