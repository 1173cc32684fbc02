"""DisBack's full-scale launcher under 2 real CPU processes (torchrun, gloo) with the tiny config: a run killed
mid-backtracking resumes at the same path node and ends bit-identical to an uninterrupted run; every path node is
kept; corrupt checkpoints and a missing teacher are refused with clear messages; the saved generator reloads in a
fresh process and gives bitwise-identical one-step samples."""
import json, subprocess, sys
from pathlib import Path
import pytest
import torch
from safetensors.torch import load_file

from distill_nb.launch import run_launch

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT/"configs"/"disback"/"tiny.yaml"

def torchrun(out, home, **env): return run_launch("disback", TINY, out, 2, home=home, **env)

@pytest.fixture(scope="module")
def ref_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("ref")
    r = torchrun(d/"run", d/"home")
    assert r.returncode == 0, r.stderr[-3000:]
    return d/"run"

def launch1(out, home):
    "One process (no torchrun): enough for the checks that fail before training."
    return run_launch("disback", TINY, out, 1, home=home)

def test_two_processes_kill_and_resume_same_node(ref_run, tmp_path):
    import shutil
    s_ref = json.loads((ref_run/"summary.json").read_text())
    assert s_ref["world_size"] == 2 and s_ref["resumed_from"] is None and s_ref["path_nodes"] == 3
    assert s_ref["targets"] == [1] * 8 + [0] * 4                 # N-1 = 1 for K = 8 iterations, then the teacher
    killed = torchrun(tmp_path/"run", tmp_path/"home", DISTILL_NB_CRASH_AT_STEP="7")   # rank 0 dies during node 1
    assert killed.returncode != 0
    ck = tmp_path/"run"/"checkpoints"
    assert sorted(p.name for p in ck.glob("checkpoint-*")) == ["checkpoint-00000003", "checkpoint-00000005"]  # keep 2
    st = json.loads((ck/"checkpoint-00000005"/"state.json").read_text())
    assert st["extra"]["index"] == 1                               # saved while the target was node 1
    assert sorted(p.name for p in (tmp_path/"run"/"path").glob("node-*")) == ["node-000", "node-001", "node-002"]

    bad = tmp_path/"bad"; shutil.copytree(tmp_path/"run", bad)   # a truncated newest checkpoint is refused
    f = bad/"checkpoints"/"checkpoint-00000005"/"model.safetensors"; f.write_bytes(f.read_bytes()[:100])
    r = launch1(bad, tmp_path/"home")
    assert r.returncode != 0
    assert "checkpoint-00000005 is corrupt" in r.stderr and "resume from checkpoint-00000003" in r.stderr
    assert sorted(p.name for p in (bad/"checkpoints").glob("checkpoint-*")) == ["checkpoint-00000003", "checkpoint-00000005"]  # nothing deleted
    assert sorted(p.name for p in (bad/"path").glob("node-*")) == ["node-000", "node-001", "node-002"]

    resumed = torchrun(tmp_path/"run", tmp_path/"home")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    s = json.loads((tmp_path/"run"/"summary.json").read_text())
    assert s["resumed_from"] == 5 and s["world_size"] == 2
    assert s["targets"] == s_ref["targets"]                        # continued at node 1, then switched on time
    for part in ("generator", "fake_score"):
        a = load_file(ref_run/"final"/part/"diffusion_pytorch_model.safetensors")
        b = load_file(tmp_path/"run"/"final"/part/"diffusion_pytorch_model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    assert s["final_dm"] == s_ref["final_dm"]

def test_corrupt_path_node_is_refused(ref_run, tmp_path):
    import shutil
    shutil.copytree(ref_run/"path", tmp_path/"run"/"path")
    f = tmp_path/"run"/"path"/"node-001"/"diffusion_pytorch_model.safetensors"; f.write_bytes(f.read_bytes()[:-7])
    r = launch1(tmp_path/"run", tmp_path/"home")
    assert r.returncode != 0 and "node-001/diffusion_pytorch_model.safetensors is missing or corrupt" in r.stderr
    assert sorted(p.name for p in (tmp_path/"run"/"path").glob("node-*")) == ["node-000", "node-001", "node-002"]  # nothing deleted

def test_missing_teacher_directory(tmp_path):
    r = subprocess.run([sys.executable, "-m", "distill_nb.launch", "disback", "--config", str(TINY), "--out", str(tmp_path/"o"),
                        "--set", f"teacher={tmp_path}/nowhere"], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert "diffusion_pytorch_model.safetensors" in r.stderr and "Nothing is downloaded" in r.stderr

SAMPLE = """
import sys, torch
from distill_nb.disback import load_pipeline
p = load_pipeline(sys.argv[1])
x = p(batch_size=6, generator=torch.Generator().manual_seed(7)).images
torch.save(x, sys.argv[2])
"""

def test_generator_reloads_bitwise_in_fresh_processes(ref_run, tmp_path):
    outs = []
    for i in range(2):
        o = tmp_path/f"x{i}.pt"
        r = subprocess.run([sys.executable, "-c", SAMPLE, str(ref_run/"final"), str(o)], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        outs.append(torch.load(o, weights_only=True))
    assert outs[0].shape == (6, 1, 8, 8) and torch.isfinite(outs[0]).all()
    assert torch.equal(outs[0], outs[1])
    from distill_nb.disback import load_pipeline
    assert torch.equal(outs[0], load_pipeline(ref_run/"final")(batch_size=6, generator=torch.Generator().manual_seed(7)).images)

def test_trained_generator_reloads_bitwise_through_lcm_pipeline(tmp_path):
    "The generator as trained (in memory) and as reloaded by a fresh process give bitwise-identical one-step samples."
    from diffusers import DiffusionPipeline, LCMScheduler
    from distill_nb.diffusion import OneStepPipeline, matching_scheduler
    from distill_nb.disback import tiny_unet, frozen_copy, record_degradation, ScoreDistiller, distill, save_run, load_pipeline
    torch.manual_seed(0)
    teacher = frozen_copy(tiny_unet(8))
    path = record_degradation(teacher, teacher, n_nodes=1, every=2, lr=1e-3, batch_size=4)
    sd = ScoreDistiller(teacher, path, "disback", K=1, lr_g=1e-3, lr_f=1e-3, ratio=1, batch_size=4)
    distill(sd, 3)
    pipe = OneStepPipeline(sd._gen_core, matching_scheduler("lcm"), t_star=sd.t_star)
    x_mem = pipe(batch_size=5, generator=torch.Generator().manual_seed(3)).images
    save_run(sd, tmp_path/"run")
    assert (tmp_path/"run"/"generator"/"diffusion_pytorch_model.safetensors").exists()   # save_pretrained layout
    o = tmp_path/"x.pt"
    code = ("import sys, torch; from distill_nb.disback import load_pipeline; p = load_pipeline(sys.argv[1]); "
            "x = p(batch_size=5, generator=torch.Generator().manual_seed(3)).images; "
            "assert type(p.scheduler).__name__ == 'LCMScheduler' and p.scheduler.timesteps.tolist() == [399]; torch.save(x, sys.argv[2])")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path/"run"), str(o)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    x_fresh = torch.load(o, weights_only=True)
    assert x_mem.shape == (5, 1, 8, 8) and torch.equal(x_mem, x_fresh)
    p2 = load_pipeline(tmp_path/"run")
    assert isinstance(p2, DiffusionPipeline) and isinstance(p2.scheduler, LCMScheduler)
    with torch.no_grad(): next(sd._gen_core.parameters()).add_(1e-3)          # a different generator gives different samples
    assert not torch.equal(pipe(batch_size=5, generator=torch.Generator().manual_seed(3)).images, x_fresh)

def test_bench_cli_reports_one_step_vs_teacher_ratio():
    exe = Path(sys.executable).parent/"distill_nb"
    r = subprocess.run([str(exe), "bench", "disback"], capture_output=True, text=True, timeout=600,
                       env={**__import__("os").environ, "DISTILL_NB_PROGRESS": "0", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    line = next(l for l in r.stdout.splitlines() if "speedup" in l)
    res = json.loads(line.strip())
    assert res["speedup"] > 1 and res["one_step_s"] > 0 and res["teacher_8_steps_s"] > 0
    assert abs(res["speedup"] - res["teacher_8_steps_s"] / res["one_step_s"]) < 0.05 * res["speedup"]
