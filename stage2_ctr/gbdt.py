"""LightGBM as the tabular baseline: installed for one run only, tuned on validation.

LightGBM is never a project dependency: lightgbm() pip-installs it into a temporary folder for
the length of a `with` block (the chapters open it before any training, so a machine without
network learns that at once, in one line, not after an hour of training). tune_and_run() is the
protocol a baseline gets here: a small grid picked on validation with early stopping on the
validation AUC, then every seed with the pick.
Read it with stage2_ctr/05_movielens.py, which hands it MovieLens's ids as categoricals.
"""
import contextlib
import subprocess
import sys
import tempfile

import numpy as np

import common

VERSION = "lightgbm==4.7.0"


class BaselineError(RuntimeError):
    """LightGBM could not be installed or imported: one line saying what to do."""


@contextlib.contextmanager
def lightgbm(spec=VERSION):
    """The lightgbm module, pip-installed (--no-deps) into a temporary folder that is removed
    when the block ends."""
    tmp = tempfile.TemporaryDirectory(prefix="lightgbm_")
    try:
        print(f"installing {spec} into {tmp.name} (this run only)")
        done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                               "--target", tmp.name, spec], capture_output=True, text=True)
        if done.returncode:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1][-160:]
            raise BaselineError(f"pip could not install {spec} for the baseline ({last}); "
                                "without network, rerun with --skip-gbdt")
        sys.path.insert(0, tmp.name)
        try:
            import lightgbm as lgb
        except (ImportError, OSError) as e:
            raise BaselineError(f"{spec} does not load ({str(e)[:160]}); rerun with "
                                "--skip-gbdt") from None
        yield lgb
    finally:
        if tmp.name in sys.path:
            sys.path.remove(tmp.name)
        tmp.cleanup()


def search_space(threads):
    """The grid: leaves x minimum leaf size, the rest fixed."""
    return [dict(num_leaves=nl, min_data_in_leaf=md, learning_rate=0.05, cat_smooth=10,
                 feature_fraction=0.8, bagging_fraction=0.8, bagging_freq=1, verbose=-1,
                 objective="binary", metric="auc", num_threads=threads)
            for nl in (15, 63) for md in (20, 100)]


def tune_and_run(lgb, feats, n_categorical, seeds, first, threads):
    """feats: {split kind: {train/val/test: (X, y)}}, the first n_categorical columns of X
    categorical codes. Picked on validation (seeds[0], split kind `first`); early stopping on
    validation AUC; then every seed (bagging and feature sampling seeds) on every split kind.
    Returns (the picked parameters, {kind: [run per seed]})."""
    def run(f, params, seed):
        train = lgb.Dataset(f["train"][0], f["train"][1],
                            categorical_feature=list(range(n_categorical)))
        val = lgb.Dataset(f["val"][0], f["val"][1], reference=train)
        booster = lgb.train(dict(params, seed=seed), train, num_boost_round=3000,
                            valid_sets=[val], callbacks=[lgb.early_stopping(50, verbose=False)])
        out = {"best_epoch": booster.best_iteration}
        for split in ("val", "test"):
            out[split] = common.auc_logloss(f[split][1], booster.predict(
                f[split][0], num_iteration=booster.best_iteration))
        return out
    space = search_space(threads)
    tried = [run(feats[first], params, seeds[0]) for params in space]
    best = space[int(np.argmax([t["val"]["auc"] for t in tried]))]
    return best, {kind: [run(f, best, s) for s in seeds] for kind, f in feats.items()}
