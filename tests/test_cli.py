"""The command line: a tiny train -> sample -> nll -> path-nll round trip and clear errors.
Printed tables are parsed and compared with the same computation through the API."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from hbar.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    res = runner.invoke(app, ["train", "--run-dir", str(d / "run"), "--epochs", "4", "--kl-h", "0.5,1"])
    assert res.exit_code == 0, res.output
    assert "path-KL bound" in res.output
    return d


def _table_rows(output: str) -> list[list[str]]:
    """The body rows of the rich tables in ``output`` (cells stripped)."""
    return [[c.strip() for c in line.strip().strip("│").split("│")] for line in output.splitlines()
            if line.strip().startswith("│")]


def test_train_sample_nll_roundtrip(run_dir):
    import jax

    from hbar import nll
    from hbar.data import load_dataset
    from hbar.path import path_nll
    from hbar.training import load_checkpoint

    res = runner.invoke(app, ["sample", str(run_dir / "run"), "--h", "0.5", "--n", "64", "--steps", "20",
                              "--out", str(run_dir / "s.npy")])
    assert res.exit_code == 0, res.output
    assert np.load(run_dir / "s.npy").shape == (64, 2)
    x = load_dataset("swiss_roll", 8, seed=3)
    np.save(run_dir / "x.npy", x)
    res = runner.invoke(app, ["nll", str(run_dir / "run"), str(run_dir / "x.npy"), "--order", "1",
                              "--out", str(run_dir / "nll.json")])
    assert res.exit_code == 0, res.output
    got = json.loads((run_dir / "nll.json").read_text())
    score, schedule, _ = load_checkpoint(run_dir / "run")
    ref = nll(score, schedule, x, order=1)
    np.testing.assert_allclose(got["nll0"], ref.nll0, rtol=1e-10)
    np.testing.assert_allclose(got["c1"], ref.c1, rtol=1e-10)
    res = runner.invoke(app, ["path-nll", str(run_dir / "run"), str(run_dir / "x.npy"), "--h", "0.5",
                              "--paths", "16", "--steps", "10", "--n", "3"])
    assert res.exit_code == 0, res.output
    rows = _table_rows(res.output)
    assert [r[0] for r in rows] == ["0.5"]
    ref = path_nll(score, schedule, x[:3], [0.5], jax.random.PRNGKey(0), n_paths=16, steps=10)
    h, val, se, bias, ess_min, ess_med = rows[0]
    np.testing.assert_allclose(float(val), ref.nll[0], atol=5.1e-5)
    np.testing.assert_allclose(float(se), ref.se[0], atol=5.1e-5)
    np.testing.assert_allclose(float(bias), ref.bias[0], rtol=0.01)
    np.testing.assert_allclose([float(ess_min), float(ess_med)], [ref.ess_min[0], ref.ess_median[0]], atol=5.1e-3)


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
            "--kl-h", "1"]
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
    res = runner.invoke(app, ["nll", str(run_dir / "run"), str(run_dir / "x.npy"), "--order", "2", "--n", "2",
                              "--h", "0.1,50"])
    assert res.exit_code == 0, res.output
    assert "warning: NLL(h=50) WKB-2 is outside the series' range of validity" in res.output
