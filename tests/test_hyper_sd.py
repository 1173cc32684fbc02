"""Hyper-SD: the full-scale launcher under 2 real CPU processes (torchrun, gloo) with kill/resume, and its bad-input
errors. (The fresh-process LoRA round trip and the tiny SDXL run are tested in nbs/50_hyper_sd.ipynb.)"""
import json
from pathlib import Path
import pytest
from safetensors.torch import load_file

from distill_nb.launch import run_launch

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT/"configs"/"hyper_sd"/"tiny.yaml"

def launch(out, home, *sets, nproc=2, cfg=TINY, **env):
    return run_launch("hyper_sd", cfg, out, nproc, list(sets), home=home, **env)

def test_two_processes_kill_and_resume(tmp_path):
    home = tmp_path/"home"
    ref = launch(tmp_path/"ref", home)
    assert ref.returncode == 0, ref.stderr[-3000:]
    s_ref = json.loads((tmp_path/"ref"/"summary.json").read_text())
    assert s_ref["world_size"] == 2 and s_ref["resumed_from"] is None and s_ref["stages"] == [4, 2, 1]
    for k in (4, 2, 1): assert (tmp_path/"ref"/f"lora-k{k}"/"pytorch_lora_weights.safetensors").exists()

    killed = launch(tmp_path/"run", home, DISTILL_NB_CRASH_AT_STEP="12")   # rank 0 dies hard at step 12 (stage k=1)
    assert killed.returncode != 0
    ckpts = sorted(p.name for p in (tmp_path/"run"/"checkpoints").glob("checkpoint-*"))
    assert ckpts == ["checkpoint-00000004", "checkpoint-00000009"], ckpts
    assert not (tmp_path/"run"/"lora.safetensors").exists()

    resumed = launch(tmp_path/"run", home)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    s = json.loads((tmp_path/"run"/"summary.json").read_text())
    assert s["resumed_from"] == 9 and s["world_size"] == 2
    a, b = load_file(tmp_path/"ref"/"lora.safetensors"), load_file(tmp_path/"run"/"lora.safetensors")
    assert a.keys() == b.keys() and len(a) > 0 and all((a[k] == b[k]).all() for k in a)
    assert s["final_loss"] == s_ref["final_loss"]

def test_missing_base_model_and_data(tmp_path):
    r = launch(tmp_path/"x", tmp_path/"home", f"base_model={tmp_path}/sd15", nproc=1)
    assert r.returncode != 0 and "missing model_index.json" in r.stderr and "Place the model" in r.stderr
    r = launch(tmp_path/"x", tmp_path/"home", f"data_root={tmp_path}/nodata", nproc=1)
    assert r.returncode != 0 and "place a LAION-style subset" in r.stderr

def test_bad_segment_count(tmp_path):
    r = launch(tmp_path/"x", tmp_path/"home", "ks=[8,3,1]", nproc=1)
    assert r.returncode != 0 and "do not divide T=1000" in r.stderr
