"Independent checks of distill_nb.kd: each vectorised loss against a naive loop written straight from its definition."
import itertools, math
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from distill_nb.kd import (kd_ce, kd_kl, kd_mse, soft_kl, hard_ce, FeatureHooks, make_projection, hidden_mse, cosine_loss, pkd_loss,
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

def test_ickd_scale_naive():
    gs, gt = G(3, 4), G(3, 4, seed=1)
    gs[0, 1] = 0.
    tot = 0.
    for k in range(3):   # M_k[i, j] = g_i g_j / |g_i * g| (rownorm of the outer product), zero row for g_i = 0
        def M(g):
            row = lambda i: [float(g[k, i] * g[k, j]) for j in range(4)]
            nrm = lambda r: math.sqrt(sum(v * v for v in r))
            return [[v / nrm(row(i)) if nrm(row(i)) > 0 else 0. for v in row(i)] for i in range(4)]
        ms, mt = M(gs), M(gt)
        tot += sum((ms[i][j] - mt[i][j]) ** 2 for i in range(4) for j in range(4))
    for scale, div in [("kc", 12), ("k2c", 36), ("sum", 1)]:
        for form in ("closed", "matrix"):
            assert abs(ickd_semantic(gs, gt, form, scale).item() - tot / div) < 1e-10
    assert torch.allclose(ickd_semantic(gs, gt), 3 * ickd_semantic(gs, gt, scale="k2c"))       # factor K
    assert torch.allclose(ickd_semantic(gs, gt, scale="sum"), 12 * ickd_semantic(gs, gt))      # factor K*C

def test_ickd_closed_equals_matrix_random_shapes():
    for seed, (K, C) in enumerate([(1, 1), (3, 5), (10, 64)]):
        gs, gt = G(K, C, seed=seed), G(K, C, seed=seed + 10)
        gs[gs.abs() < 0.3] = 0.
        assert torch.allclose(ickd_semantic(gs, gt), ickd_semantic(gs, gt, form="matrix"), atol=1e-10)

def test_ce_weight_grad_autograd():
    fc = nn.Linear(6, 4).double(); x, y = G(9, 6), torch.arange(9) % 4
    F.cross_entropy(fc(x), y).backward()
    assert torch.allclose(ce_weight_grad(x, fc(x), y), fc.weight.grad)

def test_at_naive_both_reductions():
    fs, ft = G(2, 3, 4, 3), G(2, 5, 4, 3, seed=1)
    ref = 0.
    for n in range(2):
        q = lambda f: [sum(float(f[n, c, i, j]) ** 2 for c in range(f.shape[1])) for i in range(4) for j in range(3)]
        qs, qt = q(fs), q(ft)
        ns, nt = math.sqrt(sum(v * v for v in qs)), math.sqrt(sum(v * v for v in qt))
        ref += sum((a / ns - b / nt) ** 2 for a, b in zip(qs, qt)) / 2
    assert abs(at_loss(fs, ft, reduction="sum").item() - ref) < 1e-10
    assert abs(at_loss(fs, ft).item() - ref / 12) < 1e-10                        # authors' code: mean over the H*W = 12 positions
    assert torch.allclose(at_loss(fs, ft, reduction="sum"), 12 * at_loss(fs, ft))
    # pooled: the factor is the pooled H*W (2 x 3 here)
    big = G(2, 4, 8, 6, seed=2)
    assert torch.allclose(at_loss(fs[:, :, :2], big, pool=True, reduction="sum"), 6 * at_loss(fs[:, :, :2], big, pool=True))

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

@pytest.mark.parametrize("self_pair", [True, False])
def test_pkt_naive(self_pair):
    fs, ft = G(6, 3), G(6, 8, seed=1)
    def cond(f):
        n = len(f); nrm = [math.sqrt(sum(float(v) ** 2 for v in f[i])) for i in range(n)]
        K = lambda i, j: (sum(float(f[i, d] * f[j, d]) for d in range(f.shape[1])) / (nrm[i] * nrm[j]) + 1) / 2
        keep = lambda i, j: self_pair or i != j
        return [[K(i, j) / sum(K(k, j) for k in range(n) if keep(k, j)) if keep(i, j) else 0. for i in range(n)] for j in range(n)]
    ps, pt = cond(fs), cond(ft)
    tot = sum(pt[j][i] * math.log(pt[j][i] / ps[j][i]) for j in range(6) for i in range(6) if pt[j][i] > 0)
    mean, batchmean = pkt_loss(fs, ft, self_pair=self_pair), pkt_loss(fs, ft, self_pair=self_pair, reduction="batchmean")
    assert abs(mean.item() - tot / 36) < 1e-5 * tot / 36        # authors' code: mean over the N*N entries (eps=1e-7 in the log)
    assert abs(batchmean.item() - tot / 6) < 1e-5 * tot / 6     # per-anchor sum, mean over anchors
    assert torch.allclose(batchmean, 6 * mean)

@pytest.mark.parametrize("normalize", [True, False])
def test_cc_exact_naive(normalize):
    fs, ft = G(4, 3), G(4, 5, seed=1)
    def C(f):
        a = F.normalize(f, dim=1) if normalize else f
        return torch.tensor([[math.exp(-0.4 * float(((a[i] - a[j]) ** 2).sum())) for j in range(4)] for i in range(4)], dtype=torch.float64)
    ref = ((C(fs) - C(ft)) ** 2).sum() / 16
    assert abs(cc_loss(fs, ft, order=None, normalize=normalize).item() - ref.item()) < 1e-10

@pytest.mark.parametrize("normalize", [True, False])
def test_cc_series_naive(normalize):
    fs, ft, g = G(4, 3), G(4, 5, seed=1), 0.4
    def C(f):
        a = F.normalize(f, dim=1) if normalize else f
        dot = lambda i, j: sum(float(a[i, d] * a[j, d]) for d in range(a.shape[1]))
        return [[math.exp(-2 * g) * sum((2 * g * dot(i, j)) ** p / math.factorial(p) for p in range(3)) for j in range(4)] for i in range(4)]
    cs, ct = C(fs), C(ft)
    ref = sum((cs[i][j] - ct[i][j]) ** 2 for i in range(4) for j in range(4)) / 16
    assert abs(cc_loss(fs, ft, normalize=normalize).item() - ref) < 1e-10
    # the default is normalize=False on unit-normalised embeddings
    assert torch.allclose(cc_loss(fs, ft), cc_loss(F.normalize(fs, dim=1), F.normalize(ft, dim=1), normalize=False), atol=1e-14)

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


X4, X3 = G(4, 10).float(), G(4, 3, 5, 5).float()
NAN = X4.clone(); NAN[0, 1] = NAN[2, 3] = float("nan"); NAN[3, 0] = float("inf")
BAD = [  # (call, exception type, exact one-line message)
    (lambda: kd_kl(NAN, X4), ValueError,
     "kd_kl: s_logits contains NaN/inf at 3 positions; check the model's outputs or lower the learning rate"),
    (lambda: kd_kl(X4, NAN[:1]), ValueError,
     "kd_kl: t_logits contains NaN/inf at 1 position; check the model's outputs or lower the learning rate"),
    (lambda: kd_kl(X4, X4, T=0), ValueError, "kd_kl: T must be > 0, got 0"),
    (lambda: kd_kl(X4, X4, T=-1.5), ValueError, "kd_kl: T must be > 0, got -1.5"),
    (lambda: kd_kl(X4, X4, T=float("nan")), ValueError, "kd_kl: T must be > 0, got nan"),
    (lambda: kd_ce(X4, X4, T=float("inf")), ValueError, "kd_ce: T must be > 0, got inf"),
    (lambda: kd_ce(X4, X4, T="4"), ValueError, "kd_ce: T must be > 0, got '4'"),
    (lambda: kd_mse(X4, X4, T=0.), ValueError, "kd_mse: T must be > 0, got 0.0"),
    (lambda: soft_kl(X4, F.softmax(X4, -1), T=-1), ValueError, "soft_kl: T must be > 0, got -1"),
    (lambda: kd_kl(X4.numpy(), X4), TypeError,
     "kd_kl: s_logits must be a torch.Tensor, got numpy.ndarray; convert it with torch.as_tensor(s_logits)"),
    (lambda: hard_ce(X4, np.zeros(4, dtype=int)), TypeError,
     "hard_ce: labels must be a torch.Tensor, got numpy.ndarray; convert it with torch.as_tensor(labels)"),
    (lambda: kd_kl(X4, X4[:, :5]), ValueError, "kd_kl: shape mismatch: student (4, 10) vs teacher (4, 5)."),
    (lambda: hidden_mse(X4, X4, [1, 1, 1, 1]), TypeError,
     "hidden_mse: mask must be a torch.Tensor, got list; convert it with torch.as_tensor(mask)"),
    (lambda: cosine_loss(X4, X4 * float("nan")), ValueError,
     "cosine_loss: h_t contains NaN/inf at 40 positions; check the model's outputs or lower the learning rate"),
    (lambda: at_loss(X3, torch.full_like(X3, float("inf"))), ValueError,
     "at_loss: f_t contains NaN/inf at 300 positions; check the model's outputs or lower the learning rate"),
    (lambda: sp_loss(X3, X3[:2]), ValueError,
     "sp_loss: batch size mismatch: student (4, 3, 5, 5) vs teacher (2, 3, 5, 5); feed the same examples to both"),
    (lambda: pkt_loss(X3.numpy(), X3), TypeError,
     "pkt_loss: f_s must be a torch.Tensor, got numpy.ndarray; convert it with torch.as_tensor(f_s)"),
    (lambda: cc_loss(X4, NAN), ValueError,
     "cc_loss: f_t contains NaN/inf at 3 positions; check the model's outputs or lower the learning rate"),
    (lambda: rkd_loss(NAN, X4), ValueError,
     "rkd_loss: f_s contains NaN/inf at 3 positions; check the model's outputs or lower the learning rate"),
    (lambda: nst_loss(X3, X3 * float("nan")), ValueError,
     "nst_loss: f_t contains NaN/inf at 300 positions; check the model's outputs or lower the learning rate"),
    (lambda: ickd_semantic(NAN, X4), ValueError,
     "ickd_semantic: g_s contains NaN/inf at 3 positions; check the model's outputs or lower the learning rate"),
    (lambda: fitnet_loss(X3, None), TypeError,
     "fitnet_loss: f_t must be a torch.Tensor, got NoneType; convert it with torch.as_tensor(f_t)"),
    (lambda: combine([("kd_kl", 1.0, {"T": 0})], {"s_logits": X4, "t_logits": X4}), ValueError, "kd_kl: T must be > 0, got 0"),
    (lambda: at_loss(X3, X3, reduction="batchmean"), ValueError,
     "at_loss: reduction must be 'mean' (authors' code) or 'sum' (H*W times larger), got 'batchmean'"),
    (lambda: pkt_loss(X4, X4, reduction="sum"), ValueError,
     "pkt_loss: reduction must be 'mean' (authors' code) or 'batchmean' (N times larger), got 'sum'"),
    (lambda: ickd_semantic(X4, X4, scale="KC"), ValueError,
     "ickd_semantic: scale must be 'kc' (DisWOT), 'k2c' or 'sum', got 'KC'"),
]

@pytest.mark.parametrize("i", range(len(BAD)))
def test_bad_input_one_line(i):
    call, exc, msg = BAD[i]
    with pytest.raises(exc) as e: call()
    assert str(e.value) == msg and "\n" not in msg

def test_fitnet_checks_before_projecting():
    calls = []
    class Spy(nn.Module):
        def forward(self, x): calls.append(1); return x
    with pytest.raises(ValueError, match="f_s contains NaN/inf"): fitnet_loss(X3 * float("nan"), X3, Spy())
    assert calls == []   # refused before the projection ran

def test_valid_edge_inputs_pass():
    assert torch.isfinite(kd_kl(X4, X4, T=np.float32(0.5)))        # numpy scalar temperature
    assert hard_ce(X4, torch.arange(4)).item() > 0                   # integer labels are not float-checked
    assert torch.isfinite(hidden_mse(X4[:, None], X4[:, None], torch.ones(4, 1, dtype=torch.long)))
