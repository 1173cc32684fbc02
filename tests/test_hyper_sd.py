"""Hyper-SD: the full-scale launcher (TSCD + adversarial term, feedback LoRA, DMD) under 2 real CPU processes (torchrun,
gloo) with kill/resume in the later phases, 2 processes = 1 process × 2 accumulated micro-batches, gradient checkpointing with the adversarial stage, its bad-input errors and its
shipped configs; LoRAs saved by `save_lora` loaded into real diffusers pipelines. (The fresh-process sampling round
trip is tested in nbs/50_hyper_sd.ipynb, the tiny SDXL run in nbs/51_hyper_sd_full.ipynb.)"""
import json
from pathlib import Path
import pytest
from safetensors.torch import load_file

from distill_nb.launch import run_launch, launch_report

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT/"configs"/"hyper_sd"/"tiny.yaml"

def launch(out, home, *sets, nproc=2, cfg=TINY, **env):
    return run_launch("hyper_sd", cfg, out, nproc, list(sets), home=home, **env)

@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    "--set arguments for a COCO-shaped folder and a tiny CLIP folder: the reference run evaluates its final LoRA on 4 prompts."
    from distill_nb.hyper_sd_full import fake_coco, tiny_clip
    d = tmp_path_factory.mktemp("coco"); fake_coco(d/"coco"); tiny_clip(d/"clip")
    return [f"coco_root={d/'coco'}", f"clip_model={d/'clip'}", "eval_n=4", "eval_steps=[1,2]", "eval_batch=2"]

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Launches shared by several tests, each run once per module: `runs(name, *sets, nproc=2)` -> its output folder.
    A process start costs far more than the tiny config's steps, so the tests share runs instead of repeating them, and
    a 1-process run calls the launcher's entry point (`distill_nb.launch.main`) in this process; 2 processes go
    through torchrun."""
    from distill_nb.launch import main
    base = tmp_path_factory.mktemp("hyper_sd_runs"); done = {}
    def get(name, *sets, nproc=2):
        if name not in done:
            if nproc == 1:
                with pytest.MonkeyPatch.context() as mp:
                    mp.setenv("DISTILL_NB_HOME", str(base/"home"))
                    main(["hyper_sd", "--config", str(TINY), "--out", str(base/name)] + [a for s in sets for a in ("--set", s)])
            else:
                r = launch(base/name, base/"home", *sets, nproc=nproc)
                assert r.returncode == 0, launch_report(r)
            done[name] = base/name
        return done[name]
    return get

def cli(tmp_path, capsys, monkeypatch, *sets):
    """`python -m distill_nb.launch hyper_sd ...`'s entry point, in this process: (exit code, stderr). The bad-input
    errors are raised before any process group exists, so the test does not pay a process start per message."""
    from distill_nb.launch import main
    monkeypatch.setenv("DISTILL_NB_HOME", str(tmp_path/"home"))
    argv = ["hyper_sd", "--config", str(TINY), "--out", str(tmp_path/"x")] + [a for s in sets for a in ("--set", s)]
    capsys.readouterr()
    with pytest.raises(SystemExit) as e: main(argv)
    return e.value.code, capsys.readouterr().err

def test_two_processes_kill_and_resume(tmp_path, runs, coco):
    """tiny.yaml: TSCD steps 0-3 (k=4, 2, 1; adversarial weight 0 / 0.3 / 0.6), feedback 4-6, DMD 7-9; checkpoints
    every 2 steps. Rank 0 is killed in the feedback phase (step 6), the resumed run is killed again in the DMD phase
    (step 8), and the second resume must end bit-identical to an uninterrupted run (all LoRAs and the fake score)."""
    home = tmp_path/"home"
    ref = runs("ref", *coco)
    s_ref = json.loads((ref/"summary.json").read_text())
    assert s_ref["world_size"] == 2 and s_ref["resumed_from"] is None and s_ref["stages"] == [4, 2, 1]
    assert s_ref["phases"] == ["tscd-k4", "tscd-k2", "tscd-k1", "feedback", "dmd"]
    for k in ("k4", "k2", "k1", "feedback", "merged", "unified"): assert (ref/f"lora-{k}"/"pytorch_lora_weights.safetensors").exists(), k

    killed = launch(tmp_path/"run", home, DISTILL_NB_CRASH_AT_STEP="6")    # rank 0 dies hard in the feedback phase
    assert killed.returncode != 0
    ckpts = sorted(p.name for p in (tmp_path/"run"/"checkpoints").glob("checkpoint-*"))
    assert ckpts == ["checkpoint-00000003", "checkpoint-00000005"], ckpts
    assert not (tmp_path/"run"/"lora.safetensors").exists()

    killed = launch(tmp_path/"run", home, DISTILL_NB_CRASH_AT_STEP="8")    # resumes at 6, dies in the DMD phase
    assert killed.returncode != 0
    ckpts = sorted(p.name for p in (tmp_path/"run"/"checkpoints").glob("checkpoint-*"))
    assert ckpts == ["checkpoint-00000005", "checkpoint-00000007"], ckpts

    resumed = launch(tmp_path/"run", home)
    assert resumed.returncode == 0, launch_report(resumed)
    s = json.loads((tmp_path/"run"/"summary.json").read_text())
    assert s["resumed_from"] == 7 and s["world_size"] == 2
    for f in ("lora.safetensors", "fake.safetensors", "lora-unified/pytorch_lora_weights.safetensors"):
        a, b = load_file(ref/f), load_file(tmp_path/"run"/f)
        assert a.keys() == b.keys() and len(a) > 0 and all((a[k] == b[k]).all() for k in a), f
    lora = load_file(tmp_path/"run"/"lora.safetensors")
    for name in ("default", "ema", "feedback", "merged"): assert any(f".{name}." in k for k in lora), name
    assert s["final_loss"] == s_ref["final_loss"] and s["phase_last_loss"] == s_ref["phase_last_loss"]

def test_missing_base_model_and_data(tmp_path, capsys, monkeypatch):
    code, err = cli(tmp_path, capsys, monkeypatch, f"base_model={tmp_path}/sd15")
    assert code == 2 and "missing model_index.json" in err and "Place the model" in err, err
    code, err = cli(tmp_path, capsys, monkeypatch, f"data_root={tmp_path}/nodata")
    assert code == 2 and "place a LAION-style subset" in err, err

def test_bad_segment_count(tmp_path, capsys, monkeypatch):
    code, err = cli(tmp_path, capsys, monkeypatch, "ks=[8,3,1]")
    assert code == 2 and "do not divide T=1000" in err, err

def test_missing_reward_model(tmp_path, capsys, monkeypatch):
    code, err = cli(tmp_path, capsys, monkeypatch, f"reward_model={tmp_path}/aes")
    assert code == 2 and "missing clip/config.json, head.safetensors, head.json" in err, err
    code, err = cli(tmp_path, capsys, monkeypatch, "reward_model=\"\"")
    assert code == 2 and "feedback phase needs reward_model" in err, err

SHIPPED = {"sd15": 8, "sdxl": 8, "tiny": 2, "tiny_sdxl": 2}   # config -> the process count it is written for (8 GPUs; the 2-process test)

@pytest.mark.parametrize("name", list(SHIPPED))
def test_shipped_config_is_consistent(name):
    """Each shipped config builds and validates, and its derived quantities agree: the phases tile the step range, the
    TSCD segment counts fall to 1, the adversarial weight rises, the global batch splits into processes × accumulation ×
    per-device batch, checkpoints fall inside the run."""
    from distill_nb.hyper_sd_full import HyperSDFullConfig, full_phases
    cfg = HyperSDFullConfig.from_yaml(ROOT/"configs"/"hyper_sd"/f"{name}.yaml")   # unknown keys, bad types, __post_init__ checks
    assert cfg.arch == ("sdxl" if "sdxl" in name else "sd15"), (name, cfg.arch)
    phases = full_phases(cfg)
    assert [p[0] for p in phases] == [f"tscd-k{k}" for k in cfg.ks] + ["feedback", "dmd"], phases
    assert phases[0][1] == 0 and all(a[2] == b[1] and a[1] < a[2] for a, b in zip(phases, phases[1:]))
    total = phases[-1][2]
    assert total == sum(cfg.iters_per_stage) + cfg.feedback_iters + cfg.dmd_iters
    assert cfg.ks == sorted(set(cfg.ks), reverse=True) and cfg.ks[-1] == 1, cfg.ks
    assert cfg.adv_weights == sorted(cfg.adv_weights) and cfg.adv_weights[-1] > 0, cfg.adv_weights   # rises across stages
    world, accum = SHIPPED[name], getattr(cfg, "gradient_accumulation_steps", 1)
    per_device = cfg.batch_size // (world * accum)
    assert per_device >= 1 and per_device * world * accum == cfg.batch_size, (cfg.batch_size, world, accum)
    assert 0 < cfg.checkpoint_every <= total and cfg.keep >= 1
    assert cfg.resolution % 8 == 0 and cfg.w_min <= cfg.w_max and 0 <= cfg.t_star < 1000

@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_lora_targets_exist(arch):
    "Every launcher LoRA target names modules of the SD1.5/SDXL UNet layout (a typo would silently train nothing there)."
    from distill_nb.hyper_sd import _LORA_TARGETS
    from distill_nb.hyper_sd_full import tiny_sd
    names = [n for n, _ in tiny_sd(arch)["unet"].named_modules()]
    missing = [t for t in _LORA_TARGETS if not any(n == t or n.endswith("." + t) for n in names)]
    assert not missing, missing

def _save_lora_v0(unet, adapter, out_dir):
    "The saver before the fix: attention keys renamed by diffusers' converter, the other targets left as peft keys."
    from peft.utils import get_peft_model_state_dict
    from diffusers.utils import convert_state_dict_to_diffusers
    from distill_nb.hyper_sd import HyperSDPipeline
    HyperSDPipeline.save_lora_weights(out_dir, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, adapter_name=adapter)))

@pytest.mark.parametrize("arch", ["sd15", "sdxl", "digits"])
def test_lora_loads_completely(arch):
    """A LoRA on every launcher target (alpha = 2·rank, perturbed), saved by `save_lora` and loaded with
    `pipe.load_lora_weights` into a fresh StableDiffusionPipeline / StableDiffusionXLPipeline / HyperSDPipeline: every
    tensor arrives unchanged, no loader warning, and the UNet computes the trained model's output, unfused and fused."""
    from distill_nb.hyper_sd_full import lora_load_check
    q = lora_load_check(arch)
    assert q["file_tensors"] == 154 and q["loaded"] == q["unet_lora_tensors"] == q["file_tensors"], q
    assert q["warnings"] == [], q["warnings"]
    assert q["lora_effect"] > 0.1, q                     # the LoRA matters, so a dropped layer would show
    assert q["max_diff"] < 1e-6, q                       # unfused: the same computation
    assert q["max_diff_fused"] < 1e-5, q                 # fused: W + s·BA rounded once in float32

def test_lora_check_catches_the_old_saver():
    "The same check on the old converter's file: part of the tensors are dropped and the output differs (the check can fail)."
    from distill_nb.hyper_sd_full import lora_load_check
    q = lora_load_check("sd15", save=_save_lora_v0)
    assert q["loaded"] == 90 < q["file_tensors"] == 154 and q["max_diff"] > 0.1 and q["warnings"], q

def test_gradient_checkpointing_adversarial(runs):
    """The adversarial TSCD stages with gradient checkpointing (it raised torch.utils.checkpoint.CheckpointError: the
    base-UNet features were recomputed with the LoRA back on) run, and every LoRA, the fake score and the losses are
    bit-identical to the same run without checkpointing (tiny.yaml, 1 process × 2 accumulated micro-batches)."""
    off = runs("acc", "gradient_accumulation_steps=2", nproc=1)
    on = runs("acc-gc", "gradient_accumulation_steps=2", "gradient_checkpointing=true", nproc=1)
    for f in ("lora.safetensors", "fake.safetensors"):
        a, b = load_file(on/f), load_file(off/f)
        assert a.keys() == b.keys() and len(a) > 0 and all((a[k] == b[k]).all() for k in a), f
    sa, sb = (json.loads((d/"summary.json").read_text()) for d in (on, off))
    assert sa["phase_last_loss"] == sb["phase_last_loss"] and "tscd-k1" in sa["phase_last_loss"]

def test_coco_eval_two_processes(runs, coco, tmp_path):
    """The reference run (2 processes) evaluated its unified LoRA on the COCO prompts, each process sampling its share;
    one process sampling all of them from the saved LoRA (`load_lora_weights` into a fresh pipeline) gives the same images."""
    import numpy as np
    from PIL import Image
    import yaml
    from distill_nb.launch import apply_overrides
    from distill_nb.hyper_sd_full import HyperSDFullConfig, check_eval, coco_eval
    ref = runs("ref", *coco); c = json.loads((ref/"coco"/"coco.json").read_text())
    assert sorted(c) == ["1", "2"] and all(v["n"] == 4 and np.isfinite([v["clip_score"], v["fd"]]).all() for v in c.values()), c
    assert json.loads((ref/"summary.json").read_text())["coco"] == c
    cfg = HyperSDFullConfig.from_dict(apply_overrides(yaml.safe_load(TINY.read_text()), coco)); items = check_eval(cfg)
    one = coco_eval(cfg, ref/"lora-unified", items, tmp_path/"one")
    for k in ("1", "2"):
        for it in items:
            a, b = (np.asarray(Image.open(d/f"{k}-step"/f"{it['image_id']}.png"), dtype=int) for d in (ref/"coco", tmp_path/"one"))
            assert np.abs(a - b).max() <= 1, (k, it["image_id"])
        assert abs(one[k]["clip_score"] - c[k]["clip_score"]) < 0.05, (k, one[k], c[k])

SHORT = ["ks=[2,1]", "iters_per_stage=[1,2]", "adv_weights=[0.0,0.5]", "feedback_iters=1", "dmd_iters=2"]   # every phase, 6 steps

def test_two_processes_equal_accumulation(runs, coco):
    """DDP and gradient accumulation agree: 2 processes × micro-batch 2 and 1 process × 2 accumulated micro-batches of 2,
    on the same global batch of 4 (the same rows and the same noise per micro-batch), give the same LoRAs (every
    adapter), discriminator-trained TSCD stages, feedback LoRA and fake score to float tolerance (tiny.yaml, every phase)."""
    ddp, acc = runs("ref", *coco), runs("acc", "gradient_accumulation_steps=2", nproc=1)
    sd, sa = (json.loads((d/"summary.json").read_text()) for d in (ddp, acc))
    assert (sd["world_size"], sd["per_device_batch"], sd["gradient_accumulation_steps"]) == (2, 2, 1), sd
    assert (sa["world_size"], sa["per_device_batch"], sa["gradient_accumulation_steps"]) == (1, 2, 2), sa
    for f in ("lora.safetensors", "fake.safetensors"):
        a, b = load_file(ddp/f), load_file(acc/f)
        assert a.keys() == b.keys() and len(a) > 0, f
        assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5, f
    base = load_file(ddp/"lora-k2"/"pytorch_lora_weights.safetensors")
    moved = load_file(ddp/"lora-unified"/"pytorch_lora_weights.safetensors")
    assert any(k in moved for k in base)                   # the run trained: the unified LoRA exists and has the layers
    assert sd["phase_last_loss"].keys() == sa["phase_last_loss"].keys() and len(sd["phase_last_loss"]) == 5
    for k, v in sd["phase_last_loss"].items(): assert abs(v - sa["phase_last_loss"][k]) < 1e-5 * max(1, abs(v)), k

def test_config_errors_name_the_key(tmp_path, capsys, monkeypatch):
    "Bad values raise a one-line ConfigError that names the key and the fix; an uneven batch split fails before any model loads."
    from distill_nb.core import ConfigError
    from distill_nb.hyper_sd_full import HyperSDFullConfig
    with pytest.raises(ConfigError, match=r"^HyperSDFullConfig\.adv_weights: \[1\.5\] outside \[0, 1\) .*set each adversarial weight to a value in \[0, 1\)$"):
        HyperSDFullConfig(adv_weights=[0.0, 0.1, 0.3, 1.5])
    with pytest.raises(ConfigError, match=r"^HyperSDFullConfig\.mixed_precision: fp16 needs loss scaling.*set mixed_precision to bf16"):
        HyperSDFullConfig(mixed_precision="fp16")
    with pytest.raises(ConfigError, match=r"HyperSDFullConfig\.gradient_accumulation_steps: 0 is not > 0"):
        HyperSDFullConfig(gradient_accumulation_steps=0)
    with pytest.raises(ConfigError, match=r"fake_score"):
        HyperSDFullConfig(fake_score="half")
    import distill_nb.hyper_sd_full as H
    monkeypatch.setattr(H, "make_accelerator", lambda *a, **k: pytest.fail("the split must fail before the accelerator is made"))
    code, err = cli(tmp_path, capsys, monkeypatch, "gradient_accumulation_steps=3")
    assert code == 2 and err.startswith("error: batch_size 4 does not split over 1 process(es) × 3 accumulation step(s)"), err[-2000:]
    assert "set batch_size to 3 or 6, or change gradient_accumulation_steps" in err and len(err.strip().splitlines()) == 1

def test_bf16_two_processes(tmp_path):
    """bf16 autocast on CPU through DDP and accumulation (2 processes × 2 micro-batches), with the LoRA fake score the
    shipped SD configs use: every phase runs, losses are finite, the LoRAs and the fake score's adapter train in float32."""
    import math
    r = launch(tmp_path/"bf16", tmp_path/"home", *SHORT, "mixed_precision=bf16", "gradient_accumulation_steps=2", "batch_size=8",
               "fake_score=lora", "fake_rank=2", nproc=2)
    assert r.returncode == 0, launch_report(r)
    s = json.loads((tmp_path/"bf16"/"summary.json").read_text())
    assert (s["mixed_precision"], s["world_size"], s["gradient_accumulation_steps"]) == ("bf16", 2, 2), s
    assert all(math.isfinite(v) for v in s["phase_last_loss"].values()), s["phase_last_loss"]
    lora = load_file(tmp_path/"bf16"/"lora.safetensors")
    assert {str(v.dtype) for v in lora.values()} == {"torch.float32"}                      # trained tensors stay float32 under bf16
    b = [v for k, v in lora.items() if ".merged." in k and "lora_B" in k]
    assert b and max(v.abs().max().item() for v in b) > 0                 # B starts at zero: TSCD and feedback trained it
    fake = load_file(tmp_path/"bf16"/"fake.safetensors")                  # the fake score's adapter only, on every student target
    assert len(fake) == len([k for k in lora if ".default." in k]) and all(".score." in k and "lora_" in k for k in fake), list(fake)[:3]
    assert {str(v.dtype) for v in fake.values()} == {"torch.float32"}
    assert max(v.abs().max().item() for k, v in fake.items() if "lora_B" in k) > 0      # the fake score trained (B starts at zero)

def test_quick_dmd_fake_score_option():
    """The quick DMD stages default to the full fake-score copy their records were made with: the default and an explicit
    `fake_score: full` give bit-identical one-step students; `lora` builds an adapter-only fake score over the
    teacher's own weights and trains a different student."""
    import copy, torch
    from distill_nb.diffusion import EpsMLP, FakeScoreTrainer, LoRAFakeScoreTrainer
    from distill_nb.hyper_sd import RingDMDConfig, UnifiedConfig, ring_one_step, make_fake_score
    from distill_nb.hyper_sd_full import HyperSDFullConfig
    torch.manual_seed(0); tea = EpsMLP(hidden=32).requires_grad_(False); st = copy.deepcopy(tea)
    small = dict(iters=3, batch_size=32, bank=64, bank_steps=2)
    outs = {k: ring_one_step(st, tea, RingDMDConfig(**small, **kw)) for k, kw in
            (("default", {}), ("full", {"fake_score": "full"}), ("lora", {"fake_score": "lora", "fake_rank": 2}))}
    sd = {k: m.state_dict() for k, m in outs.items()}
    assert all(torch.equal(sd["default"][k], sd["full"][k]) for k in sd["default"])
    assert any(not torch.equal(sd["default"][k], sd["lora"][k]) for k in sd["default"])
    ptrs = {p.data_ptr() for p in tea.parameters()}
    for C in (RingDMDConfig, UnifiedConfig, HyperSDFullConfig):
        f = make_fake_score(tea, C())
        assert type(f) is FakeScoreTrainer and all(p.requires_grad and p.data_ptr() not in ptrs for p in f.model.parameters()), C
        f = make_fake_score(tea, C(fake_score="lora", fake_rank=2))
        assert type(f) is LoRAFakeScoreTrainer and {p.data_ptr() for p in f.model.parameters() if not p.requires_grad} == ptrs, C

