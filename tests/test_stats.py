"Independent checks of distill_nb.stats against SciPy and exact enumerations."
import itertools, math
import numpy as np
import pytest
from scipy import stats as sps
from distill_nb.stats import (pearson, spearman, kendall, paired_diff, bootstrap_ci, mean_std, mean_std_table, eta_squared,
                              regret, expected_random_regret, top_k_hit, ConstantInputWarning)

@pytest.mark.parametrize("seed", range(5))
def test_r_matches_scipy(seed):
    rng = np.random.default_rng(seed); n = 8 + 7 * seed
    x = rng.integers(0, 5, n).astype(float) if seed % 2 else rng.normal(size=n)
    y = x + rng.normal(size=n)
    assert pearson(x, y, n_perm=10).r == pytest.approx(sps.pearsonr(x, y)[0], abs=1e-10)
    assert spearman(x, y, n_perm=10).r == pytest.approx(sps.spearmanr(x, y)[0], abs=1e-10)
    assert kendall(x, y, n_perm=10).r == pytest.approx(sps.kendalltau(x, y)[0], abs=1e-10)

@pytest.mark.parametrize("f, ref", [(spearman, lambda a, b: sps.spearmanr(a, b)[0]), (kendall, lambda a, b: sps.kendalltau(a, b)[0])])
def test_perm_p_matches_exact_enumeration(f, ref):
    x, y = np.array([1., 2., 3., 4., 5., 6.]), np.array([2., 1., 4., 3., 6., 5.])
    r0 = ref(x, y)
    exact = np.mean([abs(ref(x, np.array(p))) >= abs(r0) - 1e-12 for p in itertools.permutations(y)])
    assert f(x, y, n_perm=20000).p == pytest.approx(exact, abs=0.01)

def test_perm_p_resolution_and_determinism():
    x = np.arange(20.)
    assert spearman(x, x, n_perm=99).p == pytest.approx(0.01)
    assert kendall(x, x[::-1], n_perm=99, alternative="less").p == pytest.approx(0.01)
    rng = np.random.default_rng(0); a, b = rng.normal(size=(2, 25))
    assert pearson(a, b, seed=7) == pearson(a, b, seed=7)

def test_constant_input_warns_nan():
    with pytest.warns(ConstantInputWarning):
        r = kendall([1, 1, 1, 1], [1, 2, 3, 4])
    assert math.isnan(r.r) and math.isnan(r.p)

def test_paired_diff_exact_sign_flip():
    d = np.array([0.3, -0.1, 0.4, 0.2, 0.25])
    res = paired_diff(d, np.zeros(5))
    null = [abs(np.mean(np.array(s) * d)) for s in itertools.product([1, -1], repeat=5)]
    assert res.p == pytest.approx(np.mean(np.array(null) >= abs(d.mean()) - 1e-12))
    assert res.sd == pytest.approx(d.std(ddof=1)) and res.lo <= res.mean <= res.hi

def test_paired_diff_large_n_random_flips():
    rng = np.random.default_rng(3); d = rng.normal(0.0, 1.0, 40)
    res = paired_diff(d, np.zeros(40), n_perm=20000)
    t_p = sps.ttest_1samp(d, 0.).pvalue
    assert res.p == pytest.approx(t_p, abs=0.03)

def test_bootstrap_ci_median_and_ci_width():
    x = np.random.default_rng(0).normal(size=50)
    lo90, hi90 = bootstrap_ci(x, ci=0.90); lo99, hi99 = bootstrap_ci(x, ci=0.99)
    assert lo99 < lo90 < x.mean() < hi90 < hi99

def test_eta_squared_matches_anova_f():
    rng = np.random.default_rng(0); lev = np.repeat(["a", "b", "c"], [5, 7, 9])
    y = rng.normal(size=21) + (lev == "c") * 1.0
    F_, _ = sps.f_oneway(*(y[lev == l] for l in "abc"))
    dfb, dfw = 2, 18
    assert eta_squared(y, {"f": lev})["f"] == pytest.approx(F_ * dfb / (F_ * dfb + dfw))

def test_regret_2d_equals_rows():
    rng = np.random.default_rng(0); S = rng.uniform(size=(4, 20)); P = S + rng.normal(0, 0.2, size=S.shape)
    idx = P.argmax(1)
    assert np.allclose(regret(S, idx), [regret(s, i) for s, i in zip(S, idx)])
    assert np.allclose(expected_random_regret(S), [expected_random_regret(s) for s in S])
    assert list(top_k_hit(S, P, k=5)) == [top_k_hit(s, p, k=5) for s, p in zip(S, P)]
    assert top_k_hit(S, S, k=1).all() and (regret(S, S.argmax(1)) == 0).all()

def test_tables():
    assert mean_std([1., 2., 3., 4.], fmt=".1f") == "2.5 ± 1.3"
    md = mean_std_table([{"arm": "a|b", "acc": [1, 2]}], columns=["arm", "acc"])
    assert md.splitlines()[2] == "| a\\|b | 1.50 ± 0.71 |"

def test_gehan_scores_agree_with_the_true_order_where_it_is_known():
    "Random true times censored at a common budget: a score is ±1 exactly when the censored data fix the order, and then it is right."
    from distill_nb.stats import gehan_scores
    rng = np.random.default_rng(0); ta, tb = rng.integers(1, 30, 400).astype(float), rng.integers(1, 30, 400).astype(float)
    T = 20.; s = gehan_scores(np.minimum(ta, T), ta <= T, np.minimum(tb, T), tb <= T)
    known = (np.minimum(ta, tb) <= T) & (ta != tb)                 # at least one reached by T, and no tie
    assert (s[known] == np.sign(tb - ta)[known]).all() and (s[~known] == 0).all()
    assert set(np.unique(s[known])) == {-1., 1.}

def test_censored_compare_hand_worked():
    "Threshold 1.0, budget 100: A first on seed 0, B first on seed 1 (A censored), seed 2 unknown; areas by scipy.integrate.trapezoid."
    from distill_nb.stats import censored_compare
    from scipy.integrate import trapezoid
    it = [0, 25, 50, 75, 100]
    A = [(it, [4., 1., .5, .5, .5]), (it, [4., 3., 2., 1.5, 1.2]), (it, [4., 3., 3., 3., 3.]), (it, [4., .9, .8, .8, .8])]
    B = [(it, [4., 2., 1., 1., 1.]), (it, [4., 1., .9, .9, .9]),  (it, [4., 4., 4., 4., 4.]), (it, [4., 2., 1.5, 1., 1.])]
    c = censored_compare(A, B, 1.0)
    assert (c.time_a, c.reached_a) == ([25., 100., 100., 25.], [True, False, False, True])
    assert (c.time_b, c.reached_b) == ([50., 25., 100., 75.], [True, True, False, True])
    assert c.scores == [1., -1., 0., 1.]
    flips = [sum(e * x for e, x in zip(sg, c.scores)) for sg in itertools.product([-1, 1], repeat=4)]
    assert c.rank.p == pytest.approx(sum(f >= sum(c.scores) for f in flips) / 16)    # exact sign-flip enumeration
    assert c.rank.p == pytest.approx(8 / 16)        # sums of ±1 ∓1 ±1 (the 0 either way): 3, 1, 1, 1 of 8 are >= 1
    for (i, v), area in zip(A, c.area_a): assert area == pytest.approx(trapezoid(v, i) / 100)
    d = np.array(c.area_a) - np.array(c.area_b)
    flips = [np.mean(np.array(sg) * d) for sg in itertools.product([-1, 1], repeat=4)]
    assert c.area.p == pytest.approx(sum(f <= d.mean() + 1e-12 for f in flips) / 16)  # A's curve lower: the left tail
    assert not c.rank.passed and not c.area.passed                                  # 4 pairs never pass (min_n 6)
