"""DisWOT full-scale launcher under 2 real CPU processes (torchrun, gloo): runs killed in the teacher training, in the
search and in the KD training resume (teacher checkpoints, population state, KD checkpoints) to the bit-identical result
of an uninterrupted run, for the CIFAR-style tiny config and the ImageNet-style one (generated image folder, ResNet
teacher file in the torchvision layout, decoded by DataLoader workers); the NAS-Bench-201 file read by rank 0 alone and
broadcast (2 processes); plus the placement errors, the R-EA search-quality property and the metric unit tests."""
import json
from pathlib import Path
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from distill_nb.launch import run_launch, launch_report

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT/"configs"/"diswot"/"tiny.yaml"
IN_TINY = ROOT/"configs"/"diswot"/"imagenet_tiny.yaml"
IN_TEACHER = [[1, 8, 3], [1, 8, 3], [1, 16, 3], [1, 16, 3]]   # imagenet_tiny.yaml's teacher_stages

def launch(out, home, *sets, nproc=2, config=TINY, **env):
    return run_launch("diswot", config, out, nproc, list(sets), home=home, **env)

def same_tensors(fa, fb):
    a, b = load_file(fa), load_file(fb)
    return a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)

def test_two_processes_kill_in_teacher_search_and_training_then_resume(tmp_path):
    ref = launch(tmp_path/"ref", tmp_path/"home_ref")
    assert ref.returncode == 0, launch_report(ref)
    s_ref = json.loads((tmp_path/"ref"/"summary.json").read_text())
    assert s_ref["world_size"] == 2 and s_ref["resumed_from"] is None and s_ref["search_resumed_from"] is None
    assert json.loads((tmp_path/"ref"/"teacher"/"summary.json").read_text())["resumed_from"] is None

    run, home = tmp_path/"run", tmp_path/"home_run"                       # its own cache: the teacher is trained again
    k0 = launch(run, home, DISTILL_NB_CRASH_AT_TEACHER_STEP="5")          # rank 0 dies in the teacher training (8 steps)
    assert k0.returncode != 0
    assert sorted(p.name for p in (run/"teacher"/"checkpoints").glob("checkpoint-*")) == ["checkpoint-00000001", "checkpoint-00000003"]
    assert not (run/"search_state.json").exists() and not list((home/"cache"/"models").glob("diswot-full-teacher-*"))

    k1 = launch(run, home, DISTILL_NB_CRASH_AT_EVAL="5")                  # teacher resumes; rank 0 dies in the search
    assert k1.returncode != 0
    t = json.loads((run/"teacher"/"summary.json").read_text())
    assert t["resumed_from"] == 3 and t["final_loss"] == json.loads((tmp_path/"ref"/"teacher"/"summary.json").read_text())["final_loss"]
    (tr,), (tf,) = (list((h/"cache"/"models").glob("diswot-full-teacher-*")) for h in (tmp_path/"home_ref", home))
    assert tr.name == tf.name and same_tensors(tr, tf)                    # the resumed teacher is bit-identical
    st = json.loads((run/"search_state.json").read_text())
    assert len(st["history"]) == 4 and not st["done"]                     # saved every 2 evaluations
    assert not (run/"checkpoints").exists()

    k2 = launch(run, home, DISTILL_NB_CRASH_AT_STEP="12")                 # search resumes, then rank 0 dies in KD
    assert k2.returncode != 0
    st = json.loads((run/"search_state.json").read_text())
    assert st["done"] and len(st["history"]) == 10
    assert sorted(p.name for p in (run/"checkpoints").glob("checkpoint-*")) == ["checkpoint-00000004", "checkpoint-00000009"]
    assert not (run/"student.safetensors").exists()

    ok = launch(run, home)
    assert ok.returncode == 0, launch_report(ok)
    s = json.loads((run/"summary.json").read_text())
    assert s["resumed_from"] == 9 and s["search_resumed_from"] == 10 and s["world_size"] == 2
    assert s["best_arch"] == s_ref["best_arch"] and s["best_score"] == s_ref["best_score"]
    assert st["history"] == json.loads((tmp_path/"ref"/"search_state.json").read_text())["history"]
    assert same_tensors(tmp_path/"ref"/"student.safetensors", run/"student.safetensors")
    assert s["final_loss"] == s_ref["final_loss"]

def make_fake_imagenet(root, n_classes=4, n_train=8, n_val=4, side=40, seed=0):
    "ImageNet-style class folders of small PNGs (class = a mean colour), some not square."
    from PIL import Image
    rng = np.random.default_rng(seed); base = rng.integers(0, 256, (n_classes, 3))
    for split, n in (("train", n_train), ("val", n_val)):
        for c in range(n_classes):
            d = Path(root)/"imagenet"/split/f"n{c:08d}"; d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = np.clip(base[c] + rng.normal(0, 40, (side, side + 8 * (i % 2), 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d/f"img{i}.png")
    return Path(root)

def make_teacher_file(path, stages=IN_TEACHER, n_classes=4, seed=0):
    "A ResNet state dict written in the torchvision layout (conv1/bn1/layerL.B/downsample/fc)."
    from distill_nb.diswot import resnet_like, to_torchvision_keys
    torch.manual_seed(seed); m = resnet_like(stages, 3, n_classes, stem="imagenet")
    sd = to_torchvision_keys(m.state_dict()); assert "layer3.0.downsample.0.weight" in sd
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path)); return path

def test_imagenet_two_processes_kill_in_search_and_training_then_resume(tmp_path):
    data = make_fake_imagenet(tmp_path/"data"); w = make_teacher_file(tmp_path/"r34.safetensors")
    sets = [f"data_root={data}", f"teacher_weights={w}"]
    ref = launch(tmp_path/"ref", tmp_path/"home", *sets, config=IN_TINY)
    assert ref.returncode == 0, launch_report(ref)
    s_ref = json.loads((tmp_path/"ref"/"summary.json").read_text())
    assert s_ref["world_size"] == 2 and s_ref["search_evaluations"] == 10 and s_ref["best_score"] < 0
    from distill_nb.diswot import imagenet_space
    imagenet_space([[1, 2], [1], [1], [1]], [[8], [8, 16], [16], [16]], [[3], [3], [3, 5], [3]], 4).validate(s_ref["best_arch"])

    run = tmp_path/"run"
    k1 = launch(run, tmp_path/"home", *sets, config=IN_TINY, DISTILL_NB_CRASH_AT_EVAL="5")
    assert k1.returncode != 0 and len(json.loads((run/"search_state.json").read_text())["history"]) == 4
    k2 = launch(run, tmp_path/"home", *sets, config=IN_TINY, DISTILL_NB_CRASH_AT_STEP="12")   # 16 KD steps
    assert k2.returncode != 0
    assert sorted(p.name for p in (run/"checkpoints").glob("checkpoint-*")) == ["checkpoint-00000004", "checkpoint-00000009"]
    ok = launch(run, tmp_path/"home", *sets, config=IN_TINY)
    assert ok.returncode == 0, launch_report(ok)
    s = json.loads((run/"summary.json").read_text())
    assert s["resumed_from"] == 9 and s["search_resumed_from"] == 10
    assert (s["best_arch"], s["best_score"], s["final_loss"], s["test_acc"]) == (s_ref["best_arch"], s_ref["best_score"], s_ref["final_loss"], s_ref["test_acc"])
    assert same_tensors(tmp_path/"ref"/"student.safetensors", run/"student.safetensors")

def test_imagenet_placement_errors(tmp_path):
    data = make_fake_imagenet(tmp_path/"data", n_train=1, n_val=1)
    r = launch(tmp_path/"o", tmp_path/"home", f"data_root={data}", nproc=1, config=IN_TINY)   # no teacher file placed
    assert r.returncode != 0 and "place a ResNet state dict" in r.stderr and str(data/"pretrained"/"resnet34.safetensors") in r.stderr
    w = make_teacher_file(tmp_path/"r.safetensors", n_classes=7)          # the wrong number of classes
    r = launch(tmp_path/"o2", tmp_path/"home", f"data_root={data}", f"teacher_weights={w}", nproc=1, config=IN_TINY)
    assert r.returncode != 0 and "does not fit the model" in r.stderr
    r = launch(tmp_path/"o3", tmp_path/"home", f"data_root={tmp_path/'nowhere'}", f"teacher_weights={w}", nproc=1, config=IN_TINY)
    assert r.returncode != 0 and "place ImageNet" in r.stderr

_OPEN_LOG = """
import os, sys
_watch, _log = os.environ["NB201_WATCH"], os.environ["NB201_OPEN_LOG"]
def _hook(event, args):
    if event == "open" and args and str(args[0]) == _watch:
        with open(_log, "a") as f: f.write(os.environ.get("RANK", "?") + "\\n")
sys.addaudithook(_hook)
"""

def test_nb201_read_once_on_main_and_broadcast(tmp_path):
    "Issue 19: under 2 processes only rank 0 opens the benchmark file (an audit hook logs every open), and both ranks hold the same table."
    from distill_nb.diswot import NB201Space
    from distill_nb.diswot_full import table_digest
    home = tmp_path/"home"
    r = launch(tmp_path/"miss", home, "space=nb201")                                 # the error reaches every rank: no hang
    assert r.returncode != 0 and "place NAS-Bench-201" in r.stderr
    archs = NB201Space().all()                                            # a fake but complete table, documented layout
    acc = {a: (i * 7919 % 10007) / 100. for i, a in enumerate(archs)}
    rc = lambda a: {"epochs": 200, "eval_acc1es": {"x-test@199": a, "x-valid@199": a - 1.}, "net_state_dict": None}
    torch.save({"meta_archs": archs, "arch2infos": {i: {"full": {"all_results": {("cifar100", 777): rc(acc[a])}}}
                                                    for i, a in enumerate(archs)}}, tmp_path/"nb201.pth")
    site = tmp_path/"site"; site.mkdir(); (site/"sitecustomize.py").write_text(_OPEN_LOG)
    log = tmp_path/"opens.log"; bench = tmp_path/"nb201.pth"
    r = launch(tmp_path/"nb", home, "space=nb201", "nb201_C=2", "nb201_N=1", f"nb201_file={bench}", "budget_kind=none",
               PYTHONPATH=str(site), NB201_WATCH=str(bench), NB201_OPEN_LOG=str(log))
    assert r.returncode == 0, launch_report(r)
    assert log.read_text().split() == ["0"]                               # opened once, by rank 0 alone
    s = json.loads((tmp_path/"nb"/"summary.json").read_text())
    assert s["world_size"] == 2 and s["benchmark_accuracy"] == acc[s["best_arch"]]
    assert s["benchmark_digests"] == [table_digest(acc)] * 2              # both ranks got the whole table, identical

def test_cifar100_placement_error(tmp_path):
    r = launch(tmp_path/"c", tmp_path/"home", "dataset=cifar100", nproc=1, DISTILL_NB_FULL_DATA=str(tmp_path/"nodata"))
    assert r.returncode != 0 and "place CIFAR-100" in r.stderr

def test_semantic_width_guard(tmp_path):
    r = launch(tmp_path/"w", tmp_path/"home", "s1_widths=[4, 8, 16]", nproc=1)
    assert r.returncode != 0 and "needs C_S == C_T" in r.stderr

def test_rea_search_quality_and_wrong_way_sort():
    from distill_nb.diswot import search_quality
    assert search_quality("best") >= 4       # parent = best of the sample reaches the known optimum
    assert search_quality("official") < 4    # the repository's ascending sort (parent among the worst) does not

def test_metric_unit_properties():
    "Zero on identical nets, invariance to positive rescaling, closed form = matrices, Grad-CAM = W/HW, channel guard."
    from distill_nb.diswot import (gaussian_init, resnet_like, model_outputs, diswot_metrics, semantic_similarity,
                                   relation_similarity, gradcam_alpha)
    from distill_nb.kd import ickd_semantic
    torch.manual_seed(0); x, y = torch.randn(16, 1, 14, 14), torch.randint(0, 10, (16,))
    t = model_outputs(gaussian_init(resnet_like([(2, 16, 3), (2, 32, 3), (2, 32, 3)])), x, y, alpha=True)
    s = model_outputs(gaussian_init(resnet_like([(1, 8, 3), (1, 16, 3), (1, 32, 3)])), x, y, alpha=True)
    for form in ("code", "paper"):
        same = diswot_metrics(t, t, form); assert abs(same["semantic"]) < 1e-6 and abs(same["relation"]) < 1e-6
        m = diswot_metrics(s, t, form); assert m["semantic"] > 1e-3 and m["relation"] > 1e-3
        scaled = {k: (v * 7.3 if k in ("feat", "grad", "alpha") else v) for k, v in s.items()}
        assert abs(diswot_metrics(scaled, t, form)["score"] - m["score"]) < 1e-5
    assert abs(float(ickd_semantic(s["grad"], t["grad"], "closed") - ickd_semantic(s["grad"], t["grad"], "matrix"))) < 1e-6
    A = torch.randn(2, 3, 4, 4, dtype=torch.float64); fc = torch.nn.Linear(3, 5).double(); lab = torch.tensor([1, 4])
    assert torch.allclose(gradcam_alpha(A, lambda a: fc(a.mean((2, 3))), lab), fc.weight[lab].detach() / 16, atol=1e-12)
    narrow = model_outputs(gaussian_init(resnet_like([(1, 8, 3), (1, 16, 3)])), x, y, alpha=True)
    assert relation_similarity(narrow, t) > 0
    with pytest.raises(ValueError, match="needs C_S == C_T"): semantic_similarity(narrow, t)

def test_bad_inputs():
    "An architecture outside the space, a budget nothing meets, no common feature stage: clear errors."
    import random
    from distill_nb.diswot import s1_space, NB201Space, regularized_evolution, conv3_count, count_flops, common_stages
    with pytest.raises(ValueError, match="outside the space"): s1_space().validate("124")
    sp = NB201Space()
    with pytest.raises(ValueError, match="met the budget"):
        regularized_evolution(sp, conv3_count(sp), 10, 4, 2, budget=10, cost=lambda a: count_flops(sp.build(a)), max_tries=20)
    with pytest.raises(ValueError, match="no common feature stage"):
        common_stages({"stages": [torch.zeros(2, 3, 5, 5)]}, {"stages": [torch.zeros(2, 3, 4, 4)]})

@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT/"configs"/"diswot").glob("*.yaml") if p.name != "protocol.yaml"))
def test_shipped_schedules_decay_within_the_run(name):
    """Issue 19: every shipped config's learning rate, teacher and student, is lower at its last step than at its first,
    and so is that of the same config cut to 2 epochs or 1 (the official NB201 schedule never decayed in its 90 epochs)."""
    from distill_nb.diswot_full import DiswotFullConfig, lr_at
    cfg = DiswotFullConfig.from_yaml(ROOT/"configs"/"diswot"/name)
    for sch in ("step", "cosine"):
        for lr, decay, epochs in ((cfg.lr, cfg.lr_decay_at, cfg.epochs), (cfg.teacher_lr, cfg.teacher_lr_decay_at, cfg.teacher_epochs)):
            for ep in (epochs, 2, 1):
                for spe in (391, 4):                              # steps per epoch: CIFAR-100 at batch 128; the tiny configs
                    total = ep * spe
                    assert lr_at(lr, total - 1, total, sch, decay) < lr_at(lr, 0, total, sch, decay) == lr, (name, sch, ep, spe)
