"""Distiller: the MI-alpha estimator against a plain-loop reference, the shipped configs, the GLUE path's pieces (token
type ids reach teacher and student, official dev metrics against scipy/sklearn, per-example critic normalisation and its
estimate at initialisation at full-scale widths, one critic per emd pair, no critic without an intermediate term), and
the full-scale launcher under 2 real CPU processes (torchrun, gloo) on a synthetic GLUE folder: the teacher is
fine-tuned as a distributed phase and dev-checked, the student is evaluated every epoch, and a run killed mid-training
resumes to the bit-identical result (weights, dev history, dev-selected checkpoint) of an uninterrupted run."""
import json, math
from pathlib import Path
import numpy as np, pytest, torch
from safetensors.torch import load_file
from distill_nb.launch import run_launch, launch_report
from distill_nb.distiller import (interpolated_bound, log_loomean, log_loomean_masked, log_loomean_naive, mi_alpha_cap,
                                  DistillerPipeline, DistillerLoss, layer_mapping, e1_mi_alpha, check_labels, compact_vocab,
                                  MIAlphaLoss, TransformerCritic, encode)
from distill_nb.distiller_full import (GlueDistillConfig, write_synthetic_glue, glue_metrics, glue_score, check_teacher, glue_data,
                                       glue_predict, _StudentWithLoss, _teacher_targets)

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
    "The same E1 run (seed 0) passes its guards with the right estimator and fails them with a sign-flipped loss or the naive leave-one-out."
    lower, cap = "MI=2: every alpha in [MI/2, MI + 3 s.e.]", "every batch estimate <= 1 + log((K-1)/alpha)"
    kw = dict(seeds=[0], pilot_seeds=[], last=50, alphas=(1.0,))
    assert e1_mi_alpha(steps=400, mis=(2.0,), **kw).checks[lower].passed
    flipped = e1_mi_alpha(steps=400, mis=(2.0,), bound=_flipped, **kw)
    assert not flipped.checks[lower].passed and flipped.verdict == "failed guard"
    ok = e1_mi_alpha(steps=600, mis=(8.0,), **kw)
    bad = e1_mi_alpha(steps=600, mis=(8.0,), bound=lambda S, lb, a: interpolated_bound(S, lb, a, loo=log_loomean_naive), **kw)
    assert ok.checks[cap].passed and not bad.checks[cap].passed and bad.verdict == "failed guard"

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
    paths = [p for p in CONFIGS.glob("*.yaml") if p.name != "protocol.yaml"]   # the quick experiments' protocols, not a launcher config
    names = sorted(p.name for p in paths)
    assert "tiny.yaml" in names and len(names) == 9
    for p in paths:
        cfg = GlueDistillConfig.from_yaml(p)
        if cfg.task == "STS-B": assert cfg.pipeline.kd_loss == "mse"
        cfg.pipeline.check(1 if cfg.task == "STS-B" else 2, 312, 768)
        assert cfg.mixed_precision in ("no", "bf16"), (p.name, cfg.mixed_precision)   # fp16 is refused on CPU
        if p.name.startswith("glue_"):
            assert cfg.mixed_precision == "bf16" and cfg.batch_size % (4 * cfg.gradient_accumulation_steps) == 0   # 4 GPUs

def launch(out, home, data, *sets, nproc=2, **env):
    return run_launch("distiller", TINY, out, nproc, [f"data_root={data}", *sets], home=home, **env)

def test_two_processes_kill_and_resume(tmp_path):
    home, data = tmp_path/"home", write_synthetic_glue(tmp_path/"data")
    ref = launch(tmp_path/"ref", home, data)
    assert ref.returncode == 0, launch_report(ref)
    s_ref = json.loads((tmp_path/"ref"/"summary.json").read_text())
    assert s_ref["world_size"] == 2 and s_ref["resumed_from"] is None and math.isfinite(s_ref["final_loss"])
    assert s_ref["teacher_check"].startswith("passed"), s_ref["teacher_check"]              # fine-tuned on 2 processes
    assert (tmp_path/"ref"/"teacher"/"checkpoints").is_dir()
    assert [h["step"] for h in s_ref["dev_history"]] == [7, 15, 19]                        # every epoch (8 steps) and the last
    sel = s_ref["student_dev_selected"]
    assert sel["label"].startswith("dev-selected") and sel["score"] == max(h["score"] for h in s_ref["dev_history"])
    assert (tmp_path/"ref"/"best_student.safetensors").exists() and 0 <= s_ref["student_dev_last"]["accuracy"] <= 1

    killed = launch(tmp_path/"run", home, data, DISTILL_NB_CRASH_AT_STEP="12")     # rank 0 dies hard at step 12
    assert killed.returncode != 0
    ckpts = sorted(p.name for p in (tmp_path/"run"/"checkpoints").glob("checkpoint-*"))
    assert ckpts == ["checkpoint-00000004", "checkpoint-00000009"], ckpts
    assert not (tmp_path/"run"/"student.safetensors").exists()

    resumed = launch(tmp_path/"run", home, data)
    assert resumed.returncode == 0, launch_report(resumed)
    s = json.loads((tmp_path/"run"/"summary.json").read_text())
    assert s["resumed_from"] == 9 and s["world_size"] == 2
    a, b = load_file(tmp_path/"ref"/"student.safetensors"), load_file(tmp_path/"run"/"student.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert s["final_loss"] == s_ref["final_loss"] and s["dev_history"] == s_ref["dev_history"]
    a, b = load_file(tmp_path/"ref"/"best_student.safetensors"), load_file(tmp_path/"run"/"best_student.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)

def test_inter_weight_zero_two_processes_bf16(tmp_path):
    "inter_weight 0 (an axis of the official grid) builds no critic, so DDP has no unused parameters; bf16 autocast on CPU."
    data = write_synthetic_glue(tmp_path/"data")
    r = launch(tmp_path/"run", tmp_path/"home", data, "pipeline.inter_weight=0", "mixed_precision=bf16", "steps=8",
               "teacher_finetune_steps=0", "teacher_dev_check=false")                # the random teacher as it is: no fine-tuning phase
    assert r.returncode == 0, launch_report(r)
    s = json.loads((tmp_path/"run"/"summary.json").read_text())
    assert s["world_size"] == 2 and s["mixed_precision"] == "bf16" and math.isfinite(s["final_loss"])
    assert s["teacher_check"].startswith("not checked") and [h["step"] for h in s["dev_history"]] == [7]
    assert not any("crit." in k for k in load_file(tmp_path/"run"/"checkpoints"/"checkpoint-00000007"/"model.safetensors"))

def test_missing_glue_is_explained(tmp_path):
    r = launch(tmp_path/"run", tmp_path/"home", tmp_path/"no-data", nproc=1)
    assert r.returncode != 0 and "place GLUE/SST-2/{train,dev}.tsv under" in r.stderr

def test_ce_kd_on_regression_is_refused(tmp_path):
    data = write_synthetic_glue(tmp_path/"data", "STS-B")
    r = launch(tmp_path/"run", tmp_path/"home", data, "task=STS-B", nproc=1)
    assert r.returncode != 0 and "Use kd_loss='mse'" in r.stderr

# --- the GLUE path's pieces, in-process ---

def test_glue_metrics_match_scipy_sklearn():
    from scipy import stats
    from sklearn.metrics import matthews_corrcoef, f1_score, accuracy_score
    rng = np.random.default_rng(1)
    for _ in range(20):
        p, y = rng.integers(0, 2, 37), rng.integers(0, 2, 37)
        m = glue_metrics("MRPC", p, y)
        assert abs(m["f1"] - f1_score(y, p)) < 1e-12 and abs(m["accuracy"] - accuracy_score(y, p)) < 1e-12
        assert abs(glue_metrics("CoLA", p, y)["mcc"] - matthews_corrcoef(y, p)) < 1e-12
        u, v = rng.integers(0, 5, 29).astype(float), rng.normal(size=29)          # ties in u
        m = glue_metrics("STS-B", u, v)
        assert abs(m["pearson"] - stats.pearsonr(u, v).statistic) < 1e-12
        assert abs(m["spearman"] - stats.spearmanr(u, v).statistic) < 1e-12
    assert glue_metrics("CoLA", np.ones(6), [0, 1] * 3)["mcc"] == matthews_corrcoef([0, 1] * 3, np.ones(6)) == 0
    assert glue_score("STS-B", {"pearson": 0.8, "spearman": 0.6}) == pytest.approx(0.7)
    assert glue_score("MNLI", {"mnli-m": 0.8, "mnli-mm": 0.7}) == 0.8
    with pytest.raises(ValueError, match="fails its dev-set check"):
        check_teacher("MNLI", {"mnli-m": 0.3, "mnli-mm": 0.3}, torch.tensor([0, 1, 2, 2]))

def _tiny_bert(vocab, seed):
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                    intermediate_size=64, max_position_embeddings=64, num_labels=3)).eval()

def _types_seen(model, fn):
    "The token_type_ids that reached `model`'s embeddings while `fn()` ran."
    seen = []
    h = model.bert.embeddings.register_forward_pre_hook(lambda m, a, kw: seen.append(kw.get("token_type_ids")), with_kwargs=True)
    try: fn()
    finally: h.remove()
    return seen

def test_token_types_reach_teacher_and_student(tmp_path):
    "MNLI-style pairs: glue_data's types equal the tokenizer's pair encoding; teacher targets, the student and dev predictions use them."
    from transformers import AutoTokenizer
    from distill_nb.data import minilm_path, load_glue
    from distill_nb.launch import make_accelerator
    tok = AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    root = write_synthetic_glue(tmp_path/"data", "MNLI", n_train=12, n_dev=6)
    cfg = GlueDistillConfig(task="MNLI", data_root=str(root), tokenizer="minilm", max_seq_length=24,
                            pipeline=DistillerPipeline(intermediate="mi", critic="transformer"), critic_heads=2)
    d = glue_data(cfg, tok); ids, am, tt, y, cp = d.train.tensors
    assert set(d.devs) == {"mnli-m", "mnli-mm"} and d.num_labels == 3
    pairs = load_glue("MNLI", "train", root).texts
    ref = tok([a for a, _ in pairs], [b for _, b in pairs], padding="max_length", truncation=True, max_length=24, return_tensors="pt")
    assert torch.equal(ids, ref["input_ids"]) and torch.equal(tt, ref["token_type_ids"]) and tt.max() == 1
    teacher, student = _tiny_bert(tok.vocab_size, 0), _tiny_bert(tok.vocab_size, 1)
    b = (ids, am, tt, y, cp)
    seen = _types_seen(teacher, lambda: _teacher_targets(teacher, b, cfg.pipeline, None))
    assert len(seen) == 1 and torch.equal(seen[0], tt)
    t_logits, t_hidden, _ = _teacher_targets(teacher, b, cfg.pipeline, None)
    assert not torch.allclose(t_logits, teacher(input_ids=ids, attention_mask=am).logits)     # the types change the output
    model = _StudentWithLoss(student, DistillerLoss(cfg.pipeline, 32, 32, 1, 1, 3, mi_heads=2))
    seen = _types_seen(student, lambda: model(ids, am, t_logits, t_hidden, y, types=tt))
    assert len(seen) == 1 and torch.equal(seen[0], tt)
    acc = make_accelerator("no"); dl = torch.utils.data.DataLoader(d.devs["mnli-mm"], 4)
    seen = _types_seen(student, lambda: glue_predict(student, dl, acc))
    assert len(seen) == 2 and torch.equal(torch.cat(seen), d.devs["mnli-mm"].tensors[2])

def test_critic_normalised_per_example_and_bounded_at_init():
    "Full-scale widths (TinyBERT 312 <- BERT-base 768), skip 4 <- 12 (5 pairs): every pair's estimate at init is within the cap."
    torch.manual_seed(0)
    tc = TransformerCritic(312, 768, heads=4).eval()
    hs, ht, m = torch.randn(8, 12, 312), torch.randn(8, 12, 768), torch.ones(8, 12)
    with torch.no_grad(): S, _ = tc(hs, ht, m); S4, _ = tc(hs[:4], ht[:4], m[:4])
    assert S.abs().max() <= 1 + 1e-5                                   # cosines of per-example unit vectors
    assert torch.allclose(S[:4, :4], S4, atol=1e-5)                    # an example's score does not depend on the rest of the batch
    crit = DistillerLoss(DistillerPipeline(intermediate="mi", mapping="skip", critic="transformer"), 312, 768, 4, 12, mi_heads=4)
    N = 16; cap = mi_alpha_cap(N, 0.9); est = []
    for i, j in crit.pairs:
        h_s, h_t = torch.randn(N, 12, 312) * 3, torch.randn(N, 12, 768) * 3
        with torch.no_grad(): est.append(float(crit.mi.estimate(h_s, h_t, torch.ones(N, 12))))
    print(f"MI-alpha estimate at init per pair (cap {cap:.2f}):", [round(e, 3) for e in est])
    assert len(est) == 5 and all(abs(e) < cap for e in est), est

def test_emd_has_one_critic_per_pair_and_unused_terms_build_nothing():
    pipe = DistillerPipeline(intermediate="mi", mapping="emd", critic="mlp")
    crit = DistillerLoss(pipe, 8, 12, 2, 3, mi_hidden=16, mi_out=8)
    assert crit.mi is None and len(crit.mi_pairs) == 3 * 4 == len(crit.pairs)
    assert len({id(m) for m in crit.mi_pairs.values()}) == 12
    s_hid = [torch.randn(6, 8, requires_grad=True) for _ in range(3)]; t_hid = [torch.randn(6, 12) for _ in range(4)]
    tot, _ = crit(torch.randn(6, 2), torch.randn(6, 2), s_hid, t_hid); tot.backward()
    assert all(p.grad is not None for m in crit.mi_pairs.values() for p in m.critic.parameters())   # each pair trains its own
    for inter in ("mi", "mse", "cos", "pkd"):
        c = DistillerLoss(DistillerPipeline(intermediate=inter, inter_weight=0.0), 8, 12, 2, 6)
        assert not c.uses_hidden and sum(p.numel() for p in c.parameters()) == 0, inter
