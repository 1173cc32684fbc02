"""DistillNearest / DistillWeighted full-scale launcher under 2 real CPU processes (torchrun, gloo), on a generated
image folder: a run killed mid-training resumes to the bit-identical result of an uninterrupted run; clear errors for
missing data, a stale feature cache and a bad config key. Then timm-shaped models without timm (a stub package with
timm's attribute contract, num_features != head_hidden_size): the feature projection is sized from what
`forward_head(pre_logits=True)` returns, and scripts/finetune_sources.py fine-tunes a config's sources from a local
pretrained file into the files the launcher then loads."""
import json, subprocess, sys
from pathlib import Path
import pytest
from safetensors.torch import load_file

from distill_nb.launch import run_launch, launch_report

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT/"configs"/"similar"/"tiny.yaml"

def launch(out, cwd, nproc=2, *sets, **env):
    return run_launch("similar", TINY, out, nproc, list(sets), home=cwd/"home", cwd=cwd, **env)

def test_two_processes_kill_and_resume(tmp_path):
    ref = launch(tmp_path/"ref", tmp_path)                 # the toy target and source folders are generated under tmp_path/runs
    assert ref.returncode == 0, launch_report(ref)
    s_ref = json.loads((tmp_path/"ref"/"summary.json").read_text())
    assert s_ref["world_size"] == 2 and s_ref["resumed_from"] is None and len(s_ref["weights"]) == 2
    assert list((tmp_path/"ref"/"cache").glob("feats-toy_a-*.safetensors"))    # features cached once per source

    killed = launch(tmp_path/"run", tmp_path, DISTILL_NB_CRASH_AT_STEP="12")   # rank 0 dies hard at step 12
    assert killed.returncode != 0
    ckpts = sorted(p.name for p in (tmp_path/"run"/"checkpoints").glob("checkpoint-*"))
    assert ckpts == ["checkpoint-00000004", "checkpoint-00000009"], ckpts   # every 5 steps, keep 2
    assert not (tmp_path/"run"/"student.safetensors").exists()

    resumed = launch(tmp_path/"run", tmp_path)
    assert resumed.returncode == 0, launch_report(resumed)
    s = json.loads((tmp_path/"run"/"summary.json").read_text())
    assert s["resumed_from"] == 9 and s["world_size"] == 2
    a, b = load_file(tmp_path/"ref"/"student.safetensors"), load_file(tmp_path/"run"/"student.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert s["final_loss"] == s_ref["final_loss"] and s["student_test_acc"] == s_ref["student_test_acc"]

def test_missing_data_and_stale_cache(tmp_path):
    r = launch(tmp_path/"run", tmp_path, 1, "toy_data=false", f"data_root={tmp_path/'nothing'}")
    assert r.returncode != 0 and "place the target images under" in r.stderr
    assert launch(tmp_path/"run", tmp_path, 1, "steps=2").returncode == 0
    wide = ("sources=[{name: toy_a, arch: small_cnn_wide, num_classes: 3, train_dir: runs/similar-tiny-data/src_a/train, train_steps: 5},"
            " {name: toy_b, arch: small_cnn, num_classes: 3, train_dir: runs/similar-tiny-data/src_b/train, train_steps: 20}]")
    r = launch(tmp_path/"run", tmp_path, 1, "steps=2", wide)
    # the resume guard refuses the changed sources first (the cached features' own dimension check is its backstop)
    assert r.returncode == 2 and r.stderr.startswith("error: cannot resume") and "sources" in r.stderr, r.stderr[-2000:]

def test_bad_config_key(tmp_path):
    cfg = tmp_path/"bad.yaml"; cfg.write_text(TINY.read_text() + "methd: nearest\n")
    r = subprocess.run([sys.executable, "-m", "distill_nb.launch", "similar", "--config", str(cfg)], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode != 0 and "unknown key 'methd'" in r.stderr and "Did you mean 'method'?" in r.stderr

# --- full scale with timm-shaped models, without timm: a stub package with timm's attribute contract ---------------------
STUB_TIMM = '''
import torch, torch.nn as nn, torch.nn.functional as F
class StubNet(nn.Module):
    "timm's contract, MobileNetV3-shaped: num_features (the body's width, 8) != head_hidden_size (what pre_logits returns, 16)."
    def __init__(self, num_classes=1000):
        super().__init__(); self.num_features, self.head_hidden_size, self.num_classes = 8, 16, num_classes
        self.conv_stem = nn.Conv2d(3, 8, 3, 2, 1); self.bn1 = nn.BatchNorm2d(8); self.conv_head = nn.Linear(8, 16)
        self.classifier = nn.Linear(16, num_classes)
    def forward_features(self, x): return F.relu(self.bn1(self.conv_stem(x)))
    def forward_head(self, x, pre_logits=False):
        f = F.hardswish(self.conv_head(x.mean((2, 3)))); return f if pre_logits else self.classifier(f)
    def get_classifier(self): return self.classifier
    def forward(self, x): return self.forward_head(self.forward_features(x))
def create_model(name, pretrained=False, num_classes=1000, **kw):
    if pretrained: raise RuntimeError("stub timm: pretrained=True would download")
    return StubNet(num_classes)
'''

def stub_timm(tmp_path):
    "Write the stub as a package named `timm` under tmp_path/stub and import it (under another name) here."
    import importlib.util
    d = tmp_path/"stub"/"timm"; d.mkdir(parents=True, exist_ok=True); (d/"__init__.py").write_text(STUB_TIMM)
    spec = importlib.util.spec_from_file_location("stub_timm", d/"__init__.py"); mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod); return mod, str(tmp_path/"stub")

def test_feature_projection_sized_from_pre_logits(tmp_path):
    import torch
    from distill_nb.similar import _distill_term
    from distill_nb.similar_full import _StudentWithProj
    timm, _ = stub_timm(tmp_path)
    net = timm.create_model("mobilenetv3_small_100", num_classes=3); assert net.num_features != net.head_hidden_size
    m = _StudentWithProj(net, [5, 7], size=16)
    assert [p.in_features for p in m.proj] == [net.head_hidden_size] * 2        # what forward_head(pre_logits=True) returns
    logits, f = m(torch.randn(4, 3, 16, 16))
    targets = [torch.randn(4, 5), torch.randn(4, 7)]
    loss = _distill_term(logits, f, targets, torch.tensor([.5, .5]), torch.arange(4), "mixture", "feature", m.proj, 1.0, 1.0)
    loss.backward(); assert logits.shape == (4, 3) and all(p.grad is not None for p in m.proj.parameters())

def _ft_config(tmp_path, data):
    import yaml
    pre = str(tmp_path/"pre"/"stub.safetensors")
    src = lambda n, k: {"name": n, "arch": "resnet18", "pretrained": pre, "train_dir": str(data/f"src_{n}"/"train"),
                        "weights": str(tmp_path/"w"/f"{n}.safetensors"), "num_classes": k}
    cfg = {"data_root": str(data), "target": "toy", "image_size": 16, "n_per_class": 4,
           "sources": [{"name": "generic", "arch": "resnet50", "pretrained": pre, "num_classes": 10}, src("a", 3), src("b", 4)],
           "teacher": "feature", "student": "mobilenetv3_small_100", "steps": 3, "batch_size": 16, "lab_batch": 12,
           "feature_batch": 64, "checkpoint_every": 5, "keep": 1}
    p = tmp_path/"ft.yaml"; p.write_text(yaml.safe_dump(cfg)); return p

def test_finetune_sources_script_then_launcher(tmp_path, capsys):
    "scripts/finetune_sources.py fine-tunes the config's sources from a local pretrained file; the launcher then loads them."
    import os, torch
    from safetensors.torch import save_file
    from distill_nb.core import ConfigError
    from distill_nb.similar_full import make_toy_image_folder, check_source_files, finetune_cli, SimilarFullConfig, TimmSource, _folder_tensors
    timm, stub = stub_timm(tmp_path); data = tmp_path/"data"
    make_toy_image_folder(data, classes=3, n_train=16, n_test=6, size=16, name="toy")
    for i, (n, k) in enumerate((("a", 3), ("b", 4))): make_toy_image_folder(data, classes=k, n_train=10, n_test=4, size=16, seed=i + 1, name=f"src_{n}", shift=0.3 * (i + 1))
    (tmp_path/"pre").mkdir(); save_file(timm.create_model("resnet18", num_classes=10).state_dict(), tmp_path/"pre"/"stub.safetensors")
    cfg_path = _ft_config(tmp_path, data); cfg = SimilarFullConfig.from_yaml(cfg_path)
    with pytest.raises(ConfigError, match=r"sources\[1\]\.weights: .* does not exist; write it with `python scripts/finetune_sources.py"):
        check_source_files(cfg)                                           # what the launcher says before any compute
    bad = tmp_path/"bad.yaml"; bad.write_text(cfg_path.read_text().replace("stub.safetensors", "missing.safetensors"))
    with pytest.raises(SystemExit) as e: finetune_cli(["--config", str(bad)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "sources[1].pretrained: " in err and "does not exist" in err, err

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([stub, os.environ.get("PYTHONPATH", "")]), "DISTILL_NB_PROGRESS": "0"}
    r = subprocess.run([sys.executable, str(ROOT/"scripts"/"finetune_sources.py"), "--config", str(cfg_path), "--set", "steps=4",
                        "--set", "batch_size=8", "--set", "checkpoint_every=2"], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert r.returncode == 0, launch_report(r)
    pre = load_file(tmp_path/"pre"/"stub.safetensors")
    for n, k in (("a", 3), ("b", 4)):
        w = load_file(tmp_path/"w"/f"{n}.safetensors"); info = json.loads((tmp_path/"w"/f"{n}.safetensors.json").read_text())
        assert w["classifier.weight"].shape == (k, 16) and not torch.equal(w["conv_stem.weight"], pre["conv_stem.weight"])
        assert info["steps"] == 4 and 0 <= info["test_acc"] <= 1 and not (tmp_path/"w"/f"{n}.safetensors.finetune").exists()

    run = run_launch("similar", cfg_path, tmp_path/"out", 1, [], home=tmp_path/"home", cwd=tmp_path, PYTHONPATH=env["PYTHONPATH"])
    assert run.returncode == 0, launch_report(run)
    s = json.loads((tmp_path/"out"/"summary.json").read_text())
    assert s["sources"] == ["generic", "a", "b"] and len(s["teacher_test_acc"]) == 3 and 0 <= s["student_test_acc"] <= 1
    # the launcher's cached features of source a are those of the fine-tuned file, recomputed here
    m = timm.create_model("resnet18", num_classes=3); m.load_state_dict(load_file(tmp_path/"w"/"a.safetensors"))
    x = torch.cat([_folder_tensors(data/"toy"/sp, 16)[0] for sp in ("train", "test")]).float() / 255
    with torch.no_grad(): f = TimmSource(m).eval().features(x)
    cached = load_file(next((tmp_path/"out"/"cache").glob("feats-a-*.safetensors")))["feats"]
    assert cached.shape == (len(x), 16) and torch.allclose(cached, f, atol=1e-5)
