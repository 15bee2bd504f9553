"""Stage 3: the multi-task blocks against their definitions, the focal loss against its formula,
the correlation generator, calibration error, bad flags, and every script's --quick mode end to
end on tiny data (each must write its result table and plot)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, load_script

from common import expected_calibration_error
from stage2_ctr.models import build_model
from stage2_ctr.models.mtl import MMoE, PLE, build_mtl, n_params, width_for_budget
from stage2_ctr.training import make_optimizers, make_step

corr = load_script("stage3_advanced/02_task_correlation.py")
imbalance = load_script("stage3_advanced/04_imbalance.py")


def test_mmoe_gates_sum_to_one_per_task_and_sample():
    torch.manual_seed(0)
    model = MMoE(10, n_tasks=3, n_experts=5, expert=(8,))
    x = torch.randn(7, 10)
    out = model(x)
    assert out.shape == (7, 3)
    assert len(model.gates) == 3
    for gate in model.gates:
        w = gate.weights(x)
        assert w.shape == (7, 5)
        assert (w >= 0).all()
        assert torch.allclose(w.sum(1), torch.ones(7))
    omoe = build_mtl("omoe", 10, 3, width=8, n_experts=5)
    omoe(torch.randn(7, 10))
    assert len(omoe.gates) == 1


def test_mmoe_output_is_the_gate_weighted_sum_of_experts():
    torch.manual_seed(0)
    model = MMoE(6, n_tasks=2, n_experts=3, expert=(4,), tower=())
    x = torch.randn(5, 6)
    out = model(x)
    experts = torch.stack([net(x) for net in model.experts.nets], 1)  # (B, n, d)
    for k in range(2):
        g = torch.softmax(model.gates[k].linear(x), -1)
        mixed = (g.unsqueeze(-1) * experts).sum(1)
        assert torch.allclose(out[:, k], model.towers.nets[k](mixed).squeeze(-1), atol=1e-6)


def test_ple_without_shared_experts_is_separate_per_task_networks():
    torch.manual_seed(0)
    model = PLE(6, n_tasks=2, n_shared=0, n_specific=1, expert=(4,), tower=(3,))
    x = torch.randn(5, 6)
    out = model(x)
    level = model.levels[0]
    for k in range(2):  # a one-expert gate weighs 1: tower_k(expert_k(x))
        expected = model.towers.nets[k](level.specific[k].nets[0](x)).squeeze(-1)
        assert torch.allclose(out[:, k], expected, atol=1e-6)
    out[:, 0].sum().backward()  # task 0's output never touches task 1's parameters
    for p in list(level.specific[1].parameters()) + list(model.towers.nets[1].parameters()):
        assert p.grad is None or torch.count_nonzero(p.grad) == 0
    assert any(p.grad is not None and torch.count_nonzero(p.grad) > 0
               for p in level.specific[0].parameters())


def test_stacked_ple_runs_and_shared_gate_sees_every_expert():
    model = PLE(6, n_tasks=2, n_shared=2, n_specific=3, expert=(4,), n_levels=2)
    assert model(torch.randn(5, 6)).shape == (5, 2)
    assert model.levels[0].shared_gate.linear.out_features == 2 * 3 + 2
    assert model.levels[1].shared_gate is None  # the last level has no shared output


def test_width_for_budget_is_the_largest_width_that_fits():
    budget = n_params(build_mtl("shared_bottom", 50, 2, width=64, depth=2))
    w = width_for_budget("mmoe", 50, 2, budget, n_experts=4, depth=2)
    assert n_params(build_mtl("mmoe", 50, 2, width=w, n_experts=4, depth=2)) <= budget
    assert n_params(build_mtl("mmoe", 50, 2, width=w + 1, n_experts=4, depth=2)) > budget


def test_focal_loss_gamma_zero_is_bce_and_alpha_matches_the_formula():
    torch.manual_seed(0)
    z, y = torch.randn(50) * 3, (torch.rand(50) < 0.3).float()
    bce = F.binary_cross_entropy_with_logits(z, y, reduction="none")
    assert torch.allclose(imbalance.focal_loss(z, y, gamma=0.0), bce)
    p = torch.sigmoid(z.double())
    p_t = torch.where(y == 1, p, 1 - p)
    alpha_t = torch.where(y == 1, 0.25, 0.75)
    expected = -alpha_t * (1 - p_t) ** 2 * torch.log(p_t)
    assert torch.allclose(imbalance.focal_loss(z, y, 2.0, 0.25).double(), expected, atol=1e-5)
    assert (imbalance.focal_loss(z, y, 2.0) <= bce + 1e-7).all()  # down-weights, never up


@pytest.mark.parametrize("p", [-0.3, 0.0, 0.5, 0.9, 1.0])
def test_task_weights_reach_the_requested_cosine(p):
    w1, w2 = corr.task_weights(p, 100, 2.0, np.random.default_rng(1))
    cos = w1 @ w2 / np.linalg.norm(w1) / np.linalg.norm(w2)
    assert cos == pytest.approx(p, abs=1e-9)
    assert np.linalg.norm(w1) == pytest.approx(2.0) and np.linalg.norm(w2) == pytest.approx(2.0)


def test_correlation_data_same_inputs_for_every_p_and_identical_tasks_at_one():
    args = corr.parse_args(["--quick"])
    x_a, y_a = corr.make_tasks(0.5, args, 0, 300, 0)
    x_b, y_b = corr.make_tasks(1.0, args, 0, 300, 0)
    assert torch.equal(x_a, x_b)
    assert torch.allclose(y_b[:, 0], y_b[:, 1], atol=0.1)  # only the label noise differs
    assert torch.equal(y_a[:, 0], y_b[:, 0])  # task 1 does not depend on p


def test_expected_calibration_error():
    rng = np.random.default_rng(0)
    p = rng.uniform(0, 1, 200_000)
    y = (rng.uniform(0, 1, len(p)) < p).astype(float)
    assert expected_calibration_error(y, p) < 0.01
    y = (rng.uniform(0, 1, len(p)) < 0.1).astype(float)
    assert expected_calibration_error(y, np.full(len(p), 0.3)) == pytest.approx(0.2, abs=0.01)


@pytest.mark.parametrize("script, argv", [
    ("02_task_correlation.py", ["--corrs", "1.5"]),
    ("04_imbalance.py", ["--gammas", "-1"]),
    ("04_imbalance.py", ["--alpha", "1.5"]),
    ("03_mtl_ctr.py", ["--experts", "0"]),
    ("01_mtl_adult.py", ["--experts", "0"]),
    ("06_latency.py", ["--calls", "50"]),
])
def test_out_of_range_flags_are_argparse_errors(script, argv, capsys):
    module = load_script(f"stage3_advanced/{script}")
    with pytest.raises(SystemExit) as e:
        module.parse_args(argv)
    assert e.value.code == 2
    assert "error" in capsys.readouterr().err


def test_missing_stage1_npz_names_the_script_to_run(tmp_path):
    module = load_script("stage3_advanced/01_mtl_adult.py")
    with pytest.raises(SystemExit) as e:
        module.main(["--quick", "--npz", str(tmp_path / "nope.npz")])
    assert "stage1_adult/02_preprocess.py" in str(e.value.code)


def test_missing_ctr_data_names_the_command_to_run(tmp_path):
    module = load_script("stage3_advanced/03_mtl_ctr.py")
    with pytest.raises(SystemExit) as e:
        module.main(["--quick", "--data-root", str(tmp_path)])
    assert "stage2_ctr/01_make_subset.py --synthetic" in str(e.value.code)


def test_micro_batched_step_makes_the_one_pass_update():
    """training.make_step's gradient accumulation (used by 05 for large batches): slices of 64
    rows, one optimizer step, the same parameters as one pass over the 256 rows (FM: no
    BatchNorm, whose statistics would differ)."""
    g = torch.Generator().manual_seed(0)
    dense = torch.randn(256, 13, generator=g)
    sparse = torch.randint(0, 64, (256, 26), generator=g)  # ids repeat across the slices
    label = torch.randint(0, 2, (256,), generator=g).float()
    params = []
    for micro in (0, 64):
        torch.manual_seed(0)
        model = build_model("fm", 64, emb_dim=4, sparse=True)
        initial = [t.detach().clone() for t in model.parameters()]
        step = make_step(model, make_optimizers(model, 1e-3), micro)
        for _ in range(2):
            step(dense, sparse, label)
        params.append([t.detach().clone() for t in model.parameters()])
        assert all(not torch.equal(a, b) for a, b in zip(initial, params[-1]))  # all moved
    for one, sliced in zip(*params):
        torch.testing.assert_close(sliced, one, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ every --quick end to end
@pytest.mark.parametrize("script, extra", [
    ("01_mtl_adult.py", "npz"),
    ("02_task_correlation.py", None),
    ("03_mtl_ctr.py", "data"),
    ("04_imbalance.py", "npz+data"),
    ("05_throughput.py", "data"),
    ("06_latency.py", None),
])
def test_quick_mode_writes_its_results(script, extra, tiny_npz, tmp_path):
    module = load_script(f"stage3_advanced/{script}")
    out = tmp_path / "results" / (script[:-3] + ".md")
    argv = ["--quick", "--out", str(out), "--runs-dir", str(tmp_path / "runs")]
    if extra and "npz" in extra:
        argv += ["--npz", str(tiny_npz[0])]
    if extra and "data" in extra:
        argv += ["--data-root", str(tmp_path / "data")]
        argv += ["--make-data"] if script != "05_throughput.py" else []
    module.main(argv)
    assert out.exists() and out.stat().st_size > 200
    assert out.with_suffix(".png").exists()
    assert "Command:" in out.read_text()
    if script == "05_throughput.py":  # the binary cache is a source of its own
        assert "binary / memory" in out.read_text()
    assert not list(out.parent.glob("*.tmp"))  # atomic writes leave no temp files


@pytest.mark.parametrize("script", ["01_mtl_adult.py", "02_task_correlation.py",
                                    "03_mtl_ctr.py", "04_imbalance.py", "05_throughput.py",
                                    "06_latency.py"])
def test_quick_runs_never_overwrite_the_committed_tables(script):
    module = load_script(f"stage3_advanced/{script}")
    full, quick = module.parse_args([]).out, module.parse_args(["--quick"]).out
    assert full.startswith(str(ROOT / "results"))
    assert quick.startswith(str(ROOT / "runs" / "quick"))
