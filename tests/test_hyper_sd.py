"""Hyper-SD: the full-scale launcher (TSCD + adversarial term, feedback LoRA, DMD) under 2 real CPU processes (torchrun,
gloo) with kill/resume in the later phases, and its bad-input errors. (The fresh-process LoRA round trip and the tiny SDXL run are tested in nbs/50_hyper_sd.ipynb.)"""
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
    """tiny.yaml: TSCD steps 0-14 (k=4, 2, 1; adversarial weight 0 / 0.3 / 0.6), feedback 15-18, DMD 19-22; checkpoints
    every 4 steps. Rank 0 is killed in the feedback phase (step 18), the resumed run is killed again in the DMD phase
    (step 21), and the second resume must end bit-identical to an uninterrupted run (all LoRAs and the fake score)."""
    home = tmp_path/"home"
    ref = launch(tmp_path/"ref", home)
    assert ref.returncode == 0, ref.stderr[-3000:]
    s_ref = json.loads((tmp_path/"ref"/"summary.json").read_text())
    assert s_ref["world_size"] == 2 and s_ref["resumed_from"] is None and s_ref["stages"] == [4, 2, 1]
    assert s_ref["phases"] == ["tscd-k4", "tscd-k2", "tscd-k1", "feedback", "dmd"]
    for k in ("k4", "k2", "k1", "feedback", "merged", "unified"): assert (tmp_path/"ref"/f"lora-{k}"/"pytorch_lora_weights.safetensors").exists(), k

    killed = launch(tmp_path/"run", home, DISTILL_NB_CRASH_AT_STEP="18")   # rank 0 dies hard in the feedback phase
    assert killed.returncode != 0
    ckpts = sorted(p.name for p in (tmp_path/"run"/"checkpoints").glob("checkpoint-*"))
    assert ckpts == ["checkpoint-00000011", "checkpoint-00000015"], ckpts
    assert not (tmp_path/"run"/"lora.safetensors").exists()

    killed = launch(tmp_path/"run", home, DISTILL_NB_CRASH_AT_STEP="21")   # resumes at 16, dies in the DMD phase
    assert killed.returncode != 0
    ckpts = sorted(p.name for p in (tmp_path/"run"/"checkpoints").glob("checkpoint-*"))
    assert ckpts == ["checkpoint-00000015", "checkpoint-00000019"], ckpts

    resumed = launch(tmp_path/"run", home)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    s = json.loads((tmp_path/"run"/"summary.json").read_text())
    assert s["resumed_from"] == 19 and s["world_size"] == 2
    for f in ("lora.safetensors", "fake.safetensors", "lora-unified/pytorch_lora_weights.safetensors"):
        a, b = load_file(tmp_path/"ref"/f), load_file(tmp_path/"run"/f)
        assert a.keys() == b.keys() and len(a) > 0 and all((a[k] == b[k]).all() for k in a), f
    lora = load_file(tmp_path/"run"/"lora.safetensors")
    for name in ("default", "ema", "feedback", "merged"): assert any(f".{name}." in k for k in lora), name
    assert s["final_loss"] == s_ref["final_loss"] and s["phase_last_loss"] == s_ref["phase_last_loss"]

def test_missing_base_model_and_data(tmp_path):
    r = launch(tmp_path/"x", tmp_path/"home", f"base_model={tmp_path}/sd15", nproc=1)
    assert r.returncode != 0 and "missing model_index.json" in r.stderr and "Place the model" in r.stderr
    r = launch(tmp_path/"x", tmp_path/"home", f"data_root={tmp_path}/nodata", nproc=1)
    assert r.returncode != 0 and "place a LAION-style subset" in r.stderr

def test_bad_segment_count(tmp_path):
    r = launch(tmp_path/"x", tmp_path/"home", "ks=[8,3,1]", nproc=1)
    assert r.returncode != 0 and "do not divide T=1000" in r.stderr

def test_missing_reward_model(tmp_path):
    r = launch(tmp_path/"x", tmp_path/"home", f"reward_model={tmp_path}/aes", nproc=1)
    assert r.returncode != 0 and "missing clip/config.json, head.safetensors, head.json" in r.stderr
    r = launch(tmp_path/"x", tmp_path/"home", "reward_model=\"\"", nproc=1)
    assert r.returncode != 0 and "feedback phase needs reward_model" in r.stderr

def test_shipped_configs_parse():
    from distill_nb.hyper_sd import HyperSDFullConfig, full_phases
    for name in ("sd15", "sdxl", "tiny", "tiny_sdxl"):
        cfg = HyperSDFullConfig.from_yaml(ROOT/"configs"/"hyper_sd"/f"{name}.yaml")
        phases = [p[0] for p in full_phases(cfg)]
        assert phases[-2:] == ["feedback", "dmd"] and phases[0].startswith("tscd-k"), (name, phases)
        assert cfg.adv_weights == sorted(cfg.adv_weights) and cfg.adv_weights[-1] > 0, name   # adversarial weight rises across stages
    for name in ("sd15", "sdxl"):
        cfg = HyperSDFullConfig.from_yaml(ROOT/"configs"/"hyper_sd"/f"{name}.yaml")
        assert cfg.ks == [8, 4, 2, 1] and cfg.lr == 1e-6 and cfg.batch_size == 512 and cfg.mixed_precision == "bf16"
