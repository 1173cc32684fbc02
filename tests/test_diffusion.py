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
