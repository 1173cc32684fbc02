"""The full-scale launcher under 2 real CPU processes (torchrun, gloo): a run killed mid-training resumes to the
bit-identical result of an uninterrupted run (accumulation 2, 2 loader workers per process); 2 processes ×
accumulation 1 and 1 process × accumulation 2 reach the same student; bf16 trains; corrupt checkpoints, bad config
keys, uneven batch splits and missing data get clear errors."""
import json, math, shutil
from pathlib import Path
import pytest, torch
from safetensors.torch import load_file
from distill_nb.launch import run_launch, main, launch_report

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT/"configs"/"hinton"/"tiny.yaml"

def launch(out, home, n_procs=2, sets=(), **env): return run_launch("hinton", TINY, out, n_procs, list(sets), home=home, **env)

ENGINE = ["gradient_accumulation_steps=2", "num_workers=2"]     # global batch 32 = 8 per device × 2 × 2 processes

@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    "A 2-process run (accumulation 2, 2 loader workers per process) whose rank 0 dies hard at step 12; its folder and home."
    d = tmp_path_factory.mktemp("killed")
    r = launch(d/"run", d/"home", sets=ENGINE, DISTILL_NB_CRASH_AT_STEP=12)
    return d/"run", d/"home", r

def test_two_processes_kill_and_resume(tmp_path, killed):
    run, home, r = killed
    assert r.returncode != 0
    ckpts = sorted(p.name for p in (run/"checkpoints").glob("checkpoint-*"))
    assert ckpts == ["checkpoint-00000004", "checkpoint-00000009"], ckpts   # every 5 steps, keep 2
    assert not (run/"student.safetensors").exists()

    ref = launch(tmp_path/"ref", home, sets=ENGINE)
    assert ref.returncode == 0, launch_report(ref)
    s_ref = json.loads((tmp_path/"ref"/"summary.json").read_text())
    assert s_ref["world_size"] == 2 and s_ref["resumed_from"] is None
    assert (s_ref["per_device_batch"], s_ref["gradient_accumulation_steps"]) == (8, 2)

    shutil.copytree(run, tmp_path/"run")                                    # the corrupt-checkpoint test uses the original
    resumed = launch(tmp_path/"run", home, sets=ENGINE)
    assert resumed.returncode == 0, launch_report(resumed)
    s = json.loads((tmp_path/"run"/"summary.json").read_text())
    assert s["resumed_from"] == 9 and s["world_size"] == 2
    a, b = load_file(tmp_path/"ref"/"student.safetensors"), load_file(tmp_path/"run"/"student.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert s["final_loss"] == s_ref["final_loss"]

def weights(out): return load_file(Path(out)/"student.safetensors")

def test_accumulation_matches_processes(tmp_path):
    "Same global batch (32): 2 processes × accumulation 1 and 1 process × accumulation 2 reach the same student."
    home = tmp_path/"home"
    r2 = launch(tmp_path/"p2", home, 2, ["gradient_accumulation_steps=1", "num_workers=0"])
    r1 = launch(tmp_path/"p1", home, 1, ["gradient_accumulation_steps=2", "num_workers=0"])
    assert r2.returncode == 0 and r1.returncode == 0, (r2.stderr[-2000:], r1.stderr[-2000:])
    s2, s1 = (json.loads((tmp_path/p/"summary.json").read_text()) for p in ("p2", "p1"))
    assert (s2["world_size"], s2["per_device_batch"], s1["world_size"], s1["per_device_batch"]) == (2, 16, 1, 16)
    a, b = weights(tmp_path/"p2"), weights(tmp_path/"p1")
    dw = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"max |dw| 2x1 vs 1x2: {dw:.3g}")
    assert dw < 1e-5, dw
    assert math.isclose(s2["final_loss"], s1["final_loss"], rel_tol=1e-5), (s2["final_loss"], s1["final_loss"])

def test_bf16_two_processes(tmp_path):
    "bf16 autocast on CPU, 2 processes: the loss stays finite and the student's weights move from their initial values."
    from distill_nb.core import seed_everything
    from distill_nb.hinton import mlp
    r = launch(tmp_path/"o", tmp_path/"home", 2, ["mixed_precision=bf16"])
    assert r.returncode == 0, launch_report(r)
    s = json.loads((tmp_path/"o"/"summary.json").read_text())
    assert s["mixed_precision"] == "bf16" and s["world_size"] == 2 and math.isfinite(s["final_loss"])
    seed_everything(0); init = mlp([16, 8, 4]).state_dict(); w = weights(tmp_path/"o")     # the launcher's seed and student
    assert w.keys() == init.keys() and all(w[k].dtype == torch.float32 for k in w)
    assert min((w[k] - init[k]).abs().max().item() for k in w) > 1e-3

@pytest.mark.parametrize("sets,want", [
    (["batch_size=31"], "error: batch_size 31 does not split over 1 process(es) × 2 accumulation step(s), it must be a multiple of 2; set batch_size to 30 or 32"),
    (["mixed_precision=fp16"], "error: mixed_precision fp16 needs a GPU (its loss scaling is CUDA's); on CPU set mixed_precision to bf16 or no"),
])
def test_engine_refusals_before_compute(tmp_path, capsys, monkeypatch, sets, want):
    if "fp16" in sets[0] and torch.cuda.is_available(): pytest.skip("fp16 is refused on CPU only")
    monkeypatch.setenv("DISTILL_NB_HOME", str(tmp_path/"home")); monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(SystemExit) as e:
        main(["hinton", "--config", str(TINY), "--out", str(tmp_path/"o"), "--set", "gradient_accumulation_steps=2", *[a for x in sets for a in ("--set", x)]])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(want) and err.count("\n") == 1, err
    assert not (tmp_path/"home"/"cache").exists()                          # no teacher trained

@pytest.mark.parametrize("var,name", [("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")])
def test_sharded_training_is_refused_before_compute(tmp_path, capsys, monkeypatch, var, name):
    "accelerate's FSDP / DeepSpeed switch: one line, exit 2, no teacher trained (the launchers save from the main process only)."
    monkeypatch.setenv("DISTILL_NB_HOME", str(tmp_path/"home")); monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv(var, "true")
    with pytest.raises(SystemExit) as e: main(["hinton", "--config", str(TINY), "--out", str(tmp_path/"o")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(f"error: {name} is not supported by distill_nb's launchers yet") and err.count("\n") == 1, err
    assert not (tmp_path/"home"/"cache").exists() and not (tmp_path/"o"/"checkpoints").exists()

def test_corrupt_checkpoint_is_refused(tmp_path, killed):
    shutil.copytree(killed[0], tmp_path/"run")
    f = tmp_path/"run"/"checkpoints"/"checkpoint-00000009"/"model.safetensors"
    f.write_bytes(f.read_bytes()[:100])                                     # truncated mid-file
    r = launch(tmp_path/"run", killed[1], sets=ENGINE)
    assert r.returncode != 0
    assert "checkpoint-00000009 is corrupt" in r.stderr and "resume from checkpoint-00000004" in r.stderr

def test_bad_config_key(tmp_path):
    cfg = tmp_path/"bad.yaml"; cfg.write_text(TINY.read_text() + "lamda: 1\n")
    r = run_launch("hinton", cfg, tmp_path/"o", 1, home=tmp_path/"home")
    assert r.returncode != 0 and "unknown key 'lamda'" in r.stderr and "Valid keys:" in r.stderr

def test_missing_full_scale_data_is_a_clear_error(tmp_path):
    r = run_launch("hinton", ROOT/"configs"/"hinton"/"fashion.yaml", tmp_path/"o", 1, home=tmp_path/"home",
                   DISTILL_NB_FASHION_DIR=tmp_path/"nowhere")
    assert r.returncode == 2 and r.stderr.startswith("error: Fashion-MNIST not found") and "make data" in r.stderr
    assert "Traceback" not in r.stderr
