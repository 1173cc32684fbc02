"""The memory planner (`distill_nb plan`): hand-computed parameter/optimizer bytes, activations against a measured RSS peak,
every shipped full config, and the knob named for an oversized phase."""
import json, subprocess, sys, textwrap
from pathlib import Path
import pytest, torch, torch.nn as nn
from distill_nb.plan import GiB, Act, Phase, param_counts, memory, measure_peak, plan, plan_phase, plan_table

ROOT = Path(__file__).resolve().parents[1]
FULL = [p for p in sorted((ROOT/"configs").glob("*/*.yaml")) if "tiny" not in p.stem and p.stem != "protocol"]

def _mlp(): return nn.Sequential(nn.Linear(100, 50), nn.ReLU(), nn.Linear(50, 10))   # 5050 + 510 = 5560 parameters

def test_mlp_adam_by_hand():
    with torch.device("meta"): mods = {"student": _mlp(), "teacher": _mlp().requires_grad_(False)}
    n = 5560
    assert param_counts(mods) == {"trained": n, "frozen": n}
    fp32 = memory(param_counts(mods), "adam", 4)
    assert fp32 == {"params": 4 * n + 4 * n, "grads": 4 * n, "optimizer": 2 * 4 * n}     # 2 Adam states
    bf16 = memory(param_counts(mods), "adam", 2)
    assert bf16["params"] == 4 * n + 2 * n and bf16["grads"] == 4 * n                   # trained master weights stay fp32
    assert memory(param_counts(mods), "sgd-momentum", 4)["optimizer"] == 4 * n           # 1 momentum state
    assert memory(param_counts(mods), "adamw", 4, fsdp=4)["optimizer"] == 2 * n          # sharded over 4
    ph = Phase("mlp", lambda: {"student": _mlp(), "teacher": _mlp().requires_grad_(False)}, "adam", 8)
    r = plan_phase(ph, "test-hand", "bf16", gpus=1, measure=False, cache=False)
    assert (r.params, r.grads, r.optimizer, r.activations, r.peak) == (6 * n, 4 * n, 8 * n, 0, 18 * n)

_RSS = textwrap.dedent('''
    import resource, sys, torch, torch.nn as nn
    torch.set_num_threads(1); torch.manual_seed(0)
    m = nn.Sequential(*[l for _ in range(3) for l in (nn.Linear(2048, 2048), nn.ReLU())], nn.Linear(2048, 10))
    x = torch.randn(8192, 2048)
    m(x[:8]).sum().backward(); m.zero_grad(set_to_none=False)   # allocate the gradients and warm up before the baseline
    rss = lambda: int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
    before = rss()
    m(x).logsumexp(-1).mean().backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(peak - before)
''')

@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs Linux /proc for the RSS baseline")
def test_activations_match_measured_rss_peak():
    "The planner's activation bytes for a 400 MB step are within 30 % of the peak RSS growth of the same step in a fresh process."
    out = subprocess.run([sys.executable, "-c", _RSS], capture_output=True, text=True, check=True)
    measured = int(out.stdout.split()[-1])
    m = {"m": nn.Sequential(*[l for _ in range(3) for l in (nn.Linear(2048, 2048), nn.ReLU())], nn.Linear(2048, 10))}
    planned = measure_peak(lambda mods, b: mods["m"](torch.randn(b, 2048)).logsumexp(-1).mean().backward(), m, 8192)
    planned -= 8192 * 2048 * 4          # the subprocess's input existed before its baseline
    assert measured > 200e6, f"the RSS measurement is too small to compare ({measured} bytes)"
    assert 0.7 * measured <= planned <= 1.3 * measured, f"planned {planned / 2**20:.0f} MiB vs measured {measured / 2**20:.0f} MiB"

def test_oversized_names_a_knob(tmp_path):
    step = lambda m, b: m["m"](torch.zeros(b, 512)).logsumexp(-1).mean().backward()
    ph = Phase("wide", lambda: {"m": nn.Sequential(nn.Linear(512, 4096), nn.ReLU(), nn.Linear(4096, 10))}, "adam", 4096, acts=[Act(step)])
    ok = plan_phase(ph, "test-knob", gpus=1, gpu_mem=80, cache=False); assert ok.fits and not ok.knob
    r = plan_phase(ph, "test-knob", gpus=1, gpu_mem=0.1, cache=False)
    assert not r.fits and r.knob.startswith("accumulation x"), r.knob
    mb = int(r.knob.split("micro-batch ")[1].split(")")[0]); assert mb < 4096
    # a full trained copy too big for 24 GiB: the SDXL DMD phase's fake score as a full copy (41 GiB of fp32 weights,
    # gradients, Adam) does not fit and the knob names the LoRA; the shipped config's LoRA fake score fits
    full = tmp_path/"sdxl_full.yaml"; full.write_text((ROOT/"configs/hyper_sd/sdxl.yaml").read_text().replace("fake_score: lora", "fake_score: full"))
    assert "fake_score: full" in full.read_text()
    dmd = {r.phase: r for r in plan("hyper_sd", full, gpus=8, gpu_mem=24, measure=False)}["DMD"]
    assert not dmd.fits and ("LoRA" in dmd.knob or "FSDP" in dmd.knob), dmd.knob
    lora = {r.phase: r for r in plan("hyper_sd", ROOT/"configs/hyper_sd/sdxl.yaml", gpus=8, gpu_mem=24, measure=False)}["DMD"]
    assert lora.fits and lora.peak < dmd.peak / 2, (lora.peak, dmd.peak)

@pytest.mark.parametrize("cfg", FULL, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_plan_counts_every_full_config(cfg, capsys):
    "Parameters and states of every shipped full config from its architecture alone (meta device; no data, no weights)."
    from distill_nb.cli import main
    assert main(["plan", cfg.parent.name, "--config", str(cfg), "--no-measure"]) == 0
    out = capsys.readouterr().out
    assert "| phase |" in out and "Traceback" not in out

@pytest.mark.slow
@pytest.mark.parametrize("cfg", FULL, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_plan_measures_every_full_config(cfg, capsys):
    "The full plan with measured activations (minutes for the Stable Diffusion configs on 2 cores; cached after)."
    from distill_nb.cli import main
    assert main(["plan", cfg.parent.name, "--config", str(cfg)]) == 0
    assert "| phase |" in capsys.readouterr().out

def _sd_config(tmp_path, src:str, **kw)->Path:
    "A copy of a shipped disback config with `kw` replacing its keys."
    lines = [l for l in (ROOT/"configs/disback"/src).read_text().splitlines() if l.split(":")[0] not in kw]
    p = tmp_path/f"{Path(src).stem}-test.yaml"; p.write_text("\n".join(lines + [f"{k}: {v}" for k, v in kw.items()]) + "\n"); return p

@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_disback_sd_plans_the_sd_unet(arch):
    "teacher: sd plans UNet2DConditionModel copies (not the CIFAR UNet2DModel): trained = the generator and fake score, each the UNet's size."
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    from distill_nb.plan import SD15_UNET, SDXL_UNET, CLIP_L_TEXT, CLIP_G_TEXT
    with torch.device("meta"):
        n = sum(p.numel() for p in UNet2DConditionModel(**(SDXL_UNET if arch == "sdxl" else SD15_UNET)).parameters())
        te = sum(p.numel() for p in CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT)).parameters())
        if arch == "sdxl": te += sum(p.numel() for p in CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G_TEXT)).parameters())
    assert n > 800e6                                        # SD1.5's UNet: 860 M; SDXL's: 2.6 B
    rows = {r.phase: r for r in plan("disback", ROOT/f"configs/disback/{arch}.yaml", gpus=8, gpu_mem=80, measure=False)}
    assert list(rows) == ["degradation path", "distillation"]
    path, dist = rows["degradation path"], rows["distillation"]
    assert (path.trained, path.frozen) == (n, 2 * n + te)   # aux trained; teacher, G0 and the text encoder(s) frozen
    assert (dist.trained, dist.frozen) == (2 * n, 2 * n + te)   # generator + fake score; teacher, target, text encoder(s)
    assert dist.params == 2 * n * 4 + (2 * n + te) * 2     # trained fp32, frozen in bf16 (the config's weight dtype)
    name = "SDXL" if arch == "sdxl" else "SD1.5"
    assert f"absent: built as {name}'s UNet config" in dist.note and "cifar" not in dist.note.lower(), dist.note
    assert f"latents {64 if arch == 'sd15' else 128}x" in dist.note

def test_disback_tiny_sd_plans_and_measures(tmp_path):
    "The tiny teacher: sd config plans tiny_sd's UNet (not a CIFAR one), and its steps run (activations measured through TextCondEps)."
    from distill_nb.hyper_sd_full import tiny_sd
    n = sum(p.numel() for p in tiny_sd("sd15")["unet"].parameters())
    rows = {r.phase: r for r in plan("disback", ROOT/"configs/disback/tiny_sd.yaml", gpus=1, measure=True, cache=False)}
    assert rows["distillation"].trained == 2 * n and rows["degradation path"].trained == n
    assert all("tiny_sd's UNet config" in r.note and "cifar" not in r.note.lower() for r in rows.values())
    assert all(r.activations > 0 for r in rows.values())
    # a base_model folder that is there but has no unet/config.json: one line naming the file to place
    (tmp_path/"sd").mkdir()
    with pytest.raises(FileNotFoundError, match="unet/config.json"): plan("disback", _sd_config(tmp_path, "sd15.yaml", base_model=tmp_path/"sd"), measure=False)
    # ... which is read when it is there
    (tmp_path/"sd"/"unet").mkdir(); (tmp_path/"sd"/"unet"/"config.json").write_text(json.dumps(tiny_sd("sd15")["unet"].config))
    r = plan("disback", _sd_config(tmp_path, "sd15.yaml", base_model=tmp_path/"sd"), measure=False)[-1]
    assert r.trained == 2 * n and "sd/unet/config.json" in r.note, r.note
