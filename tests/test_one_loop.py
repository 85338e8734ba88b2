"""The one-loop estimator of C1 (hbar.one_loop, docs/theory.md section 5.7) against closed forms
(Gaussian oracle, factorised oracle) and the exact characteristics."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hbar
import hbar.one_loop as one_loop
from hbar.one_loop import adjoint_pass, fluctuation_grid, one_loop_samples
from hbar.probability_flow import pf_log_likelihood
from hbar.references import factorised_oracle, gaussian_oracle
from hbar.scores import DiagonalGaussianScore

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _cases import gaussian_case  # noqa: E402

OU = hbar.OUSchedule(beta=1.0, t_min=1e-2, T=8.0)


def factorised_case(d, eps=0.2, n=100, groups=6, seed=0, schedule=OU):
    """Factorised Gaussian data N(m0, diag s0) in d dimensions (coordinates cycling through
    ``groups`` parameter sets), a scaled and shifted diagonal affine score, n data points."""
    rng = np.random.default_rng(seed)
    gm, gv, gs = 0.5 * rng.normal(size=groups), rng.uniform(0.2, 1.5, groups), 0.1 * rng.normal(size=groups)
    idx = np.arange(d) % groups
    m0, s0 = gm[idx], gv[idx]
    score = DiagonalGaussianScore(m0, s0, schedule, scale_eps=eps, shift=gs[idx])
    x = m0 + np.sqrt(s0) * rng.normal(size=(n, d))
    return schedule, score, m0, s0, x


def check_honest(res, truth, label):
    """Mean C1 within 3 estimator s.e. of the truth; per-point z-scores with spread 1 +- 0.2."""
    v = res.valid
    z = (res.c1[v] - truth[v]) / res.c1_se[v]
    dev = (res.c1[v].mean() - truth[v].mean()) / res.c1_estimator_se
    print(f"{label}: mean C1 {res.c1[v].mean():.4f} truth {truth[v].mean():.4f} ({dev:+.2f} s.e.), "
          f"z mean {z.mean():+.3f} sd {z.std(ddof=1):.3f} (n = {z.size}, K = {res.probes})")
    assert v.sum() >= 0.95 * v.size
    assert abs(dev) < 3.0
    assert 0.8 < z.std(ddof=1) < 1.2


# --- pieces ----------------------------------------------------------------------------------


def test_factorised_oracle_matches_full_oracle():
    s, score, m0, s0, x = factorised_case(5, n=5, groups=2)
    fac = factorised_oracle(score, s, m0, s0, [0.0, 0.3], x=x)
    full = gaussian_oracle(score, s, m0, np.diag(s0), [0.0, 0.3], x=x)
    for name in ("nll", "c1", "c2", "nll_points", "c1_points", "c2_points", "mean", "cov", "w2"):
        np.testing.assert_allclose(getattr(fac, name), getattr(full, name), rtol=1e-8, atol=1e-10, err_msg=name)


def test_diagonal_score_is_its_affine_form():
    s, score, *_ , x = factorised_case(5, n=4)
    A, b = score.affine(0.3)
    np.testing.assert_allclose(score(jnp.asarray(x), 0.3), x @ np.asarray(A).T + np.asarray(b), rtol=1e-12)


def test_grid_resolves_t_min():
    g = fluctuation_grid(OU, 64)
    assert g.shape == (65,) and g[0] == OU.t_min and g[-1] == OU.T and np.all(np.diff(g) > 0)
    lam = 2 * np.asarray(OU.log_alpha(g)) - np.log(np.asarray(OU.sigma2(g)))
    np.testing.assert_allclose(np.diff(lam), np.diff(lam)[0], rtol=1e-4)  # uniform in log-SNR
    assert g[1] - g[0] < 0.05 * (g[-1] - g[-2])  # fine near t_min, coarse near T
    np.testing.assert_allclose(fluctuation_grid(OU, 8, "uniform"), np.linspace(OU.t_min, OU.T, 9))


def test_input_errors():
    s, score, m0, S0, x = gaussian_case(2, 0.1)
    with pytest.raises(hbar.HbarInputError, match="key"):
        hbar.nll(score, s, x, order=1, method="one-loop")
    with pytest.raises(hbar.HbarInputError, match="order=1"):
        hbar.nll(score, s, x, order=2, method="one-loop", key=jax.random.PRNGKey(0))
    with pytest.raises(hbar.HbarInputError, match="grid"):
        hbar.nll(score, s, x, order=1, method="one-loop", key=jax.random.PRNGKey(0), grid="nope")
    for bad in ([32], [32, 48], [64, 32], [16, 32, 96]):
        with pytest.raises(hbar.HbarInputError, match="ladder"):
            hbar.nll(score, s, x, order=1, method="one-loop", key=jax.random.PRNGKey(0), steps=bad)


def test_rademacher_bits():
    e = np.asarray(one_loop._rademacher(jax.random.PRNGKey(0), 20_003, jnp.float64))
    assert e.shape == (20_003,) and set(np.unique(e)) == {-1.0, 1.0}
    assert abs(e.mean()) < 4 / np.sqrt(e.size) and abs(np.mean(e[1:] * e[:-1])) < 4 / np.sqrt(e.size)


# --- the step ladder: order 2, Richardson extrapolation, discretisation error ------------------------


def test_ladder_grids_nest():
    gs = one_loop.ladder_grids(OU, [8, 16, 32])
    assert [g.size for g in gs] == [9, 17, 33]
    np.testing.assert_array_equal(gs[0], gs[2][::4])
    np.testing.assert_allclose(gs[1], fluctuation_grid(OU, 16), rtol=1e-12)


@pytest.mark.slow
def test_ladder_order_two_and_extrapolation():
    """Gaussian oracle, ladder 8, 16, 32 steps with common random numbers: the error of the mean
    against the closed form falls like steps^-2, the observed order is 2, and the Richardson value
    lies within its stated total error (discretisation + Monte Carlo) of the truth."""
    s, score, m0, S0, _ = gaussian_case(2, 0.2)
    x = np.random.default_rng(2).multivariate_normal(m0, S0, size=10)
    truth = gaussian_oracle(score, s, m0, S0, 0.0, x=x).c1_points[0].mean()
    res = hbar.nll(score, s, x, order=1, method="one-loop", key=jax.random.PRNGKey(0), probes=8192,
                   steps=[8, 16, 32], batch_size=10 * 8192)
    lad = res.extras["ladder"]
    err = np.array(lad["mean"]) - truth
    print(f"ladder 8/16/32: errors {err}, ratios {err[:-1] / err[1:]}, observed order {lad['observed_order']:.3f}, "
          f"extrapolated {lad['c1_mean']:.4f} (truth {truth:.4f}), disc {lad['disc_error']:.4f}, "
          f"MC {lad['mc_se']:.4f}, level-difference s.e. {lad['diff_se']}")
    assert res.extras["steps"] == [8, 16, 32] and lad["c1_levels"].shape == (10, 3)
    # common random numbers: level differences carry a small fraction of the Monte Carlo noise
    assert max(lad["diff_se"]) < 0.1 * lad["mc_se"]
    assert 1.7 < lad["observed_order"] < 2.3 and lad["extrapolated"]
    assert 3.0 < err[0] / err[1] < 5.5  # each level error >> its s.e. (~0.1 here)
    assert abs(err[2]) < err[1] / 4 * 1.5 + 3 * lad["mc_se"]
    assert abs(lad["c1_mean"] - truth) < 3 * lad["total_error"]
    assert lad["disc_error"] < 0.1 * abs(err[2]) + 3 * lad["mc_se"]
    np.testing.assert_allclose(res.c1[res.valid].mean(), lad["c1_mean"])
    # extrapolated per point: the order-2 combination of the last two levels
    c1l = lad["c1_levels"]
    np.testing.assert_allclose(res.c1, c1l[:, 2] + (c1l[:, 2] - c1l[:, 1]) / 3, rtol=1e-10)


def _synthetic_ladder(Q, steps, n=4, se=0.01):
    """A ladder result as one_loop_ell1 returns it, with level means Q (psi1 = -C1) per point."""
    Q = np.asarray(Q, float)
    lv = -np.tile(Q, (n, 1)) + 0.001 * np.arange(n)[:, None]
    r = steps[-1] / steps[-2]
    rich = lv[:, -1] + (lv[:, -1] - lv[:, -2]) / (r**2 - 1)
    full = lambda v: np.full(n, v)  # noqa: E731
    return dict(ell1=lv[:, -1], ell1_se=full(se), ell1_levels=lv, ell1_se_levels=np.full(lv.shape, se),
                ell1_diff_se=np.full((n, len(steps) - 1), se / 10), ell1_rich=rich, ell1_rich_se=full(2 * se))


def test_ladder_result_logic():
    valid = np.ones(4, bool)
    # exact order 2: extrapolated to the limit 1.0, discretisation error |R_2 - R_1| = 0
    c1, se, ex = one_loop.ladder_result(_synthetic_ladder([1.16, 1.04, 1.01], [8, 16, 32]), valid, [8, 16, 32])
    lad = ex["ladder"]
    assert lad["extrapolated"] and abs(lad["observed_order"] - 2) < 1e-9
    np.testing.assert_allclose(lad["c1_mean"], 1.0 - 0.0015, atol=1e-9)
    assert lad["disc_error"] < 1e-9 and np.all(se == 0.02)
    # order 1: not extrapolated, the finest level kept, error >= the last level difference
    c1, se, ex = one_loop.ladder_result(_synthetic_ladder([1.4, 1.2, 1.1], [8, 16, 32]), valid, [8, 16, 32])
    lad = ex["ladder"]
    assert not lad["extrapolated"] and abs(lad["observed_order"] - 1) < 1e-9
    np.testing.assert_allclose(c1, lad["c1_levels"][:, 2])
    assert lad["disc_error"] >= 0.1 - 1e-12 and np.isclose(lad["total_error"], np.hypot(lad["disc_error"], lad["mc_se"]))
    # two levels: no observed order, not extrapolated
    c1, se, ex = one_loop.ladder_result(_synthetic_ladder([1.04, 1.01], [16, 32]), valid, [16, 32])
    assert not ex["ladder"]["extrapolated"] and np.isnan(ex["ladder"]["observed_order"])
    assert ex["ladder"]["disc_error"] >= 0.03 - 1e-12


@pytest.mark.slow
def test_ladder_api_common_random_numbers():
    """nll(steps=[...]) end to end, small: levels share their random numbers (the level
    difference is much less noisy than a level), the finest level equals a plain run's."""
    s, score, m0, S0, x = gaussian_case(2, 0.2)
    kw = dict(order=1, method="one-loop", key=jax.random.PRNGKey(0), probes=256)
    res = hbar.nll(score, s, x[:2], steps=[16, 32, 64], **kw)
    lad = res.extras["ladder"]
    assert res.extras["steps"] == [16, 32, 64] and lad["c1_levels"].shape == (2, 3)
    assert max(lad["diff_se"]) < 0.1 * lad["mc_se"]
    assert 1.0 < lad["observed_order"] < 3.0
    plain = hbar.nll(score, s, x[:2], steps=64, **kw)  # same keys: the finest level is the plain run
    np.testing.assert_allclose(lad["c1_levels"][:, 2], plain.c1, rtol=1e-9)


# --- the adjoint pass: two independent probe sets -------------------------------------------------


def _exact_adjoint(proc, x_T, grid):
    """The backward pass's Heun scheme with the exact grad div v0 (d = 2): E[G^(i)] step by step,
    and int D1 |G|^2 dt on the same grid."""
    g = jnp.asarray(grid)
    D1 = lambda t: 0.5 * proc.diffusion2(t, 1.0)  # noqa: E731
    v1 = lambda y, t: proc.velocity(y[None], t)[0]  # noqa: E731
    div = lambda y, t: jnp.trace(jax.jacfwd(v1)(y, t))  # noqa: E731

    def field(t, X, G):
        J = jax.jacfwd(v1)(X, t)
        return v1(X, t), -jax.grad(div)(X, t) - J.T @ G

    def step(c, k):
        X, G, acc = c
        ta, tb = g[-1 - k], g[-2 - k]
        dt = tb - ta
        va, Ga = field(ta, X, G)
        Xp, Gp = X + dt * va, G + dt * Ga
        vb, Gb = field(tb, Xp, Gp)
        acc = acc + 0.5 * dt * (D1(ta) * G @ G + D1(tb) * Gp @ Gp)
        return (X + 0.5 * dt * (va + vb), G + 0.5 * dt * (Ga + Gb), acc), None

    G_T = proc.prior_score(x_T[None])[0]
    (X, G, acc), _ = jax.lax.scan(step, (x_T, G_T, 0.0), jnp.arange(g.size - 1))
    return np.asarray(G), -float(acc)


def _adjoint_samples(proc, x_T, grid, R=10_000, seed=1):
    keys = jax.random.split(jax.random.PRNGKey(seed), R)
    out = jax.jit(lambda k: adjoint_pass(proc, jnp.repeat(x_T[None], R, 0), k, jnp.asarray(grid)))(keys)
    return {k: np.asarray(v) for k, v in out.items()}


def check_independent_probes(out, G_exact, c_exact, label):
    """E[G1] = E[G2] = G, E[int D1 G1 . G2] = int D1 |G|^2 (no tr Cov G bias) and the errors of
    G1, G2 uncorrelated. Returns the bias of the C term in standard errors."""
    R = out["g2_term"].size
    se = out["g2_term"].std(ddof=1) / np.sqrt(R)
    dev = (out["g2_term"].mean() - c_exact) / se
    e1, e2 = out["G1"] - G_exact, out["G2"] - G_exact
    corr = [np.corrcoef(e1[:, i], e2[:, i])[0, 1] for i in range(e1.shape[1])]
    print(f"{label}: C term {out['g2_term'].mean():.5f} exact {c_exact:.5f} ({dev:+.1f} s.e.), "
          f"corr(G1 - G, G2 - G) {np.round(corr, 3)}, G1 mean error {np.abs(e1.mean(0)).max():.2e}")
    return dev, corr


def test_adjoint_pass_independent_probe_sets(monkeypatch):
    """The backward pass against its exact expectation on a coarse grid (nonlinear score: the
    Hutchinson noise of grad div v0 makes Cov G > 0). With the two probe sets independent the
    C term is unbiased; the same test with shared probes (monkeypatched) sees the bias."""
    s, score = mixture_case()
    proc = hbar.HProcess(s, score)
    x_T = np.asarray(pf_log_likelihood(proc, jnp.asarray([[0.4, 0.2]]), s.t_min, hbar.ODEOptions())["x_T"][0])
    grid = fluctuation_grid(s, 8)
    G_exact, c_exact = _exact_adjoint(proc, jnp.asarray(x_T), grid)
    out = _adjoint_samples(proc, x_T, grid)
    dev, corr = check_independent_probes(out, G_exact, c_exact, "independent probe sets")
    R = out["g2_term"].size
    sd = out["G1"].std(axis=0, ddof=1)
    assert np.all(sd > 1e-3)  # the probes do act on G
    assert np.all(np.abs(out["G1"].mean(0) - G_exact) < 4 * sd / np.sqrt(R))
    assert np.all(np.abs(out["G2"].mean(0) - G_exact) < 4 * sd / np.sqrt(R))
    assert abs(dev) < 4.0
    assert np.all(np.abs(corr) < 4 / np.sqrt(R))

    # power: the same check fails when both G's use the same probes
    draws = one_loop._row_draws

    def shared(row_keys, k, d, dtype, normal):
        a, b = draws(row_keys, k, d, dtype, normal)
        return (a, b) if normal else (a, a)

    monkeypatch.setattr(one_loop, "_row_draws", shared)
    dev_s, corr_s = check_independent_probes(_adjoint_samples(proc, x_T, grid), G_exact, c_exact, "shared probes")
    assert dev_s > 8.0 and np.all(np.asarray(corr_s) > 0.99)


@pytest.mark.slow  # a long check (CI default suite budget); run with pytest -m slow
def test_auto_switches_on_dimension():
    from hbar.likelihood import ONE_LOOP_MIN_DIM

    s, score, m0, S0, x = gaussian_case(2, 0.1)
    assert hbar.nll(score, s, x, order=1, method="auto").method == "characteristics"
    s, score, m0, s0, x = factorised_case(ONE_LOOP_MIN_DIM, n=3)
    r = hbar.nll(score, s, x, order=1, method="auto", key=jax.random.PRNGKey(0), probes=4, steps=16)
    assert r.method == "one-loop" and r.c1_se.shape == (3,) and r.divergence == "exact"


# --- Gaussian oracle: unbiased, honest error bars -------------------------------------------------


@pytest.mark.parametrize("d, n, probes", [(2, 100, 64), pytest.param(64, 100, 32, marks=pytest.mark.slow)])
def test_gaussian_oracle_full_affine(d, n, probes):
    s, score, m0, S0, _ = gaussian_case(d, 0.2)
    x = np.random.default_rng(d).multivariate_normal(m0, S0, size=n)
    truth = gaussian_oracle(score, s, m0, S0, 0.0, x=x).c1_points[0]
    res = hbar.nll(score, s, x, order=1, method="one-loop", key=jax.random.PRNGKey(d), probes=probes)
    check_honest(res, truth, f"affine d={d}")


@pytest.mark.parametrize("d", [pytest.param(784, marks=pytest.mark.slow), pytest.param(3072, marks=pytest.mark.slow)])
def test_gaussian_oracle_factorised(d):
    s, score, m0, s0, x = factorised_case(d, n=100)
    truth = factorised_oracle(score, s, m0, s0, 0.0, x=x).c1_points[0]
    res = hbar.nll(score, s, x, order=1, method="one-loop", key=jax.random.PRNGKey(d), probes=16)
    assert res.divergence == "hutchinson"
    check_honest(res, truth, f"factorised d={d}")


# --- unbiasedness at one point, against the exact characteristics ----------------------------------


def _single_point_samples(score, schedule, x, R, steps=128, seed=0):
    proc = hbar.HProcess(schedule, score)
    xj = jnp.asarray(x[None])
    fwd = pf_log_likelihood(proc, xj, schedule.t_min, hbar.ODEOptions(rtol=1e-9, atol=1e-9))
    keys = jax.random.split(jax.random.PRNGKey(seed), R)
    fn = jax.jit(lambda a, b, k, g: one_loop_samples(proc, a, b, k, g))
    out = fn(jnp.repeat(xj, R, 0), jnp.repeat(fwd["x_T"], R, 0), keys, jnp.asarray(fluctuation_grid(schedule, steps)))
    return -np.asarray(out["ell1"])


def check_unbiased_rate(c1_samples, exact, label):
    """The mean converges to the exact value; the RMS error of means of K samples is sd/sqrt(K)."""
    R = c1_samples.size
    sd = c1_samples.std(ddof=1)
    dev = (c1_samples.mean() - exact) / (sd / np.sqrt(R))
    ratios = []
    for K in (4, 16, 64):
        means = c1_samples[: R - R % K].reshape(-1, K).mean(axis=1)
        ratios.append(np.sqrt(np.mean((means - exact) ** 2)) / (sd / np.sqrt(K)))
    print(f"{label}: exact {exact:.4f}, mean of {R} samples {c1_samples.mean():.4f} ({dev:+.2f} s.e.), "
          f"sd {sd:.3f}, RMS error x sqrt(K)/sd at K = 4, 16, 64: {np.round(ratios, 3)}")
    assert abs(dev) < 3.0
    assert all(0.8 < r < 1.2 for r in ratios)


def mixture_case():
    s = hbar.SimpleSchedule()
    base = hbar.GaussianMixtureScore([0.3, 0.7], [[-1.0, 0.5], [1.0, -0.3]], [0.4, 0.6], s)
    return s, hbar.PerturbedScore(base, eps=0.15, shift=jnp.asarray([0.2, -0.1]))


@pytest.mark.slow
def test_unbiased_nonlinear_score_d2():
    s, score = mixture_case()
    x = np.array([[0.4, 0.2]])
    exact = hbar.nll(score, s, x, order=1, options=hbar.ODEOptions(rtol=1e-9, atol=1e-9)).c1[0]
    check_unbiased_rate(_single_point_samples(score, s, x[0], 8192), exact, "mixture d=2")


# --- trained networks: one-loop vs exact characteristics -----------------------------------------


@pytest.fixture(scope="session")
def models():
    from _one_loop_models import trained_model

    return trained_model


@pytest.mark.slow
@pytest.mark.parametrize("d, probes", [(2, 64), (8, 32), (64, 32)])
def test_trained_network_against_characteristics(models, d, probes):
    score, schedule, x = models(d)
    x = x[:100]
    exact = hbar.nll(score, schedule, x, order=1, method="characteristics")
    res = hbar.nll(score, schedule, x, order=1, method="one-loop", key=jax.random.PRNGKey(d), probes=probes)
    ok = exact.valid & res.valid
    assert ok.sum() >= 95
    np.testing.assert_allclose(res.nll0[ok], exact.nll0[ok], rtol=1e-4, atol=1e-4)
    res.valid = ok
    check_honest(res, exact.c1, f"trained d={d}")


@pytest.mark.slow
def test_unbiased_trained_d8(models):
    score, schedule, x = models(8)
    exact = hbar.nll(score, schedule, x[:1], order=1, options=hbar.ODEOptions(rtol=1e-9, atol=1e-9)).c1[0]
    check_unbiased_rate(_single_point_samples(score, schedule, x[0], 8192), exact, "trained d=8")
