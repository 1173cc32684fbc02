"""Distiller: the MI-alpha estimator against a plain-loop reference, the shipped configs, and the full-scale launcher
under 2 real CPU processes (torchrun, gloo) on a synthetic GLUE folder: a run killed mid-training resumes to the
bit-identical result of an uninterrupted run."""
import json, math
from pathlib import Path
import pytest, torch
from safetensors.torch import load_file
from distill_nb.launch import run_launch
from distill_nb.distiller import (interpolated_bound, log_loomean, log_loomean_masked, log_loomean_naive, mi_alpha_cap,
                                  GlueDistillConfig, DistillerPipeline, DistillerLoss, write_synthetic_glue, layer_mapping,
                                  e1_mi_alpha, check_labels, compact_vocab)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT/"configs"/"distiller"
TINY = CONFIGS/"tiny.yaml"

def reference_ialpha(S, lb, alpha):
    "Poole et al.'s I_alpha on one batch, written as plain loops (rows: y_i, columns: x_j)."
    n = S.shape[0]; S = S.double(); lb = lb.double()
    def log_m(i, j): return torch.logsumexp(torch.stack([S[i, k] for k in range(n) if k != j]), 0) - math.log(n - 1)
    def log_b(i, j):
        parts = []
        if alpha > 0: parts.append(math.log(alpha) + log_m(i, j))
        if alpha < 1: parts.append(math.log(1 - alpha) + lb[i])
        return torch.logsumexp(torch.stack(parts), 0)
    joint = sum(S[i, i] - log_b(i, j) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    marg = sum(torch.exp(S[i, j] - log_b(i, i)) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    return float(1 + joint - marg)

@pytest.mark.parametrize("alpha", [0.0, 0.01, 0.5, 0.9, 1.0])
def test_ialpha_matches_loop_reference(alpha):
    g = torch.Generator().manual_seed(int(alpha * 100))
    S, lb = torch.randn(7, 7, generator=g, dtype=torch.float64) * 2, torch.randn(7, generator=g, dtype=torch.float64)
    assert abs(float(interpolated_bound(S, lb, alpha)) - reference_ialpha(S, lb, alpha)) < 1e-9

def test_cap_holds_on_random_batches():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        n = int(torch.randint(2, 40, (1,), generator=g)); a = float(torch.rand(1, generator=g)) * 0.99 + 0.01
        S = torch.randn(n, n, generator=g) * float(torch.rand(1, generator=g) * 50); S.diagonal().add_(float(torch.rand(1, generator=g) * 100))
        assert float(interpolated_bound(S, torch.randn(n, generator=g) * 10, a)) <= mi_alpha_cap(n, a) + 1e-3

def test_loo_stable_where_naive_fails():
    S = torch.randn(64, 64); S.diagonal().add_(120.)
    assert torch.allclose(log_loomean(S), log_loomean_masked(S), atol=1e-4)
    assert not torch.isfinite(log_loomean_naive(S)).all()
    assert math.isfinite(float(interpolated_bound(S, None, 1.0)))

def _flipped(S, lb, a):   # the value of I_alpha with the gradient of -I_alpha: a loss with the wrong sign
    e = interpolated_bound(S, lb, a); return 2 * e.detach() - e

def test_e1_checks_catch_sign_flip_and_broken_loo():
    "The same E1 run (seed 0) passes with the right estimator and fails with a sign-flipped loss or the naive leave-one-out."
    lower = "MI=2: every alpha in [MI/2, MI + 3 s.e.]"
    assert e1_mi_alpha(seeds=[0], steps=400, last=50, alphas=(1.0,), mis=(2.0,)).checks[lower]
    assert not e1_mi_alpha(seeds=[0], steps=400, last=50, alphas=(1.0,), mis=(2.0,), bound=_flipped).checks[lower]
    caps = ("every batch estimate <= 1 + log((K-1)/alpha)", "MI=8: alpha=1 mean < log K + 0.1")
    ok = e1_mi_alpha(seeds=[0], steps=600, last=50, alphas=(1.0,), mis=(8.0,))
    bad = e1_mi_alpha(seeds=[0], steps=600, last=50, alphas=(1.0,), mis=(8.0,),
                      bound=lambda S, lb, a: interpolated_bound(S, lb, a, loo=log_loomean_naive))
    assert all(ok.checks[k] for k in caps) and not any(bad.checks[k] for k in caps)

@pytest.mark.parametrize("make, msg", [
    (lambda: DistillerLoss(DistillerPipeline(kd_loss="ce"), 8, 8, 2, 6, num_labels=1), "Use kd_loss='mse'"),
    (lambda: DistillerLoss(DistillerPipeline(intermediate="mse", project=False), 128, 384, 2, 6), "set project=True"),
    (lambda: DistillerPipeline(intermediate="mi_alpha"), "unknown intermediate"),
    (lambda: DistillerPipeline(mapping="skp"), "did you mean 'skip'"),
    (lambda: check_labels(torch.tensor([]), 2), "is empty"),
    (lambda: check_labels(torch.tensor([1, 1, 1]), 2), "one class"),
    (lambda: compact_vocab(torch.tensor([3, 4]), vocab=torch.tensor([3])), "not in `vocab`"),
])
def test_bad_input_is_explained(make, msg):
    with pytest.raises(ValueError) as e: make()
    assert msg in str(e.value)

def test_mappings_cover_layers():
    assert [j for _, j in layer_mapping("skip", 4, 12)] == [0, 3, 6, 9, 12]
    assert [j for _, j in layer_mapping("last", 2, 6)] == [4, 5, 6]

def test_shipped_configs_parse():
    names = sorted(p.name for p in CONFIGS.glob("*.yaml"))
    assert "tiny.yaml" in names and len(names) == 9
    for p in CONFIGS.glob("*.yaml"):
        cfg = GlueDistillConfig.from_yaml(p)
        if cfg.task == "STS-B": assert cfg.pipeline.kd_loss == "mse"
        cfg.pipeline.check(1 if cfg.task == "STS-B" else 2, 312, 768)

def launch(out, home, data, *sets, nproc=2, **env):
    return run_launch("distiller", TINY, out, nproc, [f"data_root={data}", *sets], home=home, **env)

def test_two_processes_kill_and_resume(tmp_path):
    home, data = tmp_path/"home", write_synthetic_glue(tmp_path/"data")
    ref = launch(tmp_path/"ref", home, data)
    assert ref.returncode == 0, ref.stderr[-3000:]
    s_ref = json.loads((tmp_path/"ref"/"summary.json").read_text())
    assert s_ref["world_size"] == 2 and s_ref["resumed_from"] is None and math.isfinite(s_ref["final_loss"])
    assert 0 <= s_ref["student_dev"]["accuracy"] <= 1

    killed = launch(tmp_path/"run", home, data, DISTILL_NB_CRASH_AT_STEP="12")     # rank 0 dies hard at step 12
    assert killed.returncode != 0
    ckpts = sorted(p.name for p in (tmp_path/"run"/"checkpoints").glob("checkpoint-*"))
    assert ckpts == ["checkpoint-00000004", "checkpoint-00000009"], ckpts
    assert not (tmp_path/"run"/"student.safetensors").exists()

    resumed = launch(tmp_path/"run", home, data)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    s = json.loads((tmp_path/"run"/"summary.json").read_text())
    assert s["resumed_from"] == 9 and s["world_size"] == 2
    a, b = load_file(tmp_path/"ref"/"student.safetensors"), load_file(tmp_path/"run"/"student.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert s["final_loss"] == s_ref["final_loss"]

def test_missing_glue_is_explained(tmp_path):
    r = launch(tmp_path/"run", tmp_path/"home", tmp_path/"no-data", nproc=1)
    assert r.returncode != 0 and "place GLUE/SST-2/{train,dev}.tsv under" in r.stderr

def test_ce_kd_on_regression_is_refused(tmp_path):
    data = write_synthetic_glue(tmp_path/"data", "STS-B")
    r = launch(tmp_path/"run", tmp_path/"home", data, "task=STS-B", nproc=1)
    assert r.returncode != 0 and "Use kd_loss='mse'" in r.stderr
