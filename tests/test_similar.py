"""DistillNearest / DistillWeighted full-scale launcher under 2 real CPU processes (torchrun, gloo), on a generated
image folder: a run killed mid-training resumes to the bit-identical result of an uninterrupted run; clear errors for
missing data, a stale feature cache and a bad config key."""
import json, subprocess, sys
from pathlib import Path
import pytest
from safetensors.torch import load_file

from distill_nb.launch import run_launch

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT/"configs"/"similar"/"tiny.yaml"

def launch(out, cwd, nproc=2, *sets, **env):
    return run_launch("similar", TINY, out, nproc, list(sets), home=cwd/"home", cwd=cwd, **env)

def test_two_processes_kill_and_resume(tmp_path):
    ref = launch(tmp_path/"ref", tmp_path)                 # the toy target and source folders are generated under tmp_path/runs
    assert ref.returncode == 0, ref.stderr[-3000:]
    s_ref = json.loads((tmp_path/"ref"/"summary.json").read_text())
    assert s_ref["world_size"] == 2 and s_ref["resumed_from"] is None and len(s_ref["weights"]) == 2
    assert list((tmp_path/"ref"/"cache").glob("feats-toy_a-*.safetensors"))    # features cached once per source

    killed = launch(tmp_path/"run", tmp_path, DISTILL_NB_CRASH_AT_STEP="12")   # rank 0 dies hard at step 12
    assert killed.returncode != 0
    ckpts = sorted(p.name for p in (tmp_path/"run"/"checkpoints").glob("checkpoint-*"))
    assert ckpts == ["checkpoint-00000004", "checkpoint-00000009"], ckpts   # every 5 steps, keep 2
    assert not (tmp_path/"run"/"student.safetensors").exists()

    resumed = launch(tmp_path/"run", tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
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
