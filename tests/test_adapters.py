"""Models from elsewhere: prediction-type adapters, per-example time and models, and an
eps-prediction network trained by plain optax measured by hbar like its native score."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hbar
from hbar import adapters
from hbar.schedules import DDPMSchedule, EDMSchedule

MIX = ([0.3, 0.7], [[-1.0, 0.5], [1.0, -0.5]], [0.3, 0.5])


def _rowwise(score):
    """The exact score with one time per row (the analytic scores take a scalar t)."""
    return lambda x, t: jax.vmap(lambda xi, ti: score(xi[None], ti)[0])(x, t)


def _targets(exact, sch):
    """Exact eps / x0 / v / denoiser models for the exact score (the conversions inverted)."""
    ex = _rowwise(exact)

    def coef(t):
        return sch.alpha(t)[:, None], sch.sigma(t)[:, None]

    def eps(x, t):
        return -coef(t)[1] * ex(x, t)

    def x0(x, t):
        a, s = coef(t)
        return (x + s**2 * ex(x, t)) / a

    def v(x, t):
        a, s = coef(t)
        return a * eps(x, t) - s * x0(x, t)

    return {"eps": eps, "x0": x0, "v": v}


@pytest.mark.parametrize("sch,prediction", [(hbar.SimpleSchedule(), "eps"), (hbar.CosineSchedule(), "x0"),
                                             (hbar.SimpleSchedule(), "v"), (DDPMSchedule(n_steps=50), "v")],
                         ids=lambda v: getattr(v, "name", v))
def test_prediction_adapters_equal_native_score(sch, prediction):
    exact = hbar.GaussianMixtureScore(*MIX, sch)
    model = _targets(exact, sch)[prediction]
    score = jax.jit(adapters.as_score(model, sch, prediction))
    x = jax.random.normal(jax.random.PRNGKey(0), (7, 2))
    for t in (0.1, 0.6):
        np.testing.assert_allclose(score(x, t), exact(x, t), rtol=2e-4, atol=2e-5)
    tv = jnp.linspace(sch.t_min, 0.9, 7)  # a time per example
    np.testing.assert_allclose(score(x, tv), _rowwise(exact)(x, tv), rtol=2e-4, atol=2e-5)


def test_denoiser_adapter_edm_and_vp():
    x = 3.0 * jax.random.normal(jax.random.PRNGKey(1), (6, 2))
    edm = EDMSchedule()
    exact = hbar.GaussianMixtureScore(*MIX, edm)
    D = lambda xx, sigma: xx + sigma[:, None] ** 2 * _rowwise(exact)(xx, sigma)  # Tweedie, alpha = 1
    score = jax.jit(adapters.from_denoiser(D, edm))
    for t in (0.05, 1.0, 20.0):
        np.testing.assert_allclose(score(x, t), exact(x, t), rtol=2e-4, atol=1e-6)
    # VP: EDM's D sees x / alpha at noise level sigma / alpha (k-diffusion's VP wrapper)
    vp = hbar.SimpleSchedule()
    exact_vp = hbar.GaussianMixtureScore(*MIX, vp)
    sig = lambda t: vp.sigma(t) / vp.alpha(t)
    tsig = jnp.linspace(0.01, 1.0, 2001)

    def D_vp(xs, sigma_edm):  # a denoiser that only knows sigma: invert sigma_edm -> t
        t = jnp.interp(sigma_edm, sig(tsig), tsig)
        a = vp.alpha(t)[:, None]
        return (a * xs + vp.sigma2(t)[:, None] * _rowwise(exact_vp)(a * xs, t)) / a
    score_vp = jax.jit(adapters.from_denoiser(D_vp, vp))
    np.testing.assert_allclose(score_vp(x[:, :], 0.4), exact_vp(x, 0.4), rtol=2e-3, atol=1e-4)


def test_ddpm_timestep_convention():
    """A diffusers-style eps model indexed by integer timesteps k (alphas_cumprod[k])."""
    sch = DDPMSchedule(n_steps=100)
    abar = jnp.asarray(sch.alphas_cumprod)
    exact = hbar.GaussianMixtureScore(*MIX, sch)

    def eps_k(x, k):
        ki = jnp.round(k).astype(int)
        a, s = jnp.sqrt(abar[ki])[:, None], jnp.sqrt(1 - abar[ki])[:, None]
        t = (ki + 1) / sch.n_steps
        return -s * _rowwise(exact)(x, t.astype(x.dtype)) * (a**2 + s**2)  # a^2 + s^2 = 1
    score = jax.jit(adapters.from_eps(eps_k, sch, model_time="timestep"))
    x = jax.random.normal(jax.random.PRNGKey(2), (5, 2))
    for k in (0, 9, 57, 99):
        t = (k + 1) / sch.n_steps
        np.testing.assert_allclose(score(x, t), exact(x, t), rtol=2e-4, atol=2e-5)


class _OneExample(eqx.Module):
    """An equinox model for one example: x (d,), t () -> (d,)."""

    lin: eqx.nn.Linear

    def __call__(self, x, t):
        return self.lin(jnp.concatenate([x, t[None]]))


def test_per_example_model_wrapped_by_one_call():
    m = _OneExample(eqx.nn.Linear(3, 2, key=jax.random.PRNGKey(0)))
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 2))
    with pytest.raises((TypeError, ValueError, hbar.HbarInputError)):
        hbar.sample(m, hbar.SimpleSchedule(), jax.random.PRNGKey(0), n=4, h=1.0, steps=3, d=2)
    s = adapters.per_example(m, dim=2)
    ref = jnp.stack([m(x[i], jnp.asarray(0.3)) for i in range(4)])
    np.testing.assert_allclose(s(x, 0.3), ref, rtol=1e-6)
    tv = jnp.array([0.1, 0.2, 0.3, 0.4])
    np.testing.assert_allclose(s(x, tv), jnp.stack([m(x[i], tv[i]) for i in range(4)]), rtol=1e-6)
    res = hbar.sample(s, hbar.SimpleSchedule(), jax.random.PRNGKey(0), n=4, h=1.0, steps=3)
    assert res.samples.shape == (4, 2)
    with pytest.raises(hbar.HbarInputError, match="shape"):
        s(x, jnp.zeros(3))


class _EpsNet(eqx.Module):
    """A small eps-prediction MLP with the ecosystem's call convention net(x (n, d), t (n,))."""

    mlp: eqx.nn.MLP

    def __call__(self, x, t):
        return jax.vmap(self.mlp)(jnp.concatenate([x, t[:, None]], axis=1))


@pytest.mark.slow  # a long check (CI default suite budget); run with pytest -m slow
def test_eps_network_trained_with_plain_optax_gives_native_nll0():
    """Train eps-prediction with plain optax (E|eps_hat - eps|^2, the DDPM loss), wrap it with
    from_eps, and check hbar's NLL0 equals that of the same network written as a native score,
    and is close to the exact NLL0 of the data's exact score."""
    sch = hbar.SimpleSchedule()
    mean, std = 0.5, 0.4
    data = mean + std * jax.random.normal(jax.random.PRNGKey(0), (2048, 1))
    net = _EpsNet(eqx.nn.MLP(2, 1, 32, 2, activation=jax.nn.swish, key=jax.random.PRNGKey(1)))
    opt = optax.adam(3e-3)
    state = opt.init(eqx.filter(net, eqx.is_array))

    @eqx.filter_jit
    def step(net, state, key):
        k1, k2, k3 = jax.random.split(key, 3)
        x0 = data[jax.random.choice(k1, data.shape[0], (256,))]
        t = jax.random.uniform(k2, (256,), minval=sch.t_min, maxval=sch.T)
        eps = jax.random.normal(k3, x0.shape)
        xt = sch.alpha(t)[:, None] * x0 + sch.sigma(t)[:, None] * eps
        loss, g = eqx.filter_value_and_grad(lambda m: jnp.mean((m(xt, t) - eps) ** 2))(net)
        upd, state = opt.update(g, state, eqx.filter(net, eqx.is_array))
        return eqx.apply_updates(net, upd), state, loss

    key = jax.random.PRNGKey(2)
    for _ in range(1000):
        key, k = jax.random.split(key)
        net, state, loss = step(net, state, k)

    wrapped = adapters.from_eps(net, sch)
    native = lambda x, t: -net(x, jnp.full((x.shape[0],), t, x.dtype)) / sch.sigma(t)
    x = np.asarray(mean + std * jax.random.normal(jax.random.PRNGKey(3), (16, 1)), dtype=np.float64)
    a = hbar.nll(wrapped, sch, x, order=0)
    b = hbar.nll(native, sch, x, order=0)
    np.testing.assert_allclose(a.nll0, b.nll0, rtol=1e-6, atol=1e-6)
    exact = hbar.nll(hbar.gaussian_score([mean], [[std**2]], sch), sch, x, order=0)
    print(f"NLL0 adapter {a.nll0_mean}, native {b.nll0_mean}, exact score {exact.nll0_mean}, "
          f"max |diff| {np.max(np.abs(a.nll0 - b.nll0)):.2e}")
    assert abs(a.nll0_mean[0] - exact.nll0_mean[0]) < 0.1, (a.nll0_mean, exact.nll0_mean)
