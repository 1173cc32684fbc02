"Plain pytest checks of distill_nb.diffusion against diffusers and closed forms (fast; the notebook has more)."
import copy
import numpy as np
import pytest
import scipy.linalg
import torch

from distill_nb.diffusion import (EpsMLP, OneStepPipeline, ResEpsMLP, add_noise, alphas_cumprod, dmd_grad, dmd_loss,
                                  ema_update, eps_to_x0, frechet_distance, gaussian_fd, matching_scheduler, one_step,
                                  psi, sample_ddim, sliced_wasserstein, trailing_timesteps)


def _gen(seed): return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("kind", ["tcd", "lcm", "ddim", "ddpm"])
def test_matching_scheduler_alphas(kind):
    assert torch.equal(matching_scheduler(kind).alphas_cumprod, alphas_cumprod())


def test_psi_true_eps_recovers_xs():
    ac = alphas_cumprod().double()
    x0, eps = torch.randn(4, 3, generator=_gen(0), dtype=torch.float64), torch.randn(4, 3, generator=_gen(1), dtype=torch.float64)
    t, s = torch.tensor([999, 600, 300, 10]), torch.tensor([100, -1, 299, 0])
    xt = add_noise(x0, eps, t, ac)
    torch.testing.assert_close(psi(xt, eps, t, s, ac), add_noise(x0, eps, s, ac), atol=1e-10, rtol=0)


def test_psi_equals_tcd_eta0():
    sch = matching_scheduler("tcd"); sch.set_timesteps(8, original_inference_steps=50)
    ts = sch.timesteps.tolist()
    x = y = torch.randn(5, 1, 8, 8, generator=_gen(2))
    f = lambda z, t: torch.tanh(z) * (1 + t / 1000)
    for i, t in enumerate(ts):
        x = sch.step(f(x, t), t, x, eta=0.0).prev_sample
        y = psi(y, f(y, t), t, ts[i + 1] if i + 1 < len(ts) else 0)
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


def test_sample_ddim_matches_ddim_scheduler():
    net = EpsMLP().eval()
    sch = matching_scheduler("ddim"); sch.set_timesteps(4)
    assert sch.timesteps.tolist() == trailing_timesteps(4)
    z = torch.randn(16, 2, generator=_gen(3))
    x = z.clone()
    with torch.no_grad():
        for t in sch.timesteps: x = sch.step(net(x, t), t, x, eta=0.0).prev_sample
        torch.testing.assert_close(sample_ddim(net, None, 4, x=z), x, atol=1e-5, rtol=1e-5)


def test_gaussian_fd_closed_forms():
    rng = np.random.default_rng(0)
    s1, s2, m1, m2 = rng.uniform(.5, 2, 4), rng.uniform(.5, 2, 4), rng.normal(size=4), rng.normal(size=4)
    assert gaussian_fd(m1, np.diag(s1**2), m2, np.diag(s2**2)) == pytest.approx(((m1-m2)**2).sum() + ((s1-s2)**2).sum(), abs=1e-10)
    A, B = rng.normal(size=(5, 5)), rng.normal(size=(5, 5))
    S1, S2 = A @ A.T, B @ B.T + np.eye(5)
    ref = np.trace(S1 + S2 - 2 * scipy.linalg.sqrtm(S1 @ S2).real)
    assert gaussian_fd(np.zeros(5), S1, np.zeros(5), S2) == pytest.approx(ref, abs=1e-8)
    x = rng.normal(size=(500, 5))
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-8)


def test_sliced_wasserstein_scale_closed_form():
    x, y = torch.randn(10000, 2, generator=_gen(4)), torch.randn(10000, 2, generator=_gen(5))
    assert sliced_wasserstein(x, 3 * y) == pytest.approx(2.0, abs=0.06)   # |σ1 − σ2| along every direction
    assert sliced_wasserstein(x, x) == 0.0


def test_dmd_gradient_and_zero():
    gen, real = EpsMLP(), EpsMLP()
    x0 = one_step(gen, torch.randn(32, 2, generator=_gen(6)))
    t, e = torch.randint(20, 980, (32,), generator=_gen(7)), torch.randn(32, 2, generator=_gen(8))
    g = dmd_grad(x0, real, gen, t=t, eps=e)
    gx, = torch.autograd.grad(dmd_loss(x0, real, gen, t=t, eps=e), x0, retain_graph=True)
    torch.testing.assert_close(gx, g / x0.numel(), atol=1e-7, rtol=1e-4)
    assert dmd_grad(x0, real, copy.deepcopy(real), t=t, eps=e).abs().max() == 0


def test_ema_update():
    a, b = EpsMLP(), EpsMLP()
    a0 = copy.deepcopy(a)
    ema_update(a, b, 0.9)
    for p, p0, q in zip(a.parameters(), a0.parameters(), b.parameters()):
        torch.testing.assert_close(p.data, 0.9 * p0.data + 0.1 * q.data)


def test_save_load_and_one_step_pipeline(tmp_path):
    g = ResEpsMLP(num_classes=10)
    g.save_pretrained(tmp_path)
    r = ResEpsMLP.from_pretrained(tmp_path)
    for p, q in zip(g.state_dict().values(), r.state_dict().values()): assert torch.equal(p, q)
    pipe = OneStepPipeline(r, matching_scheduler("lcm"))
    out = pipe(batch_size=4, generator=_gen(9), class_labels=torch.arange(4)).images
    z = torch.randn(4, 1, 8, 8, generator=_gen(9))
    with torch.no_grad(): ref = one_step(g, z, 399, torch.arange(4))
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)


# --- the score model as a LoRA on a frozen base (lora_score_model, LoRAFakeScoreTrainer) ---

class _TextUNet(torch.nn.Module):
    "A diffusers UNet2DConditionModel called as model(x, t, class_labels=None), with a fixed text conditioning."
    def __init__(self, seed=0):
        from diffusers import UNet2DConditionModel
        super().__init__(); torch.manual_seed(seed)
        self.unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
                                         down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                         cross_attention_dim=8, attention_head_dim=4, norm_num_groups=8)
        self.register_buffer("ctx", torch.randn(1, 3, 8, generator=_gen(seed)))
    def forward(self, x, t, class_labels=None):
        return self.unet(x, t, encoder_hidden_states=self.ctx.expand(len(x), -1, -1)).sample

def _bases():
    return {"EpsMLP": (EpsMLP(hidden=32), torch.randn(16, 2, generator=_gen(7))),
            "UNet2DConditionModel": (_TextUNet(), torch.randn(4, 4, 8, 8, generator=_gen(7)))}

@pytest.mark.parametrize("kind", ["EpsMLP", "UNet2DConditionModel"])
def test_lora_score_model_starts_equal_and_trains_only_the_adapter(kind):
    """At init the LoRA score model's output equals the frozen base's bit for bit (B = 0); a fake-score step
    (`fake_score_loss` via LoRAFakeScoreTrainer) changes every adapter tensor and nothing else: the base stays bitwise
    equal, the frozen weights are the base's own storage, and the trainable share is small."""
    from distill_nb.diffusion import LoRAFakeScoreTrainer, trainable_fraction, train_memory
    torch.manual_seed(1); base, x0 = _bases()[kind]; base.requires_grad_(False)
    t = torch.randint(0, 1000, (len(x0),), generator=_gen(8)); xt = add_noise(x0, torch.randn_like(x0), t)
    fs = LoRAFakeScoreTrainer(base, rank=2, lr=1e-2, ratio=1)
    with torch.no_grad(): assert torch.equal(fs.model(xt, t), base(xt, t))
    before = {k: v.clone() for k, v in base.state_dict().items()}
    lora0 = {n: p.detach().clone() for n, p in fs.model.named_parameters() if p.requires_grad}
    assert lora0 and all("lora_" in n for n in lora0)
    frac = trainable_fraction(fs.model)
    assert 0 < frac < (0.35 if kind == "EpsMLP" else 0.15), frac          # measured: the adapter's share of all parameters
    ptrs = {p.data_ptr() for p in base.parameters()}
    assert {p.data_ptr() for p in fs.model.parameters() if not p.requires_grad} == ptrs   # the base is shared, not copied
    for _ in range(2): fs.step(x0, _gen(9))
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())          # base: bit for bit
    assert all(not torch.equal(p, lora0[n]) for n, p in fs.model.named_parameters() if p.requires_grad)   # every adapter tensor moved
    with torch.no_grad(): assert not torch.equal(fs.model(xt, t), base(xt, t))
    m = train_memory(fs.model, fs.opt, base); n = sum(v.numel() for v in lora0.values())
    assert m["params"] == m["grads"] == 4 * n and m["optimizer"] >= 8 * n, m    # nothing of the base is held twice

def test_full_fake_score_unchanged_and_lora_errors():
    "FakeScoreTrainer still makes a full trainable copy; lora_score_model refuses a bad rank and a base that already has adapters."
    from distill_nb.core import ConfigError
    from distill_nb.diffusion import FakeScoreTrainer, lora_score_model
    base = EpsMLP(hidden=32).requires_grad_(False)
    f = FakeScoreTrainer(base); ptrs = {p.data_ptr() for p in base.parameters()}
    assert all(p.requires_grad and p.data_ptr() not in ptrs for p in f.model.parameters())
    with pytest.raises(ConfigError, match="positive integer"): lora_score_model(base, rank=0)
    with pytest.raises(ConfigError, match="already carries LoRA layers"): lora_score_model(lora_score_model(base, rank=2))
    with pytest.raises(ConfigError, match="no nn.Linear or nn.Conv2d"): lora_score_model(torch.nn.Sequential(torch.nn.ReLU()))
