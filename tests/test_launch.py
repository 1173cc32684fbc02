"""The full-scale launcher under 2 real CPU processes (torchrun, gloo): a run killed mid-training resumes to the
bit-identical result of an uninterrupted run; corrupt checkpoints, bad config keys and missing data get clear errors."""
import json
from pathlib import Path
from safetensors.torch import load_file
from distill_nb.launch import run_launch

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT/"configs"/"hinton"/"tiny.yaml"

def launch(out, home, n_procs=2, **env): return run_launch("hinton", TINY, out, n_procs, home=home, **env)

def test_two_processes_kill_and_resume(tmp_path):
    home = tmp_path/"home"
    ref = launch(tmp_path/"ref", home)
    assert ref.returncode == 0, ref.stderr[-3000:]
    s_ref = json.loads((tmp_path/"ref"/"summary.json").read_text())
    assert s_ref["world_size"] == 2 and s_ref["resumed_from"] is None

    killed = launch(tmp_path/"run", home, DISTILL_NB_CRASH_AT_STEP=12)     # rank 0 dies hard at step 12
    assert killed.returncode != 0
    ckpts = sorted(p.name for p in (tmp_path/"run"/"checkpoints").glob("checkpoint-*"))
    assert ckpts == ["checkpoint-00000004", "checkpoint-00000009"], ckpts   # every 5 steps, keep 2
    assert not (tmp_path/"run"/"student.safetensors").exists()

    resumed = launch(tmp_path/"run", home)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    s = json.loads((tmp_path/"run"/"summary.json").read_text())
    assert s["resumed_from"] == 9 and s["world_size"] == 2
    a, b = load_file(tmp_path/"ref"/"student.safetensors"), load_file(tmp_path/"run"/"student.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert s["final_loss"] == s_ref["final_loss"]

def test_corrupt_checkpoint_is_refused(tmp_path):
    home = tmp_path/"home"
    assert launch(tmp_path/"run", home, DISTILL_NB_CRASH_AT_STEP=12).returncode != 0
    f = tmp_path/"run"/"checkpoints"/"checkpoint-00000009"/"model.safetensors"
    f.write_bytes(f.read_bytes()[:100])                                     # truncated mid-file
    r = launch(tmp_path/"run", home)
    assert r.returncode != 0
    assert "checkpoint-00000009 is corrupt" in r.stderr and "resume from checkpoint-00000004" in r.stderr

def test_bad_config_key(tmp_path):
    cfg = tmp_path/"bad.yaml"; cfg.write_text(TINY.read_text() + "lamda: 1\n")
    r = run_launch("hinton", cfg, tmp_path/"o", 1, home=tmp_path/"home")
    assert r.returncode != 0 and "unknown key 'lamda'" in r.stderr and "Valid keys:" in r.stderr

def test_missing_full_scale_data_is_a_clear_error(tmp_path):
    r = run_launch("hinton", ROOT/"configs"/"hinton"/"fashion.yaml", tmp_path/"o", 1, home=tmp_path/"home",
                   DISTILL_NB_FASHION_DIR=tmp_path/"nowhere")
    assert r.returncode != 0 and "DataMissingError: Fashion-MNIST not found" in r.stderr and "make data" in r.stderr
    assert "Traceback" not in r.stderr
