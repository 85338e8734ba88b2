"""Tests for hbar.data: scalings, determinism, entropies, mixture specs and file loading."""

import math

import jax
import numpy as np
import pytest

from hbar.data import (
    DATASETS,
    DIGITS_INFO,
    canonical_name,
    dataset_dim,
    dataset_entropy,
    digits_bits_per_dim,
    load_dataset,
    load_points,
    mixture_entropy,
    mixture_logpdf,
    mixture_spec,
)
from hbar.schedules import SimpleSchedule
from hbar.scores import GaussianMixtureScore
from hbar.validation import HbarInputError

GMM_KW = {"weights": [1, 3], "means": [[0, 0, 0], [2, 2, 2]], "covs": [0.2, 0.3]}


def _kw(name):
    return GMM_KW if name == "gmm" else {}


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_shapes_dtype_determinism(name):
    kw = _kw(name)
    x = load_dataset(name, 200, 3, **kw)
    d = dataset_dim(name, **kw)
    assert x.shape == (200, d) and x.dtype == np.float64
    assert np.all(np.isfinite(x))
    np.testing.assert_array_equal(x, load_dataset(name, 200, 3, **kw))
    assert not np.array_equal(x, load_dataset(name, 200, 4, **kw))


def test_swiss_roll_is_the_papers():
    from sklearn.datasets import make_swiss_roll

    raw, _ = make_swiss_roll(500, noise=0.5, random_state=7)
    np.testing.assert_array_equal(load_dataset("swiss_roll", 500, 7), raw[:, [0, 2]] / 6.865)
    assert dataset_entropy("swiss-roll") == (1.333, 0.004)
    assert dataset_entropy("swiss_roll", noise=0.1) is None


def test_25_gaussians_scaling_and_entropy():
    x = load_dataset("25gaussians", 5000, 0)
    centres = np.array([(2 * i, 2 * j) for i in range(-2, 3) for j in range(-2, 3)]) / 2.828
    dist = np.linalg.norm(x[:, None] - centres[None], axis=-1)
    nearest = dist.argmin(1)
    resid = x - centres[nearest]
    np.testing.assert_allclose(resid.std(0), 0.05 / 2.828, rtol=0.05)
    assert len(np.unique(nearest)) == 25
    w, mu, cv = mixture_spec("25gaussians")
    np.testing.assert_allclose(mu, centres)
    np.testing.assert_allclose(cv[:, 0, 0], (0.05 / 2.828) ** 2)
    np.testing.assert_allclose(w, 1 / 25)
    h, err = dataset_entropy("25gaussians")
    assert (h, err) == (-2.015, 0.005)
    h_sep = math.log(25) + math.log(2 * math.pi * math.e * (0.05 / 2.828) ** 2)
    assert abs(h - h_sep) < err
    h_mc, se = mixture_entropy(w, mu, cv, n_mc=20_000)
    assert abs(h_mc - h_sep) < 5 * se


def test_eight_gaussians_radius_and_spec_feeds_exact_score():
    x = load_dataset("8gaussians", 4000, 1)
    r = np.linalg.norm(x, axis=1)
    assert abs(np.median(r) - 2.0) < 0.02
    w, mu, cv = mixture_spec("8gaussians")
    score = GaussianMixtureScore(w, mu, cv, SimpleSchedule())
    # the exact score at small t points towards the nearest centre: from centre + offset it is
    # -offset / (std^2 alpha^2 + sigma^2) up to the other components' (negligible) pull
    offset = np.array([0.05, -0.03])
    pts = np.asarray(mu) + offset
    s = np.asarray(score(pts, 0.01))
    assert s.shape == (8, 2)
    cos = np.sum(s * -offset, axis=1) / (np.linalg.norm(s, axis=1) * np.linalg.norm(offset))
    assert np.all(cos > 0.999), cos
    lp = mixture_logpdf(x, w, mu, cv)
    np.testing.assert_allclose(lp, np.asarray(score.log_density(x, 0.0)), rtol=1e-10, atol=1e-10)


def test_checkerboard_cells_and_entropy():
    x = load_dataset("checkerboard", 3000, 0)
    assert np.all(np.abs(x) <= 2)
    assert np.all((np.floor(x[:, 0]) + np.floor(x[:, 1])) % 2 == 0)
    assert dataset_entropy("checkerboard") == (pytest.approx(math.log(8)), 0.0)


def test_gaussian_entropy_closed_form_and_mc():
    cov = np.array([[1.0, 0.3, 0.0], [0.3, 0.5, 0.1], [0.0, 0.1, 0.2]])
    h, err = dataset_entropy("gaussian", cov=cov)
    expect = 0.5 * np.linalg.slogdet(2 * np.pi * np.e * cov)[1]
    assert err == 0.0 and h == pytest.approx(expect, rel=1e-12)
    w, mu, cv = mixture_spec("gaussian", cov=cov, mean=[1, 2, 3])
    h_mc, se = mixture_entropy(w, mu, cv, n_mc=50_000)
    assert abs(h_mc - expect) < 5 * se
    x = load_dataset("gaussian", 20000, 0, mean=[1, 2, 3], cov=cov)
    np.testing.assert_allclose(np.cov(x.T), cov, atol=0.03)
    np.testing.assert_allclose(x.mean(0), [1, 2, 3], atol=0.03)
    assert dataset_dim("gaussian", d=5) == 5


def test_mixture1d_quadrature_entropy():
    h, err = dataset_entropy("mixture1d")
    # well separated: log 2 + entropy of one component
    approx = math.log(2) + 0.5 * math.log(2 * math.pi * math.e * 0.09)
    assert abs(h - approx) < 2e-3 and err < 1e-6
    w, mu, cv = mixture_spec("mixture1d", weights=[0.2, 0.8], means=[0, 0.5], stds=[1, 0.5])
    h_q, _ = mixture_entropy(w, mu, cv)
    rng = np.random.default_rng(0)
    x = load_dataset("mixture1d", 200_000, rng, weights=[0.2, 0.8], means=[0, 0.5], stds=[1, 0.5])
    lp = mixture_logpdf(x, w, mu, cv)
    assert abs(-lp.mean() - h_q) < 5 * lp.std() / math.sqrt(lp.size)


def test_digits_scaling_and_bits_per_dim():
    x = load_dataset("digits", 300, 0)
    assert x.shape == (300, 64) and x.min() >= -1 and x.max() < 1
    # undoing the map gives integer levels 0..16
    k = np.floor((x + 1) * 17 / 2)
    assert k.min() >= 0 and k.max() <= 16
    xc = load_dataset("digits", 50, 0, dequantize=False)
    levels = (xc + 1) * 17 / 2 - 0.5
    np.testing.assert_allclose(levels, np.round(levels), atol=1e-12)
    tr = load_dataset("digits", 1500, 0, part="train", dequantize=False)
    te = load_dataset("digits", 297, 0, part="test", dequantize=False)
    alld = load_dataset("digits", 1797, 0, part="all", dequantize=False)
    # the fixed split partitions the 1797 images
    key = lambda a: sorted(map(bytes, a))  # noqa: E731
    assert key(np.concatenate([tr, te])) == key(alld)
    assert DIGITS_INFO["levels"] == 17
    # a uniform density on [-1, 1)^64 (NLL 64 log 2) spreads each pixel over 17 levels: log2(17) bits/dim
    nll_uniform = 64 * math.log(2.0)
    assert digits_bits_per_dim(nll_uniform) == pytest.approx(math.log2(17))
    with pytest.raises(HbarInputError, match="without replacement"):
        load_dataset("digits", 400, 0, part="test", replace=False)


def test_names_kwargs_and_keys():
    assert canonical_name("Swiss-Roll") == "swiss_roll"
    assert canonical_name("two_spirals") == "2spirals"
    with pytest.raises(HbarInputError, match="unknown data set"):
        load_dataset("swirl", 10)
    with pytest.raises(HbarInputError, match="unknown parameter"):
        load_dataset("moons", 10, 0, radius=3)
    with pytest.raises(HbarInputError, match="positive integer"):
        load_dataset("moons", 0)
    with pytest.raises(HbarInputError, match="not a Gaussian mixture"):
        mixture_spec("moons")
    with pytest.raises(HbarInputError):
        load_dataset("gaussian", 10, 0, cov=[[1, 2], [2, 1]])  # not positive definite
    with pytest.raises(HbarInputError):
        load_dataset("mixture1d", 10, 0, weights=[1, -1])
    key = jax.random.PRNGKey(5)
    np.testing.assert_array_equal(load_dataset("rings", 20, key), load_dataset("rings", 20, key))
    assert dataset_entropy("moons") is None


# ---- user files ----------------------------------------------------------------------


def test_load_points_npy_and_csv(tmp_path):
    x = np.random.default_rng(0).normal(size=(30, 3))
    np.save(tmp_path / "x.npy", x)
    np.testing.assert_array_equal(load_points(tmp_path / "x.npy"), x)
    p = tmp_path / "x.csv"
    p.write_text("a,b,c\n" + "\n".join(",".join(repr(float(v)) for v in row) for row in x) + "\n")
    np.testing.assert_array_equal(load_points(p), x)
    np.save(tmp_path / "y.npy", x[:, 0])
    assert load_points(tmp_path / "y.npy").shape == (30, 1)


def test_load_points_errors(tmp_path):
    p = tmp_path / "nan.csv"
    p.write_text("1,2\n3,nan\n5,6\n")
    with pytest.raises(HbarInputError, match="NaN or inf.*row 1"):
        load_points(p)
    p = tmp_path / "ragged.csv"
    p.write_text("1,2\n3,4,5\n")
    with pytest.raises(HbarInputError, match="line 2: 3 columns"):
        load_points(p)
    p = tmp_path / "text.csv"
    p.write_text("1,2\n3,abc\n")
    with pytest.raises(HbarInputError, match="line 2.*'abc'"):
        load_points(p)
    with pytest.raises(HbarInputError, match="not found"):
        load_points(tmp_path / "missing.npy")
    np.save(tmp_path / "cube.npy", np.zeros((2, 3, 4)))
    with pytest.raises(HbarInputError, match="shape"):
        load_points(tmp_path / "cube.npy")
    (tmp_path / "bad.npy").write_bytes(b"this is not numpy")
    with pytest.raises(HbarInputError, match="not a readable .npy"):
        load_points(tmp_path / "bad.npy")
    (tmp_path / "x.parquet").write_bytes(b"")
    with pytest.raises(HbarInputError, match="unsupported file type"):
        load_points(tmp_path / "x.parquet")
    np.save(tmp_path / "inf.npy", np.array([[1.0, np.inf]]))
    with pytest.raises(HbarInputError, match="NaN or inf"):
        load_points(tmp_path / "inf.npy")
    np.save(tmp_path / "ok.npy", np.zeros((4, 2)))
    with pytest.raises(HbarInputError, match="dimension 2, expected 3"):
        load_points(tmp_path / "ok.npy", d=3)
    (tmp_path / "empty.csv").write_text("x,y\n")
    with pytest.raises(HbarInputError, match="no data rows"):
        load_points(tmp_path / "empty.csv")


def test_csv_index_column_is_never_read_silently(tmp_path):
    """A pandas-style index column (to_csv default) is refused with a clear message, or dropped
    when asked; a header line is read as a header."""
    x = np.random.default_rng(0).normal(size=(6, 2))
    p = tmp_path / "pandas.csv"
    p.write_text(",a,b\n" + "".join(f"{i},{r[0]},{r[1]}\n" for i, r in enumerate(x)))
    with pytest.raises(HbarInputError, match="looks like a row index"):
        load_points(p)
    np.testing.assert_allclose(load_points(p, index_col=0), x)
    assert load_points(p, index_col=False).shape == (6, 3)
    q = tmp_path / "noheader.csv"  # no header, but the first column counts the rows
    q.write_text("".join(f"{i},{r[0]},{r[1]}\n" for i, r in enumerate(x)))
    with pytest.raises(HbarInputError, match="counts the rows"):
        load_points(q)
    ok = tmp_path / "plain.csv"
    ok.write_text("a,b\n" + "".join(f"{r[0]},{r[1]}\n" for r in x))
    np.testing.assert_allclose(load_points(ok), x)
    with pytest.raises(HbarInputError, match="index_col=5"):
        load_points(p, index_col=5)


def test_csv_first_row_typo_is_an_error_not_a_header(tmp_path):
    """issue 15: a first data row with a typo ('l.5' for '1.5') was silently taken as a header and lost.
    A header has no numeric field (or pandas' empty first field); a mixed first row is an error
    naming the line and the field."""
    p = tmp_path / "typo.csv"
    p.write_text("l.5,2.0\n3.0,4.0\n5.0,6.0\n")
    with pytest.raises(HbarInputError, match=r"line 1, field 1: cannot read 'l\.5'.*header"):
        load_points(p)
    p.write_text("# x,y\n1.5,2.x\n3.0,4.0\n")  # after a comment line, field 2
    with pytest.raises(HbarInputError, match=r"line 2, field 2: cannot read '2\.x'"):
        load_points(p)
    p.write_text("x,y\n1.5,2.0\n3.0,4.0\n")  # a real header: every field text
    np.testing.assert_array_equal(load_points(p), [[1.5, 2.0], [3.0, 4.0]])
    p.write_text(",0,1\n0,1.5,2.0\n1,3.0,4.0\n")  # pandas' to_csv of an unnamed frame: header ",0,1"
    np.testing.assert_array_equal(load_points(p, index_col=0), [[1.5, 2.0], [3.0, 4.0]])
