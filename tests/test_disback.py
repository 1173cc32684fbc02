"""DisBack's full-scale launcher under 2 real CPU processes (torchrun, gloo) with the tiny config: a run killed
mid-backtracking resumes at the same path node and ends bit-identical to an uninterrupted run; every path node is
kept; corrupt checkpoints and a missing teacher are refused with clear messages; the saved generator reloads in a
fresh process and gives bitwise-identical one-step samples; the in-run convergence table (curve.csv) survives a kill
and resume without lost or repeated rows; 2 processes and 1 process accumulating 2 micro-batches agree; the baseline
trains under bf16 (1 process); `distill_nb results --curves` plots two runs side by side. The SD-family latent path
(tiny pipeline, synthetic captions) runs under 2 processes, agrees with 1 process accumulating 2 micro-batches, and
refuses a missing base model before any compute."""
import json, math, subprocess, sys
from pathlib import Path
import pytest
import torch
from safetensors.torch import load_file

from distill_nb.launch import run_launch, launch_report

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT/"configs"/"disback"/"tiny.yaml"
TINY_SD = ROOT/"configs"/"disback"/"tiny_sd.yaml"

def torchrun(out, home, **env): return run_launch("disback", TINY, out, 2, home=home, **env)

@pytest.fixture(scope="module")
def ref_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("ref")
    r = torchrun(d/"run", d/"home")
    assert r.returncode == 0, launch_report(r)
    return d/"run"

def launch1(out, home):
    "One process (no torchrun): enough for the checks that fail before training."
    return run_launch("disback", TINY, out, 1, home=home)

def test_two_processes_kill_and_resume_same_node(ref_run, tmp_path):
    import shutil
    s_ref = json.loads((ref_run/"summary.json").read_text())
    assert s_ref["world_size"] == 2 and s_ref["resumed_from"] is None and s_ref["path_nodes"] == 3
    assert s_ref["targets"] == [1] * 8 + [0] * 4                 # N-1 = 1 for K = 8 iterations, then the teacher
    home = ref_run.parent/"home"                                   # the digits classifier of the in-run FD is cached there
    killed = torchrun(tmp_path/"run", home, DISTILL_NB_CRASH_AT_STEP="7")   # rank 0 dies during node 1
    assert killed.returncode != 0
    from distill_nb.disback_full import read_curve
    assert [r["iteration"] for r in read_curve(tmp_path/"run")] == list(range(8))   # row 7 came after the last checkpoint (6)
    ck = tmp_path/"run"/"checkpoints"
    assert sorted(p.name for p in ck.glob("checkpoint-*")) == ["checkpoint-00000003", "checkpoint-00000005"]  # keep 2
    st = json.loads((ck/"checkpoint-00000005"/"state.json").read_text())
    assert st["extra"]["index"] == 1                               # saved while the target was node 1
    assert sorted(p.name for p in (tmp_path/"run"/"path").glob("node-*")) == ["node-000", "node-001", "node-002"]

    bad = tmp_path/"bad"; shutil.copytree(tmp_path/"run", bad)   # a truncated newest checkpoint is refused
    f = bad/"checkpoints"/"checkpoint-00000005"/"model.safetensors"; f.write_bytes(f.read_bytes()[:100])
    r = launch1(bad, home)
    assert r.returncode != 0
    assert "checkpoint-00000005 is corrupt" in r.stderr and "resume from checkpoint-00000003" in r.stderr
    assert sorted(p.name for p in (bad/"checkpoints").glob("checkpoint-*")) == ["checkpoint-00000003", "checkpoint-00000005"]  # nothing deleted
    assert sorted(p.name for p in (bad/"path").glob("node-*")) == ["node-000", "node-001", "node-002"]

    resumed = torchrun(tmp_path/"run", home)
    assert resumed.returncode == 0, launch_report(resumed)
    rows = read_curve(tmp_path/"run")                               # resumed at iteration 6: row 7 redone once, nothing lost
    assert [r["iteration"] for r in rows] == list(range(13))
    assert (tmp_path/"run"/"curve.csv").read_bytes() == (ref_run/"curve.csv").read_bytes()
    s = json.loads((tmp_path/"run"/"summary.json").read_text())
    assert s["resumed_from"] == 5 and s["world_size"] == 2
    assert s["targets"] == s_ref["targets"]                        # continued at node 1, then switched on time
    for part in ("generator", "fake_score"):
        a = load_file(ref_run/"final"/part/"diffusion_pytorch_model.safetensors")
        b = load_file(tmp_path/"run"/"final"/part/"diffusion_pytorch_model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    assert s["final_dm"] == s_ref["final_dm"]

@pytest.fixture(scope="module")
def one_run(ref_run, tmp_path_factory):
    "The tiny config on 1 process accumulating 2 micro-batches (the same home: the cached digits classifier is reused)."
    d = tmp_path_factory.mktemp("one")
    r = run_launch("disback", TINY, d/"run", 1, ["gradient_accumulation_steps=2"], home=ref_run.parent/"home")
    assert r.returncode == 0, launch_report(r)
    return d/"run"

def test_two_processes_match_one_process_accumulating(ref_run, one_run):
    "Global batch 8: 2 processes × 4 and 1 process × 2 micro-batches of 4 give the same curve and generator (to rounding)."
    from distill_nb.disback_full import read_curve
    s2, s1 = (json.loads((r/"summary.json").read_text()) for r in (ref_run, one_run))
    assert (s2["world_size"], s2["per_device_batch"], s1["world_size"], s1["per_device_batch"], s1["gradient_accumulation_steps"]) == (2, 4, 1, 4, 2)
    assert s2["curve"] == "curve.csv" and s2["path_steps"] == 2 * 3          # n_nodes × path_every degradation steps
    two, one = read_curve(ref_run), read_curve(one_run)
    assert [(r["iteration"], r["phase"], r["target"], r["metric"]) for r in two] == \
        [(0, "start", None, "clf_fd")] + [(k, "path", 1, "clf_fd") for k in range(1, 9)] + [(k, "teacher", 0, "clf_fd") for k in range(9, 13)]
    assert len({r["value"] for r in two}) > 1                                 # the generator moves
    assert [(r["iteration"], r["phase"], r["target"]) for r in one] == [(r["iteration"], r["phase"], r["target"]) for r in two]
    assert one[0]["value"] == two[0]["value"]                                 # iteration 0: the same generator, bitwise
    assert all(math.isclose(a["value"], b["value"], rel_tol=1e-5) for a, b in zip(one, two))   # two half-batch means vs one: rounding only
    a = load_file(ref_run/"final"/"generator"/"diffusion_pytorch_model.safetensors")
    b = load_file(one_run/"final"/"generator"/"diffusion_pytorch_model.safetensors")
    dw = max((a[k] - b[k]).abs().max().item() for k in a); print(f"max |dw| 2x1 vs 1x2: {dw:.3g}")
    assert a.keys() == b.keys() and dw < 1e-5, dw

@pytest.fixture(scope="module")
def base_bf16(ref_run, tmp_path_factory):
    "The DMD2-style baseline of the tiny config under bf16 autocast (no path; 1 process to keep the file's time down)."
    d = tmp_path_factory.mktemp("base")
    r = run_launch("disback", TINY, d/"run", 1, ["mode=baseline", "mixed_precision=bf16"], home=ref_run.parent/"home")
    assert r.returncode == 0, launch_report(r)
    return d/"run"

def test_bf16_baseline(base_bf16):
    "bf16 on CPU: losses finite, fp32 weights that moved away from the teacher, a curve all at the teacher phase."
    from distill_nb.disback_full import read_curve, tiny_unet
    s = json.loads((base_bf16/"summary.json").read_text())
    assert (s["mixed_precision"], s["world_size"], s["mode"], s["path_nodes"], s["path_steps"]) == ("bf16", 1, "baseline", None, 0)
    assert math.isfinite(s["final_dm"]) and set(s["targets"]) == {0}
    w, init = load_file(base_bf16/"final"/"generator"/"diffusion_pytorch_model.safetensors"), tiny_unet(8).state_dict()
    assert all(w[k].dtype == torch.float32 for k in w) and max((w[k] - init[k]).abs().max().item() for k in w) > 1e-4
    rows = read_curve(base_bf16)
    assert [r["iteration"] for r in rows] == list(range(13)) and {r["phase"] for r in rows[1:]} == {"teacher"}
    assert all(math.isfinite(r["value"]) for r in rows)

def test_results_cli_plots_two_runs(ref_run, base_bf16, tmp_path, capsys):
    "`distill_nb results --curves BASELINE DISBACK --out fig.png` writes a two-panel figure; a folder without curve.csv is refused."
    from distill_nb.cli import main
    fig = tmp_path/"figs"/"curves.png"
    assert main(["results", "--curves", str(base_bf16), str(ref_run), "--out", str(fig)]) == 0
    assert f"wrote {fig}" in capsys.readouterr().out
    import matplotlib.image as mpimg
    img = mpimg.imread(fig); assert img.ndim == 3 and img.shape[1] > img.shape[0] > 100        # two panels side by side
    with pytest.raises(SystemExit) as e: main(["results", "--curves", str(ref_run), str(tmp_path), "--out", str(fig)])
    assert e.value.code == 2 and f"no curve.csv in {tmp_path}" in capsys.readouterr().err

def test_missing_feature_network_is_refused_before_compute(tmp_path, capsys, monkeypatch):
    from distill_nb.launch import main
    monkeypatch.setenv("DISTILL_NB_HOME", str(tmp_path/"home")); monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(SystemExit) as e:
        main(["disback", "--config", str(TINY), "--out", str(tmp_path/"o"), "--set", f"eval_features={tmp_path}/feats"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(f"error: eval_features {tmp_path}/feats: no feature network there"), err
    assert not (tmp_path/"home"/"cache").exists() and not list((tmp_path/"o").rglob("*"))   # nothing trained, nothing written

def test_corrupt_path_node_is_refused(ref_run, tmp_path):
    import shutil
    shutil.copytree(ref_run/"path", tmp_path/"run"/"path")
    f = tmp_path/"run"/"path"/"node-001"/"diffusion_pytorch_model.safetensors"; f.write_bytes(f.read_bytes()[:-7])
    r = launch1(tmp_path/"run", tmp_path/"home")
    assert r.returncode != 0 and "node-001/diffusion_pytorch_model.safetensors is missing or corrupt" in r.stderr
    assert sorted(p.name for p in (tmp_path/"run"/"path").glob("node-*")) == ["node-000", "node-001", "node-002"]  # nothing deleted

def test_missing_teacher_directory(tmp_path, capsys, monkeypatch):
    from distill_nb.launch import main
    monkeypatch.setenv("DISTILL_NB_HOME", str(tmp_path/"home")); monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(SystemExit) as e:
        main(["disback", "--config", str(TINY), "--out", str(tmp_path/"o"), "--set", f"teacher={tmp_path}/nowhere"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "diffusion_pytorch_model.safetensors" in err and "Nothing is downloaded" in err, err

SAMPLE = """
import sys, torch
from distill_nb.disback import load_pipeline
p = load_pipeline(sys.argv[1])
x = p(batch_size=6, generator=torch.Generator().manual_seed(7)).images
torch.save(x, sys.argv[2])
"""

def test_generator_reloads_bitwise_in_a_fresh_process(ref_run, tmp_path):
    "The launcher's saved generator samples the same in a fresh process as here (so any two fresh processes agree)."
    o = tmp_path/"x.pt"
    r = subprocess.run([sys.executable, "-c", SAMPLE, str(ref_run/"final"), str(o)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    x = torch.load(o, weights_only=True)
    assert x.shape == (6, 1, 8, 8) and torch.isfinite(x).all()
    from distill_nb.disback import load_pipeline
    assert torch.equal(x, load_pipeline(ref_run/"final")(batch_size=6, generator=torch.Generator().manual_seed(7)).images)

def test_trained_generator_reloads_bitwise_through_lcm_pipeline(tmp_path):
    "The generator as trained (in memory) and as reloaded by a fresh process give bitwise-identical one-step samples."
    from diffusers import DiffusionPipeline, LCMScheduler
    from distill_nb.diffusion import OneStepPipeline, matching_scheduler
    from distill_nb.disback import frozen_copy, record_degradation, ScoreDistiller, distill, save_run, load_pipeline
    from distill_nb.disback_full import tiny_unet
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

def test_uneven_batch_split_is_refused_before_compute(tmp_path, capsys, monkeypatch):
    from distill_nb.launch import main
    monkeypatch.setenv("DISTILL_NB_HOME", str(tmp_path/"home")); monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(SystemExit) as e:
        main(["disback", "--config", str(TINY), "--out", str(tmp_path/"o"), "--set", "gradient_accumulation_steps=3"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: batch_size 8 does not split over 1 process(es) × 3 accumulation step(s)"), err
    assert not (tmp_path/"home"/"cache").exists()

@pytest.fixture(scope="module")
def sd_runs(tmp_path_factory):
    "tiny_sd.yaml on 2 processes and on 1 process accumulating 2 micro-batches (global batch 4 both)."
    d = tmp_path_factory.mktemp("sd")
    r2 = run_launch("disback", TINY_SD, d/"two", 2, home=d/"home")
    assert r2.returncode == 0, launch_report(r2)
    r1 = run_launch("disback", TINY_SD, d/"one", 1, ["gradient_accumulation_steps=2"], home=d/"home")
    assert r1.returncode == 0, launch_report(r1)
    return d/"two", d/"one"

def test_sd_latent_path_two_processes(sd_runs):
    "Both stages in latent space with the text-conditioned UNet: every path node, the generator and its UNet written, losses finite."
    two, one = sd_runs
    s = json.loads((two/"summary.json").read_text())
    assert (s["teacher"], s["world_size"], s["path_nodes"], s["per_device_batch"]) == ("sd", 2, 3, 2)
    assert s["targets"] == [1] * 3 + [0] * 3 and math.isfinite(s["final_dm"]) and s["t_range"] == [20, 727]
    assert sorted(p.name for p in (two/"path").glob("node-*")) == ["node-000", "node-001", "node-002"]
    assert json.loads((two/"path"/"node-002"/"config.json").read_text())["_class_name"] == "TextCondEps"
    for f in ("generator/diffusion_pytorch_model.safetensors", "fake_score/diffusion_pytorch_model.safetensors",
              "unet/diffusion_pytorch_model.safetensors", "one_step.json"):
        assert (two/"final"/f).is_file(), f
    a = load_file(two/"final"/"generator"/"diffusion_pytorch_model.safetensors")
    b = load_file(one/"final"/"generator"/"diffusion_pytorch_model.safetensors")
    t0 = load_file(two/"path"/"node-000"/"diffusion_pytorch_model.safetensors")           # the teacher
    assert max((a[k] - t0[k]).abs().max().item() for k in a) > 1e-4                       # the generator moved
    dw = max((a[k] - b[k]).abs().max().item() for k in a); print(f"SD path, max |dw| 2x1 vs 1x2: {dw:.3g}")
    assert a.keys() == b.keys() and dw < 1e-5, dw      # each sample's caption follows its noise, on any process

def test_sd_missing_base_model_is_refused_before_compute(tmp_path, capsys, monkeypatch):
    from distill_nb.launch import main
    monkeypatch.setenv("DISTILL_NB_HOME", str(tmp_path/"home")); monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(SystemExit) as e:
        main(["disback", "--config", str(TINY_SD), "--out", str(tmp_path/"o"), "--set", f"base_model={tmp_path}/sd15"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(f"error: base_model {tmp_path}/sd15 is not a diffusers sd15 pipeline folder: missing model_index.json"), err
    assert err.count("\n") == 1 and "save_pretrained" in err                             # one line, naming the fix
    assert not list((tmp_path/"o").rglob("*")) and not (tmp_path/"home").exists()

def test_lora_path_two_processes_match_one_process(ref_run, tmp_path):
    "path_lora_rank under 2 processes: rank 0 records the adapters, rank 1 reads them; the run equals a 1-process run accumulating 2 (to rounding)."
    from distill_nb.disback_full import read_curve
    runs = {}
    for n, sets in ((2, []), (1, ["gradient_accumulation_steps=2"])):
        r = run_launch("disback", TINY, tmp_path/f"p{n}", n, ["path_lora_rank=2", *sets], home=ref_run.parent/"home")
        assert r.returncode == 0, launch_report(r); runs[n] = tmp_path/f"p{n}"
    info = json.loads((runs[2]/"path"/"path.json").read_text())
    assert info["lora"]["rank"] == 2 and sorted(p.name for p in (runs[2]/"path"/"node-002").iterdir()) == ["adapter.safetensors"]
    a, b = (load_file(runs[n]/"path"/"node-002"/"adapter.safetensors") for n in (2, 1))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)        # stage 1 runs on one process either way
    two, one = read_curve(runs[2]), read_curve(runs[1])
    assert [r["target"] for r in two] == [r["target"] for r in one] and len({r["value"] for r in two}) > 1
    assert all(math.isclose(x["value"], y["value"], rel_tol=1e-5) for x, y in zip(one, two))
    full = read_curve(ref_run)                                                      # the LoRA path is another path: the targets differ
    assert [r["target"] for r in full] == [r["target"] for r in two] and two[1]["value"] != full[1]["value"]
