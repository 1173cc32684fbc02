"""DistillNearest / DistillWeighted at full scale with the real timm (skipped where timm cannot be imported: on the CPU
torch of `make setup` it is absent, RECIPE path A). Run it on RECIPE's path B (torch 2.14.1 + torchvision 0.29.1 +
timm): `pip install torch==2.14.1 torchvision==0.29.1 timm -e ".[dev]"`, then `pytest tests/test_similar_timm.py`.

It runs what the stub-timm tests of test_similar.py emulate, on timm's own models: scripts/finetune_sources.py
fine-tunes two ResNet-18 sources from a local ImageNet-layout file; the launcher then loads them beside a ResNet-50
generic source and distils a MobileNetV3-Small student (teacher: feature, whose `pre_logits` width 1024 differs from
`num_features` 576) under 2 processes, and the features it cached are those of the fine-tuned files."""
import json, os, subprocess, sys
from pathlib import Path
import pytest
from distill_nb.launch import launch_report

try: import timm                                  # a torchvision that does not load raises RuntimeError, not ImportError
except (ImportError, RuntimeError): timm = None
pytestmark = pytest.mark.skipif(timm is None, reason="timm is not importable here (RECIPE path A); run on path B")

ROOT = Path(__file__).resolve().parents[1]
SIZE = 32

def _config(tmp_path, data):
    import yaml
    pre = str(tmp_path/"pre"/"resnet18.safetensors")
    src = lambda n, k: {"name": n, "arch": "resnet18", "pretrained": pre, "train_dir": str(data/f"src_{n}"/"train"),
                        "weights": str(tmp_path/"w"/f"{n}.safetensors"), "num_classes": k}
    cfg = {"data_root": str(data), "target": "toy", "image_size": SIZE, "n_per_class": 4,
           "sources": [{"name": "generic", "arch": "resnet50", "pretrained": str(tmp_path/"pre"/"resnet50.safetensors"), "num_classes": 1000},
                       src("a", 3), src("b", 4)],
           "teacher": "feature", "student": "mobilenetv3_small_100", "steps": 4, "batch_size": 16, "lab_batch": 12,
           "feature_batch": 32, "checkpoint_every": 2, "keep": 1}
    p = tmp_path/"timm.yaml"; p.write_text(yaml.safe_dump(cfg)); return p

def test_real_timm_sources_and_student(tmp_path):
    import torch
    from safetensors.torch import save_file, load_file
    from distill_nb.launch import run_launch
    from distill_nb.similar_full import make_toy_image_folder, TimmSource, _folder_tensors, pre_logits_dim
    student = timm.create_model("mobilenetv3_small_100", pretrained=False, num_classes=3)
    assert student.num_features != pre_logits_dim(student, SIZE) == student.head_hidden_size   # the width the projection needs
    data = tmp_path/"data"; make_toy_image_folder(data, classes=3, n_train=16, n_test=6, size=SIZE, name="toy")
    for i, (n, k) in enumerate((("a", 3), ("b", 4))):
        make_toy_image_folder(data, classes=k, n_train=10, n_test=4, size=SIZE, seed=i + 1, name=f"src_{n}", shift=0.3 * (i + 1))
    (tmp_path/"pre").mkdir()
    for arch in ("resnet18", "resnet50"):                    # "ImageNet" files in timm's layout (random weights: nothing downloads)
        torch.manual_seed(0); save_file(timm.create_model(arch, pretrained=False).state_dict(), tmp_path/"pre"/f"{arch}.safetensors")
    cfg = _config(tmp_path, data); env = {**os.environ, "DISTILL_NB_PROGRESS": "0"}
    r = subprocess.run([sys.executable, str(ROOT/"scripts"/"finetune_sources.py"), "--config", str(cfg), "--set", "steps=3",
                        "--set", "batch_size=8", "--set", "checkpoint_every=2"], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert r.returncode == 0, launch_report(r)
    pre = load_file(tmp_path/"pre"/"resnet18.safetensors")
    for n, k in (("a", 3), ("b", 4)):
        w = load_file(tmp_path/"w"/f"{n}.safetensors")
        assert w["fc.weight"].shape == (k, 512) and not torch.equal(w["conv1.weight"], pre["conv1.weight"])

    run = run_launch("similar", cfg, tmp_path/"out", 2, [], home=tmp_path/"home", cwd=tmp_path)
    assert run.returncode == 0, launch_report(run)
    s = json.loads((tmp_path/"out"/"summary.json").read_text())
    assert s["sources"] == ["generic", "a", "b"] and len(s["teacher_test_acc"]) == 3 and 0 <= s["student_test_acc"] <= 1
    st = load_file(tmp_path/"out"/"student.safetensors")               # timm's own layout: it loads into timm's model
    timm.create_model("mobilenetv3_small_100", num_classes=3).load_state_dict(st); assert st["classifier.weight"].shape == (3, 1024)
    ck = load_file(sorted((tmp_path/"out"/"checkpoints").glob("*/model.safetensors"))[-1])
    assert [ck[f"student/proj.{i}.weight"].shape for i in range(3)] == [(2048, 1024), (512, 1024), (512, 1024)]  # source width x pre_logits
    m = timm.create_model("resnet18", num_classes=3); m.load_state_dict(load_file(tmp_path/"w"/"a.safetensors"))
    x = torch.cat([_folder_tensors(data/"toy"/sp, SIZE)[0] for sp in ("train", "test")]).float() / 255
    with torch.no_grad(): f = TimmSource(m).eval().features(x)
    cached = load_file(next((tmp_path/"out"/"cache").glob("feats-a-*.safetensors")))["feats"]
    assert cached.shape == (len(x), 512) and torch.allclose(cached, f, atol=1e-5)
