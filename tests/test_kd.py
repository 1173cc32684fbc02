"Independent checks of distill_nb.kd: each vectorised loss against a naive loop written straight from its definition."
import itertools, math
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from distill_nb.kd import (kd_ce, kd_kl, kd_mse, soft_kl, FeatureHooks, make_projection, hidden_mse, cosine_loss, pkd_loss,
                           sp_loss, ickd_semantic, ce_weight_grad, at_loss, rkd_loss, pkt_loss, cc_loss, nst_loss, fitnet_loss,
                           LOSSES, register_loss, combine)

torch.set_num_threads(1)
G = lambda *s, seed=0: torch.randn(*s, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)

def test_kd_kl_matches_kl_div():
    s, t = G(6, 7), G(6, 7, seed=1)
    for T in (1., 2., 4.):
        ref = F.kl_div(F.log_softmax(s / T, -1), F.softmax(t / T, -1), reduction="batchmean")
        assert torch.allclose(kd_kl(s, t, T=T), ref * T * T)
        assert torch.allclose(kd_kl(s, t, T=T, tau_squared=False), ref)
        assert torch.allclose(soft_kl(s, F.softmax(t / T, -1), T=T), ref)

def test_token_level_logits_average_over_tokens():
    s, t = G(2, 3, 5), G(2, 3, 5, seed=1)
    assert torch.allclose(kd_ce(s, t), kd_ce(s.reshape(6, 5), t.reshape(6, 5)))

@pytest.mark.parametrize("fn", [kd_ce, kd_kl])
def test_regression_guard(fn):
    with pytest.raises(ValueError, match="kd_mse"): fn(G(4, 1), G(4, 1))
    assert kd_mse(G(4, 1), G(4, 1)) >= 0

def test_sp_naive():
    fs, ft = G(5, 3, 2, 2), G(5, 7, seed=1)
    def gram(f):
        a = f.reshape(5, -1); g = [[float(a[i] @ a[j]) for j in range(5)] for i in range(5)]
        return [[v / math.sqrt(sum(w * w for w in row)) for v in row] for row in g]
    gs, gt = gram(fs), gram(ft)
    ref = sum((gs[i][j] - gt[i][j]) ** 2 for i in range(5) for j in range(5)) / 25
    assert abs(sp_loss(fs, ft).item() - ref) < 1e-10

def test_ickd_closed_equals_matrix_random_shapes():
    for seed, (K, C) in enumerate([(1, 1), (3, 5), (10, 64)]):
        gs, gt = G(K, C, seed=seed), G(K, C, seed=seed + 10)
        gs[gs.abs() < 0.3] = 0.
        assert torch.allclose(ickd_semantic(gs, gt), ickd_semantic(gs, gt, form="matrix"), atol=1e-10)

def test_ce_weight_grad_autograd():
    fc = nn.Linear(6, 4).double(); x, y = G(9, 6), torch.arange(9) % 4
    F.cross_entropy(fc(x), y).backward()
    assert torch.allclose(ce_weight_grad(x, fc(x), y), fc.weight.grad)

def test_at_naive():
    fs, ft = G(2, 3, 4, 4), G(2, 5, 4, 4, seed=1)
    ref = 0.
    for n in range(2):
        qs = (fs[n] ** 2).sum(0).flatten(); qt = (ft[n] ** 2).sum(0).flatten()
        ref += ((qs / qs.norm() - qt / qt.norm()) ** 2).sum().item() / 2
    assert abs(at_loss(fs, ft).item() - ref) < 1e-10

def test_rkd_naive():
    es, et = G(5, 3), G(5, 4, seed=1)
    def pots(e):
        n = len(e); pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
        mu = sum((e[i] - e[j]).norm() for i, j in pairs) / len(pairs)
        d = torch.zeros(n, n)
        for i, j in pairs: d[i, j] = (e[i] - e[j]).norm() / mu
        a = torch.zeros(n, n, n)
        for i, j, k in itertools.product(range(n), repeat=3):
            if i != j and k != j:
                a[j, i, k] = F.normalize(e[i] - e[j], dim=0) @ F.normalize(e[k] - e[j], dim=0)
        return d, a
    (ds, as_), (dt, at) = pots(es), pots(et)
    ref = 25 * F.smooth_l1_loss(ds, dt) + 50 * F.smooth_l1_loss(as_, at)
    assert abs(rkd_loss(es, et).item() - ref.item()) < 1e-5

def test_pkt_naive():
    fs, ft = G(6, 3), G(6, 8, seed=1)
    def cond(f):
        a = F.normalize(f, dim=1); n = len(a)
        K = lambda i, j: (float(a[i] @ a[j]) + 1) / 2
        return [[K(i, j) / sum(K(k, j) for k in range(n) if k != j) if i != j else 0. for i in range(n)] for j in range(n)]
    ps, pt = cond(fs), cond(ft)
    ref = sum(pt[j][i] * math.log(pt[j][i] / ps[j][i]) for j in range(6) for i in range(6) if i != j) / 6
    assert abs(pkt_loss(fs, ft).item() - ref) < 1e-5 * ref   # eps=1e-7 inside the log

def test_cc_exact_naive():
    fs, ft = G(4, 3), G(4, 5, seed=1)
    def C(f):
        a = F.normalize(f, dim=1)
        return torch.tensor([[math.exp(-0.4 * float(((a[i] - a[j]) ** 2).sum())) for j in range(4)] for i in range(4)], dtype=torch.float64)
    ref = ((C(fs) - C(ft)) ** 2).sum() / 16
    assert abs(cc_loss(fs, ft, order=None).item() - ref.item()) < 1e-10

def test_nst_naive():
    fs, ft = G(2, 3, 2, 2), G(2, 4, 2, 2, seed=1)
    ref = 0.
    for n in range(2):
        s = [F.normalize(c.flatten(), dim=0) for c in fs[n]]; t = [F.normalize(c.flatten(), dim=0) for c in ft[n]]
        k = lambda A, B: sum(float(a @ b) ** 2 for a in A for b in B) / (len(A) * len(B))
        ref += (k(t, t) + k(s, s) - 2 * k(s, t)) / 2
    assert abs(nst_loss(fs, ft).item() - ref) < 1e-10

def test_hidden_losses_mask():
    hs, ht = G(2, 4, 3), G(2, 4, 3, seed=1)
    m = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]]); sel = m.bool()
    assert torch.allclose(hidden_mse(hs, ht, m), ((hs[sel] - ht[sel]) ** 2).mean())
    assert torch.allclose(cosine_loss(hs, ht, m), (1 - F.cosine_similarity(hs[sel], ht[sel], dim=-1)).mean())
    with pytest.raises(ValueError, match="attention mask"): hidden_mse(hs, ht, m[:, :3])

def test_feature_hooks_tuple_outputs_and_bad_path():
    class Layer(nn.Module):
        def __init__(self): super().__init__(); self.lin = nn.Linear(3, 3)
        def forward(self, x): return (self.lin(x), "attn")
    class Enc(nn.Module):
        def __init__(self): super().__init__(); self.layer = nn.ModuleList([Layer(), Layer()])
        def forward(self, x):
            for l in self.layer: x = l(x)[0]
            return x
    enc, x = Enc(), torch.randn(2, 3)
    with FeatureHooks(enc, ["layer.1", "layer.1.lin:in"]) as hk: out = enc(x)
    assert torch.equal(hk["layer.1"], out) and hk["layer.1.lin:in"].shape == (2, 3)
    with pytest.raises(ValueError, match="layer.1"): FeatureHooks(enc, ["layers.1"])
    assert all(len(m._forward_hooks) == 0 for m in enc.modules())   # a failed construction leaves no hook behind

def test_fitnet_with_projection_trains():
    torch.manual_seed(0)
    proj = make_projection(4, 6, "conv"); fs, ft = torch.randn(8, 4, 3, 3), torch.randn(8, 6, 3, 3)
    opt = torch.optim.SGD(proj.parameters(), lr=0.5)
    first = fitnet_loss(fs, ft, proj).item()
    for _ in range(50): opt.zero_grad(); l = fitnet_loss(fs, ft, proj); l.backward(); opt.step()
    assert l.item() < first

def test_registry_custom_loss_and_labels():
    @register_loss("_test_l1", inputs=("a", "b"))
    def l1(a, b, scale=1.0): return scale * (a - b).abs().mean()
    try:
        out = {"a": torch.ones(3), "b": torch.zeros(3)}
        tot, parts = combine([("_test_l1", 2.0), {"name": "_test_l1", "weight": 1.0, "scale": 3.0}], out, return_parts=True)
        assert tot.item() == pytest.approx(5.0) and sorted(parts) == ["_test_l1", "_test_l1'"]
        with pytest.raises(ValueError, match="no term with a non-zero weight"): combine([("_test_l1", 0)], out)
        with pytest.raises(ValueError, match="must be a number"): combine([("_test_l1", "1")], out)
    finally: LOSSES.pop("_test_l1")
