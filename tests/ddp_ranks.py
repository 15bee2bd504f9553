"""One DDP rank of tests/test_trainer_paths.py: run as `python tests/ddp_ranks.py OUT -- ARGS;
ARGS; ...` with torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) set by
the test. Trains each ';'-separated train_ctr command line in turn (a new process group each)
and writes OUT.<rank>.json: per run the steps this rank took, the rows it trained on, the rows
a --preload put in its memory, and the run's samples as the trainer reports them."""
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: plain imports
from stage2_ctr import binary_cache, train_ctr  # noqa: E402


def main():
    out, runs = sys.argv[1], " ".join(sys.argv[3:]).split(";")
    seen = {"rows": 0, "steps": 0, "preloaded": None}
    make_step, preload = train_ctr.make_step, binary_cache.preload

    def counting_step(*a, **kw):
        step = make_step(*a, **kw)

        def run(dense, sparse, label):
            seen["rows"] += len(label)
            seen["steps"] += 1
            return step(dense, sparse, label)
        return run

    def counting_preload(*a, **kw):
        resident = preload(*a, **kw)
        seen["preloaded"] = len(resident)
        return resident

    train_ctr.make_step, binary_cache.preload = counting_step, counting_preload
    results = []
    port = int(os.environ["MASTER_PORT"])
    for i, argv in enumerate(runs):  # each run its own rendezvous port: no store is reused
        os.environ["MASTER_PORT"] = str(port + i)
        seen.update(rows=0, steps=0, preloaded=None)
        try:
            m = train_ctr.main(argv.split())
            results.append({**seen, "metrics_steps": m["steps"],
                            "samples": m["train_samples"]})
        except SystemExit as e:  # a one-line refusal: the test reads it
            results.append({"error": str(e.code)})
    Path(f"{out}.{os.environ['RANK']}.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main()
