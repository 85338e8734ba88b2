"""The command line: a tiny train -> sample -> nll -> path-nll round trip, --out files (strict JSON),
progress and one-line warnings, clear errors. Printed tables are parsed and compared with the same
computation through the API."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from hbar.cli import app

runner = CliRunner()


TINY_NET = '{"name": "paper_mlp", "width": 16, "depth": 2}'


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny model (256 points, a 16-wide network): the --n / --h spellings of train and its --out."""
    d = tmp_path_factory.mktemp("cli")
    res = runner.invoke(app, ["train", "--run-dir", str(d / "run"), "--epochs", "3", "--n", "256", "--batch-size",
                              "64", "--network", TINY_NET, "--h", "0.5,1", "--out", str(d / "train.json")])
    assert res.exit_code == 0, res.output
    assert "path-KL bound" in res.output
    return d


def _strict_json(path):
    """Load a JSON file, refusing NaN / Infinity (not JSON)."""
    def no_constants(name):
        raise AssertionError(f"{path}: non-strict JSON constant {name}")

    return json.loads(path.read_text(), parse_constant=no_constants)


def _table_rows(output: str) -> list[list[str]]:
    """The body rows of the rich tables in ``output`` (cells stripped)."""
    return [[c.strip() for c in line.strip().strip("│").split("│")] for line in output.splitlines()
            if line.strip().startswith("│")]


def test_train_out_and_n(run_dir):
    got = _strict_json(run_dir / "train.json")
    assert got["config"]["n_train"] == 256 and got["epochs_done"] == 3
    kl = got["path_kl_bound"]
    assert [r["h"] for r in kl] == [0.5, 1.0] and all(r["se"] > 0 for r in kl)
    np.testing.assert_allclose([r["factor"] for r in kl], [(1 + h) ** 2 / (8 * h) for h in (0.5, 1.0)])


def test_train_sample_nll_roundtrip(run_dir):
    import jax

    from hbar import nll, sample
    from hbar.data import load_dataset
    from hbar.training import load_checkpoint

    res = runner.invoke(app, ["sample", str(run_dir / "run"), "--h", "0.5", "--n", "64", "--steps", "20",
                              "--out", str(run_dir / "s.npy")])
    assert res.exit_code == 0, res.output
    assert np.load(run_dir / "s.npy").shape == (64, 2)
    score, schedule, _ = load_checkpoint(run_dir / "run")
    # --h is a list everywhere: several h values go to one .npz, common random numbers
    res = runner.invoke(app, ["sample", str(run_dir / "run"), "--h", "0,0.5", "--n", "16", "--steps", "10",
                              "--out", str(run_dir / "s.npz")])
    assert res.exit_code == 0, res.output
    z = np.load(run_dir / "s.npz")
    assert z["samples"].shape == (2, 16, 2) and list(z["h"]) == [0.0, 0.5] and z["valid"].all()
    ref = sample(score, schedule, jax.random.PRNGKey(0), 16, 0.5, steps=10)
    np.testing.assert_allclose(z["samples"][1], ref.samples, rtol=1e-12)
    # EDM's churn sampler as an h(t): the same samples as the API call
    from hbar.sampling import edm_churn

    res = runner.invoke(app, ["sample", str(run_dir / "run"), "--edm-churn", "40,0.05,50", "--n", "16", "--steps",
                              "10", "--out", str(run_dir / "churn.npy")])
    assert res.exit_code == 0, res.output
    ref = sample(score, schedule, jax.random.PRNGKey(0), 16, edm_churn(40, 0.05, 50, 10, schedule), steps=10,
                 grid="edm")
    np.testing.assert_allclose(np.load(run_dir / "churn.npy"), ref.samples, rtol=1e-12)
    assert not np.allclose(ref.samples, sample(score, schedule, jax.random.PRNGKey(0), 16, 0.0, steps=10,
                                                grid="edm").samples)  # the churn really adds noise
    res = runner.invoke(app, ["sample", str(run_dir / "run"), "--edm-churn", "40,0.05", "--out",
                              str(run_dir / "c2.npy")])
    assert res.exit_code != 0 and "S_CHURN,S_TMIN,S_TMAX" in res.output
    x = load_dataset("swiss_roll", 8, seed=3)
    np.save(run_dir / "x.npy", x)
    res = runner.invoke(app, ["nll", str(run_dir / "run"), str(run_dir / "x.npy"), "--order", "1", "--n", "3",
                              "--h", "0.1", "--out", str(run_dir / "nll.json")])
    assert res.exit_code == 0, res.output
    got = _strict_json(run_dir / "nll.json")
    ref = nll(score, schedule, x[:3], order=1)
    np.testing.assert_allclose(got["nll0"], ref.nll0, rtol=1e-10)
    np.testing.assert_allclose(got["c1"], ref.c1, rtol=1e-10)
    assert got["wkb"][0]["h"] == 0.1 and got["wkb"][0]["nll"] == pytest.approx(float(ref.nll(0.1)), rel=1e-10)


def test_path_nll_table_out_progress_and_warnings(run_dir, monkeypatch):
    import jax

    import hbar.cli as cli
    from hbar.path import path_nll
    from hbar.training import load_checkpoint

    x = np.load(run_dir / "x.npy") if (run_dir / "x.npy").exists() else None
    if x is None:
        from hbar.data import load_dataset

        x = load_dataset("swiss_roll", 8, seed=3)
        np.save(run_dir / "x.npy", x)
    args = ["path-nll", str(run_dir / "run"), str(run_dir / "x.npy"), "--h", "0.5,1", "--paths", "16", "--steps",
            "10", "--n", "3", "--out", str(run_dir / "p.json")]
    monkeypatch.setattr(cli, "LOW_ESS", 1.01)  # every row counts as low ESS
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "path-integral NLL (points x h): 6/6" in res.output  # plain progress line (not a terminal)
    score, schedule, _ = load_checkpoint(run_dir / "run")
    ref = path_nll(score, schedule, x[:3], [0.5, 1.0], jax.random.PRNGKey(0), n_paths=16, steps=10)
    rows = _table_rows(res.output)
    assert [r[0] for r in rows] == ["0.5", "1"]
    for i, (_h, val, mc_se, bias, ess_min, ess_med, flags) in enumerate(rows):
        mean, se = (float(v) for v in val.split("±"))
        np.testing.assert_allclose([mean, se, float(mc_se)], [ref.nll[i], ref.se[i], ref.mc_se[i]], atol=5.1e-5)
        np.testing.assert_allclose(float(bias), ref.bias[i], rtol=0.01)
        np.testing.assert_allclose([float(ess_min), float(ess_med)], [ref.ess_min[i], ref.ess_median[i]], atol=5.1e-3)
        assert flags == "low ESS"
    lines = [ln for ln in res.output.splitlines() if ln.startswith("warning: path-nll")]
    assert len(lines) == 2 and all("low ESS" in ln and "< 1.01" in ln for ln in lines)
    got = _strict_json(run_dir / "p.json")
    assert got["mode"] == "fixed" and got["low_ess_threshold"] == 1.01 and len(got["warnings"]) == 2
    np.testing.assert_allclose([r["nll"] for r in got["rows"]], ref.nll, rtol=1e-12)
    np.testing.assert_allclose(got["points"][1]["nll"], ref.results[1].nll, rtol=1e-12)
    monkeypatch.setattr(cli, "LOW_ESS", 0.0)
    res = runner.invoke(app, args)
    assert res.exit_code == 0 and "warning" not in res.output and "low ESS" not in res.output
    # the controller: an unreachable tolerance is flagged in the table, in one warning line and in the JSON
    res = runner.invoke(app, ["path-nll", str(run_dir / "run"), str(run_dir / "x.npy"), "--h", "0.5", "--paths", "8",
                              "--steps", "4", "--max-steps", "8", "--tol", "1e-9", "--n", "2",
                              "--out", str(run_dir / "pc.json")], env={"COLUMNS": "200"})  # ten columns: no wrapping
    assert res.exit_code == 0, res.output
    row = _table_rows(res.output)[0]
    assert row[4] == "NO" and row[-1].startswith("not")  # cells may wrap or be cut at 80 columns: values from JSON
    assert sum(ln.startswith("warning: path-nll h=0.5: not converged") for ln in res.output.splitlines()) == 1
    got = _strict_json(run_dir / "pc.json")
    assert got["mode"] == "converged" and got["rows"][0]["converged"] is False
    assert got["rows"][0]["total_error"] > 0 and np.isfinite(got["rows"][0]["nll"])
    assert "not converged" in got["rows"][0]["flags"]


def test_output_paths_checked_before_computing(run_dir, tmp_path):
    run = str(run_dir / "run")
    x = str(run_dir / "s.npy") if (run_dir / "s.npy").exists() else None
    if x is None:
        np.save(tmp_path / "x.npy", np.zeros((4, 2)))
        x = str(tmp_path / "x.npy")
    for args, msg in [
        (["path-nll", run, x, "--out", str(tmp_path / "no" / "p.json")], "does not exist"),
        (["path-nll", run, x, "--out", str(tmp_path / "p.txt")], "must end in .json"),
        (["nll", run, x, "--out", str(tmp_path)], "must end in .json"),
        (["nll", run, x, "--out", str(tmp_path / "no" / "n.json")], "does not exist"),
        (["sample", run, "--h", "0.5,1", "--out", str(tmp_path / "s.npy")], ".npz"),
        (["sample", run, "--out", str(tmp_path / "no" / "s.npy")], "does not exist"),
        (["train", "--run-dir", str(tmp_path / "r"), "--out", str(tmp_path / "no" / "t.json")], "does not exist"),
    ]:
        res = runner.invoke(app, args)
        assert res.exit_code == 2 and msg in res.output, (args, res.output)
        assert res.output.startswith("error: ") and res.output.count("\n") == 1, res.output  # one line, first
    assert not (tmp_path / "r").exists()


def test_strict_json_writer(tmp_path):
    from hbar.cli import _write_json

    _write_json(tmp_path / "a.json", {"x": float("nan"), "y": np.array([1.0, np.inf, 2.0]), "z": np.float32(0.5)})
    assert _strict_json(tmp_path / "a.json") == {"x": None, "y": [1.0, None, 2.0], "z": 0.5}


def test_help_documents_the_shared_options():
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0
    text = " ".join(res.output.split())
    assert "Options mean the same in every command: --n N is the number of points" in text
    assert "--h H1,H2,... is a list of noise strengths" in text


def test_clear_errors(run_dir, tmp_path):
    bad = tmp_path / "bad.csv"
    np.savetxt(bad, np.array([[1.0, 2.0], [np.nan, 1.0]]), delimiter=",")
    res = runner.invoke(app, ["nll", str(run_dir / "run"), str(bad)])
    assert res.exit_code == 2 and "NaN" in res.output
    d3 = tmp_path / "d3.npy"
    np.save(d3, np.zeros((4, 3)))
    res = runner.invoke(app, ["nll", str(run_dir / "run"), str(d3)])
    assert res.exit_code == 2 and "dimension" in res.output
    res = runner.invoke(app, ["sample", str(run_dir / "run"), "--h", "-0.5"])
    assert res.exit_code == 2 and ">= 0" in res.output
    res = runner.invoke(app, ["sample", str(tmp_path / "nope")])
    assert res.exit_code == 2 and "not found" in res.output
    cfg = tmp_path / "cfg.json"
    cfg.write_text('{"dataset": "swiss_roll", "lr": -1}')
    res = runner.invoke(app, ["train", "--config", str(cfg), "--run-dir", str(tmp_path / "r")])
    assert res.exit_code == 2 and "lr" in res.output


def test_datasets_lists_entropies():
    from hbar.data import DATASETS, dataset_dim, dataset_entropy

    res = runner.invoke(app, ["datasets"])
    assert res.exit_code == 0, res.output
    rows = {r[0]: r[1:] for r in _table_rows(res.output)}
    assert list(rows) == list(DATASETS)
    assert rows["swiss_roll"][0] == "2" and rows["digits"][0] == str(dataset_dim("digits"))
    n_known = 0
    for name, (_, ent) in rows.items():
        try:
            want = dataset_entropy(name)
        except Exception:  # unknown or needs parameters: printed as "-"
            want = None
        if want is None:
            assert ent == "-", name
            continue
        mean, se = (float(v) for v in ent.split("±"))
        np.testing.assert_allclose([mean, se], want, atol=5.1e-4, err_msg=name)
        n_known += 1
    assert n_known >= 4


# --- the new user's first hour: version, demo report, training flags, progress, cautions ----------

def test_version():
    import hbar

    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output.strip() == f"hbar {hbar.__version__}"


def test_demo_report_printed_verbatim(tmp_path, monkeypatch):
    """rich markup must not eat [...] in the report (drift of the formula, figure links)."""
    from hbar.studies import paper2024

    text = "dx = [ f(t) x - (1+h)/2 g(t)^2 s ] dt + sqrt(h) g dw\n![NLL(h)](figures/nll.png)\n[bold]x[/bold]\n"

    def fake_demo(output, quick, seed, progress):
        progress("stage", 1, 1)
        (output / "report.md").write_text(text)

    monkeypatch.setattr(paper2024, "run_demo", fake_demo)
    (tmp_path / "demo").mkdir()
    res = runner.invoke(app, ["demo", "--out", str(tmp_path / "demo")])
    assert res.exit_code == 0, res.output
    assert text in res.output


def test_train_flags_on_a_small_user_csv(tmp_path):
    """--data-path with fewer rows than the old default n_train, a pandas index column, --batch-size,
    --lr, --network; plain progress lines off a terminal; the stored path is absolute."""
    x = np.random.default_rng(0).normal(size=(40, 2))
    p = tmp_path / "pts.csv"
    p.write_text(",a,b\n" + "".join(f"{i},{r[0]},{r[1]}\n" for i, r in enumerate(x)))
    args = ["train", "--data-path", str(p), "--run-dir", str(tmp_path / "run"), "--epochs", "3",
            "--batch-size", "8", "--lr", "0.002", "--network", '{"name": "paper_mlp", "width": 8, "depth": 1}',
            "--kl-h", "1"]  # the old spelling of --h still works
    res = runner.invoke(app, args)
    assert res.exit_code == 2 and "looks like a row index" in res.output and "training" not in res.output
    res = runner.invoke(app, args + ["--index-col", "0"])
    assert res.exit_code == 0, res.output
    assert "training (loss" in res.output  # plain progress line (not a terminal)
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["data_path"] == str(p) and cfg["n_train"] is None and cfg["lr"] == 0.002
    assert cfg["batch_size"] == 8 and cfg["network"]["width"] == 8 and cfg["index_col"] == 0
    res = runner.invoke(app, args + ["--index-col", "0"])
    assert res.exit_code == 2 and "--resume" in res.output


def test_nll_order2_cautions(run_dir):
    x = np.load(run_dir / "x.npy") if (run_dir / "x.npy").exists() else None
    if x is None:
        from hbar.data import load_dataset

        np.save(run_dir / "x.npy", load_dataset("swiss_roll", 8, seed=3))
    res = runner.invoke(app, ["nll", str(run_dir / "run"), str(run_dir / "x.npy"), "--order", "2", "--n", "1",
                              "--h", "0.1,50", "--rtol", "1e-3", "--atol", "1e-3"])
    assert res.exit_code == 0, res.output
    assert "warning: NLL(h=50) WKB-2 is outside the series' range of validity" in res.output
