"""Issue 23 (Stage 1's DataLoader lesson, the GPU owner's path) and issue 25 items 6-8 (the GPU
run must not fail), checked on a CPU: check_env's arch message with a faked arch list, the
Makefile's PY override, 07_gpu.py refusing a machine without CUDA and reading check_env's
verdict, a failing job kept as its row with every finished row on disk, the compile job's code
path, worker counts from the affinity set and /dev/shm, Stage 1's chapter 06 and its CUDA part's
code path, and 09's sparse-vs-dense comparison."""
import functools
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, load_script

from envs import check_env
from stage1_adult import loader_bench, mtml

gpu = load_script("stage3_advanced/07_gpu.py")
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")


# ------------------------------------------------------------------------- check_env's arch
class FakeProps:
    total_memory = 32 * 2**30


def fake_cuda(monkeypatch, capability, arch_list):
    for name, value in [("is_available", lambda: True), ("device_count", lambda: 1),
                        ("get_device_capability", lambda i=0: capability),
                        ("get_device_name", lambda i=0: "NVIDIA GeForce RTX 5090"),
                        ("get_device_properties", lambda i=0: FakeProps()),
                        ("get_arch_list", lambda: arch_list)]:
        monkeypatch.setattr(torch.cuda, name, value)


def test_check_env_names_the_missing_arch_and_the_install_that_fixes_it(monkeypatch, capsys):
    fake_cuda(monkeypatch, (12, 0), ["sm_80", "sm_86", "sm_90"])
    assert check_env.main(["--device", "cpu"]) == 1
    out = capsys.readouterr().out
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "sm_120" in errors[0] and "Traceback" not in out
    assert "--index-url https://download.pytorch.org/whl/cu128" in errors[0]
    fake_cuda(monkeypatch, (12, 0), ["sm_80", "sm_90", "sm_100", "sm_120"])
    assert check_env.main(["--device", "cpu"]) == 0  # the arch is there: the check goes on
    assert check_env.arch_problem((8, 9), ["sm_80", "sm_86"]) is None  # same major, older minor
    assert check_env.arch_problem((9, 0), ["sm_80", "compute_80"]) is None  # PTX: JIT at start
    assert "sm_75" in check_env.arch_problem((7, 5), ["sm_80", "sm_90"])


# ---------------------------------------------------------------------- Makefile's PY override
def make_n(*args):
    out = subprocess.run(["make", "-n", *args], cwd=ROOT, capture_output=True, text=True,
                         env={k: v for k, v in os.environ.items()
                              if k not in ("VIRTUAL_ENV", "CONDA_PREFIX", "PY")})
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_makefile_uses_py_or_an_active_env_with_torch(tmp_path):
    assert "\npython envs/check_env.py" in "\n" + make_n("stage0", "PY=python")
    with_torch = tmp_path / "env" / "bin"
    with_torch.mkdir(parents=True)
    (with_torch / "python").write_text("#!/bin/sh\nexit 0\n")  # `import torch` succeeds
    (with_torch / "python").chmod(0o755)
    assert f"{with_torch}/python envs/check_env.py" in make_n(
        "stage0", f"VIRTUAL_ENV={tmp_path / 'env'}")
    without = tmp_path / "bare" / "bin"
    without.mkdir(parents=True)
    (without / "python").write_text("#!/bin/sh\nexit 1\n")  # no torch there
    (without / "python").chmod(0o755)
    assert ".venv/bin/python envs/check_env.py" in make_n(
        "stage0", f"CONDA_PREFIX={tmp_path / 'bare'}")
    gpu_steps = make_n("gpu", "PY=python")
    for step in ["check_env.py --require-cuda", "07_gpu.py",
                 "06_dataloader_tuning.py --device cuda", "06_latency.py --device cuda"]:
        assert step in gpu_steps


# ------------------------------------------------------------------- 07: CUDA or --quick only
@NO_CUDA
@pytest.mark.parametrize("argv, message", [
    ([], "torch sees no CUDA device here"),
    (["--device", "cpu"], "--device cpu runs only with --quick"),
    (["--device", "cuda"], "no CUDA device visible to torch")])
def test_07_refuses_a_machine_without_cuda_in_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        gpu.parse_args(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err
    assert len([line for line in err.splitlines() if "error:" in line]) == 1


def test_07_reads_check_envs_verdict(monkeypatch):
    def failing(argv):
        print("error: cuda:0: this torch build has no kernels for sm_120")
        return 1
    monkeypatch.setattr(gpu.check_env, "main", failing)
    with pytest.raises(SystemExit) as e:
        gpu.environment(torch.device("cpu"))
    assert str(e.value.code) == ("error: envs/check_env.py fails on this machine: error: "
                                 "cuda:0: this torch build has no kernels for sm_120")


# ------------------------------------------- 07: every result on disk, a failing job its row
def quick_argv(tmp_path, *extra):
    return ["--device", "cpu", "--quick", "--out", str(tmp_path / "gpu.md"),
            "--runs-dir", str(tmp_path), *extra]


def fake_measure(fail_source=None, stop_after=None):
    calls = []

    def measure(m, model, batch, source, device, path=None, mem=None, cache=None):
        calls.append(source)
        if stop_after is not None and len(calls) > stop_after:
            raise KeyboardInterrupt  # the run killed here: what was written must stay
        if source == fail_source:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore text")
        return {"samples_per_s": 1000.0 * len(calls), "sparse": True}
    return measure


def test_07_a_failing_job_is_its_row_and_the_run_goes_on(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu, "data", lambda args, device: ({"path": None, "cache": None,
                                                            "on_device": None}, 0.0))
    monkeypatch.setattr(gpu.tp, "train_measure", fake_measure(fail_source="binary"))
    monkeypatch.setattr(gpu, "stage1_loader_lesson", lambda *a: 1 / 0)
    rows = gpu.main(quick_argv(tmp_path))
    text = (tmp_path / "gpu.md").read_text()
    assert len(rows) == len(gpu.jobs_of(gpu.parse_args(quick_argv(tmp_path))))
    assert sum("error" in r for r in rows) == 5  # 4 binary-cache jobs + the Stage 1 lesson
    assert "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB" in text
    assert "ZeroDivisionError: division by zero" in text and "more text" not in text
    assert "in progress" not in text and "| deepfm | fp32 | 1,024 | 1,000 | failed (below) |" \
        in text
    assert len(json.loads((tmp_path / "gpu.json").read_text())["rows"]) == len(rows)


def test_07_writes_each_result_as_it_finishes(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu, "data", lambda args, device: ({"path": None, "cache": None,
                                                            "on_device": None}, 0.0))
    monkeypatch.setattr(gpu.tp, "train_measure", fake_measure(stop_after=2))
    with pytest.raises(KeyboardInterrupt):
        gpu.main(quick_argv(tmp_path))
    text = (tmp_path / "gpu.md").read_text()
    n = len(gpu.jobs_of(gpu.parse_args(quick_argv(tmp_path))))
    assert f"(in progress: 2 of {n} jobs)" in text
    assert "| deepfm | fp32 | 1,024 | 1,000 | 2,000 | pending |" in text
    assert len(json.loads((tmp_path / "gpu.json").read_text())["rows"]) == 2


def test_07_compile_job_code_path_runs_on_the_cpu(tmp_path, monkeypatch):
    """The job as the full run has it, through torch.compile (backend eager: dynamo traces the
    model, no code generation) on a small model, so that it takes seconds, not minutes."""
    monkeypatch.setattr(gpu.tp, "Measure", functools.partial(gpu.tp.Measure, hash_bits=12,
                                                             emb_dim=4))
    monkeypatch.setattr(gpu.tp, "MLP_SIZES", (16,))
    args = gpu.parse_args(quick_argv(tmp_path, "--train-rows", "1024", "--compile-backend",
                                     "eager"))
    args.quick = False  # the full run's job list: the compile job comes last
    job = gpu.jobs_of(args)[-1]
    assert job["compile"] and job["kind"] == "train"
    g = torch.Generator().manual_seed(0)
    n = 8 * args.batch_sizes[0]
    on_device = [torch.randn(n, 13, generator=g), torch.randint(0, 2**12, (n, 26), generator=g),
                 torch.randint(0, 2, (n,), generator=g).float()]
    job["batch"] = 256
    row = gpu.run_job(args, job, torch.device("cpu"), {"path": None, "cache": None,
                                                       "on_device": on_device})
    assert row["samples_per_s"] > 0 and job["compile"] and args.compile_backend == "eager"


# ------------------------------------------------------------------- 07: worker counts, shm
def test_07_workers_from_the_affinity_set_with_a_cap_and_a_line_for_small_shm(tmp_path,
                                                                            monkeypatch):
    monkeypatch.setattr(gpu.os, "sched_getaffinity", lambda pid: set(range(224)))
    monkeypatch.setattr(gpu, "shm_free_bytes", lambda: 2**40)
    args = gpu.parse_args(["--device", "cpu", "--quick", "--workers", "14"])
    assert (args.cpus, args.gen_workers, args.workers, args.shm_note) == (224, 16, 14, None)
    monkeypatch.setattr(gpu.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert gpu.cpus_available() == 4  # a 4-CPU cpuset on a big host: not os.cpu_count()
    monkeypatch.setattr(gpu, "shm_free_bytes", lambda: 64 * 2**20)  # docker's default
    args = gpu.parse_args(["--device", "cpu", "--quick", "--workers", "14",
                           "--batch-sizes", "65536"])
    assert args.workers == 1 and args.shm_note.startswith("note: /dev/shm has 64 MB free")
    assert "14 loader workers x 2 prefetched items of 16.5 MB" in args.shm_note
    assert "\n" not in args.shm_note


# --------------------------------------------------------------- Stage 1 chapter 06 (issue 23)
def test_06_dataloader_tuning_quick_writes_every_table(tiny_npz, tmp_path):
    chapter = load_script("stage1_adult/06_dataloader_tuning.py")
    cfg, out, _, _ = chapter.parse_args(["--quick"])
    assert out.parts[-2:] == ("quick", "stage1_dataloader.md")
    assert cfg.seeds == (0,) and cfg.lr_rule == "sqrt"
    results = chapter.main(["--quick", "--npz", str(tiny_npz[0]), "--runs-dir", str(tmp_path),
                            "--batch-sizes", "64,512", "--out-dir", str(tmp_path)])
    text = (tmp_path / "stage1_dataloader.md").read_text()
    for part in ["## (a) Batch size", "## (b) Input paths", "## (c) DataLoader settings",
                 "Not measured on this machine: part (d) needs `--device cuda`", "Machine: CPU"]:
        assert part in text
    assert [r["lr"] for r in results["batch_sweep"]] == pytest.approx([5e-4, 1e-3 * 2 ** 0.5])
    paths = {r["path"]: r["batches_only"] for r in results["input_paths"]}
    assert paths["batch-sampler"] > paths["dataloader"]  # one index per batch, not per sample
    assert {r["setting"] for r in results["settings"] if "skipped" in r} == {
        "workers 0, pin_memory"}
    assert (tmp_path / "stage1_dataloader.png").stat().st_size > 1000


def test_06_cuda_part_code_path_on_the_cpu(tiny_npz):
    """(d) runs the same code on a CPU: every figure there and positive, the copy a no-op."""
    part = loader_bench.device_part(tiny_npz[0], torch.device("cpu"), (64, 256),
                                    mtml.MTMLConfig(), steps=3)
    assert [r["batch"] for r in part["rows"]] == [64, 256]
    for r in part["rows"]:
        assert r["compute_ms"] > 0 and r["full_step_ms"] > 0 and 0 <= r["copy_share"] < 1
    assert loader_bench.lr_for(1024, 1e-3, 256, "linear") == pytest.approx(4e-3)


@NO_CUDA
@pytest.mark.parametrize("script", ["stage1_adult/06_dataloader_tuning.py",
                                    "stage2_ctr/03_compare_models.py",
                                    "stage3_advanced/06_latency.py"])
def test_device_cuda_on_a_cpu_machine_is_one_line(script, capsys):
    with pytest.raises(SystemExit) as e:
        load_script(script).parse_args(["--device", "cuda"])
    assert e.value.code == 2 and "no CUDA device visible to torch" in capsys.readouterr().err


def test_06_latency_on_cuda_writes_its_own_file(monkeypatch):
    latency = load_script("stage3_advanced/06_latency.py")
    monkeypatch.setattr(latency.common, "device_arg", lambda text: text)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert latency.parse_args(["--device", "cuda"]).out.endswith("results/stage3_latency_cuda.md")
    assert latency.parse_args([]).out.endswith("results/stage3_latency.md")


# ------------------------------------------------------------ 08: sparse vs dense (issue 23)
def test_09_sparse_or_dense_quick(tmp_path):
    chapter = load_script("stage2_ctr/09_sparse_or_dense.py")
    results = chapter.main(["--quick", "--rows", "12000", "--data-dir", str(tmp_path / "data"),
                            "--runs-dir", str(tmp_path / "runs"), "--out-dir", str(tmp_path)])
    on, off = results["fm|on"], results["fm|off"]
    assert len(on["test_auc"]) == len(off["test_auc"]) == 1 and on["test_auc"] != off["test_auc"]
    text = (tmp_path / "stage2_sparse_dense.md").read_text()
    assert "sparse rows + RowSparseAdam" in text and "- fm: sparse - dense test AUC" in text
    runs = {json.loads(p.read_text())["config"]["sparse_emb"]
            for p in (tmp_path / "runs").glob("sparse_dense_*/metrics.json")}
    assert runs == {"on", "off"}


def test_native_windows_is_one_line_at_start_up():
    code = "import sys; sys.platform = 'win32'; sys.path.insert(0, '.'); import common"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip().startswith("error: ML-Playground runs on Linux and in WSL2")
    assert len(out.stderr.strip().splitlines()) == 1
