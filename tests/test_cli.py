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
    monkeypatch.setattr(cli.out, "width", 200)  # one table row per line
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "path-integral NLL (points x h): 6/6" in res.output  # plain progress line (not a terminal)
    score, schedule, _ = load_checkpoint(run_dir / "run")
    ref = path_nll(score, schedule, x[:3], [0.5, 1.0], jax.random.PRNGKey(0), n_paths=16, steps=10)
    rows = _table_rows(res.output)
    assert [r[0] for r in rows] == ["0.5", "1"]
    for i, (_h, val, mc_se, bias, ess_min, ess_med, khat, flags) in enumerate(rows):
        assert khat == "nan"  # 16 paths: a tail of 3 weights is too short to fit
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
    assert row[4] == "NO" and "not converged" in row[-1]  # cells may wrap or be cut at 80 columns: values from JSON
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


@pytest.mark.slow  # a long check (CI default suite budget); run with pytest -m slow
def test_nll_order2_cautions(run_dir):
    x = np.load(run_dir / "x.npy") if (run_dir / "x.npy").exists() else None
    if x is None:
        from hbar.data import load_dataset

        np.save(run_dir / "x.npy", load_dataset("swiss_roll", 8, seed=3))
    res = runner.invoke(app, ["nll", str(run_dir / "run"), str(run_dir / "x.npy"), "--order", "2", "--n", "1",
                              "--h", "0.1,50", "--rtol", "1e-3", "--atol", "1e-3"])
    assert res.exit_code == 0, res.output
    assert "warning: NLL(h=50) WKB-2 is outside the series' range of validity" in res.output


# --- issue 15: every input checked before computing, nothing finished is lost ----------------------

def _one_error_line(res, msg):
    assert res.exit_code == 2, res.output
    assert res.output.startswith("error: ") and res.output.count("\n") == 1, res.output  # one line, nothing before
    assert msg in res.output, res.output


def test_values_and_paths_checked_before_computing(run_dir, tmp_path):
    run, x = str(run_dir / "run"), str(tmp_path / "x.npy")
    np.save(x, np.zeros((4, 2)))
    afile = tmp_path / "afile"
    afile.write_text("x")
    (tmp_path / "empty_run").mkdir()
    tiny = ["--epochs", "1", "--n", "64", "--batch-size", "32", "--network", TINY_NET]
    for args, msg in [
        (["nll", run, x, "--order", "1", "--h", "-0.1"], "--h must be >= 0"),
        (["nll", run, x, "--n", "-1"], "--n must be a positive integer"),
        (["nll", run, x, "--n", "0"], "--n must be a positive integer"),
        (["nll", run, x, "--rtol", "inf"], "--rtol must be finite"),
        (["nll", run, x, "--atol", "0"], "--atol must be a finite positive number"),
        (["nll", run, x, "--bound", "0"], "--bound must be a number > 0 (or inf for no bound)"),
        (["nll", run, x, "--seed", str(2**32)], "--seed must be an integer in [0, 2**32 - 1]"),
        (["nll", run, x, "--out", str(tmp_path)], "must end in .json"),
        (["nll", run, x, "--out", str(tmp_path / "no" / "n.json")], "does not exist"),
        (["nll", str(afile), x], "is a file, not a training run directory"),
        (["path-nll", run, x, "--n", "-1"], "--n must be a positive integer"),
        (["path-nll", run, x, "--seed", "-1"], "--seed must be an integer"),
        (["sample", run, "--seed", str(2**32), "--out", str(tmp_path / "s.npy")], "--seed must be an integer"),
        (["sample", run, "--seed", "-1", "--out", str(tmp_path / "s.npy")], "--seed must be an integer"),
        (["sample", run, "--n", "-1", "--out", str(tmp_path / "s.npy")], "--n must be a positive integer"),
        (["sample", run, "--batch-size", "0", "--out", str(tmp_path / "s.npy")], "--batch-size must be a positive"),
        (["sample", run, "--out", str(tmp_path / "s.txt")], "must end in .npy or .npz"),
        (["sample", run, "--out", str(tmp_path / "no" / "s.npy")], "does not exist"),
        (["sample", str(afile), "--out", str(tmp_path / "s.npy")], "is a file, not a training run directory"),
        (["train", "--run-dir", str(tmp_path / "r"), "--kl-h", "0"] + tiny, "--h must be > 0"),
        (["train", "--run-dir", str(tmp_path / "r"), "--seed", str(2**32)] + tiny, "--seed must be an integer"),
        (["train", "--run-dir", str(afile)] + tiny, "is an existing file"),
        (["train", "--run-dir", str(tmp_path / "empty_run"), "--resume"], "holds no config.json"),
        (["train", "--run-dir", str(tmp_path / "nowhere"), "--resume"], "holds no config.json"),
        (["demo", "--out", str(afile)], "is an existing file"),
        (["reproduce", "--out", str(tmp_path / "rep"), "--seed", str(2**32)], "--seed must be an integer"),
    ]:
        _one_error_line(runner.invoke(app, args), msg)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "empty_run", "x.npy"]  # nothing written
    assert not list((tmp_path / "empty_run").iterdir())


def test_sample_batch_size_writes_exactly_the_printed_file(run_dir, tmp_path):
    import jax

    from hbar import sample
    from hbar.training import load_checkpoint

    out = tmp_path / "s.npy"
    res = runner.invoke(app, ["sample", str(run_dir / "run"), "--n", "6", "--steps", "5", "--batch-size", "2",
                              "--out", str(out)])
    assert res.exit_code == 0, res.output
    printed = "".join(res.output.split())  # the console may wrap a long path
    assert printed.endswith(f"->{out}") and sorted(p.name for p in tmp_path.iterdir()) == ["s.npy"]
    score, schedule, _ = load_checkpoint(run_dir / "run")
    ref = sample(score, schedule, jax.random.PRNGKey(0), 6, 1.0, steps=5, batch_size=2)
    np.testing.assert_allclose(np.load(out), ref.samples, rtol=1e-12)


def test_train_into_a_locked_run_dir_is_refused(tmp_path):
    from hbar.locking import run_lock

    with run_lock(tmp_path / "r", "someone else"):
        res = runner.invoke(app, ["train", "--run-dir", str(tmp_path / "r"), "--epochs", "1", "--n", "64",
                                  "--batch-size", "32", "--network", TINY_NET])
        assert res.exit_code == 2 and "is in use by pid" in res.output and "someone else" in res.output, res.output
        assert "training (loss" not in res.output  # refused before any training step
        assert sorted(p.name for p in (tmp_path / "r").iterdir()) == [".hbar.lock"]


def test_edited_config_refused_unless_allowed(run_dir, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run_dir / "run", run)
    cfg = json.loads((run / "config.json").read_text())
    cfg["schedule"] = {"name": "cosine"}
    (run / "config.json").write_text(json.dumps(cfg))
    np.save(tmp_path / "x.npy", np.zeros((2, 2)))
    res = runner.invoke(app, ["nll", str(run), str(tmp_path / "x.npy")])
    _one_error_line(res, "different config")
    assert "schedule" in res.output and "--allow-config-mismatch" in res.output
    res = runner.invoke(app, ["nll", str(run), str(tmp_path / "x.npy"), "--allow-config-mismatch"])
    assert res.exit_code == 0, res.output
    assert sum(ln.startswith("warning: ") and "loaded anyway" in ln for ln in res.output.splitlines()) == 1


def _x8(run_dir):
    from hbar.data import load_dataset

    np.save(run_dir / "x8.npy", load_dataset("swiss_roll", 8, seed=3))
    return run_dir / "x8.npy"


def test_nll_in_chunks_and_ctrl_c_keeps_finished_points(run_dir, tmp_path, monkeypatch):
    """Ctrl-C during `hbar nll` kept none of the finished points. Now the points run in chunks;
    an interrupt writes the finished ones (strict JSON, "partial": true) and says so."""
    import hbar
    import hbar.cli as cli
    from hbar.training import load_checkpoint

    x = _x8(run_dir)
    score, schedule, _ = load_checkpoint(run_dir / "run")
    ref = hbar.nll(score, schedule, np.load(x)[:6])
    monkeypatch.setattr(cli, "NLL_CHUNK", 2)
    res = runner.invoke(app, ["nll", str(run_dir / "run"), str(x), "--n", "6", "--out", str(tmp_path / "a.json")])
    assert res.exit_code == 0, res.output
    got = _strict_json(tmp_path / "a.json")
    assert got["partial"] is False and got["n_done"] == got["n_total"] == 6 and got["summary"]["n"] == 6
    # chunks of 2 instead of one batch of 6: equal to the solver tolerance (adaptive steps are per batch)
    np.testing.assert_allclose(got["nll0"], ref.nll0, rtol=1e-4)
    real, calls = hbar.nll, []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(hbar, "nll", interrupted)
    res = runner.invoke(app, ["nll", str(run_dir / "run"), str(x), "--n", "6", "--out", str(tmp_path / "p.json")],
                        env={"COLUMNS": "200"})
    assert res.exit_code == 130, res.output
    assert "PARTIAL: 4 of 6 points" in " ".join(res.output.split())
    assert "interrupted: 4 of 6 points finished; partial results written to" in " ".join(res.output.split())
    part = _strict_json(tmp_path / "p.json")
    assert part["partial"] is True and part["n_done"] == 4 and part["n_total"] == 6 and "interrupted" in part["note"]
    np.testing.assert_array_equal(part["nll0"], got["nll0"][:4])
    calls.clear()
    res = runner.invoke(app, ["nll", str(run_dir / "run"), str(x), "--n", "6"], env={"COLUMNS": "200"})  # no --out
    assert res.exit_code == 130 and "PARTIAL: 4 of 6" in res.output and "no file written" in res.output


def test_output_error_keeps_the_results(run_dir, tmp_path, monkeypatch):
    """An output that fails after the computation (folder removed meanwhile, disk full) keeps
    the results in a rescue file and says where; the nll JSON is strict (null for NaN)."""
    import hbar.serialization as ser

    real = ser.atomic_write

    def failing(path, data):
        if "gone" in str(path):
            raise OSError(28, "No space left on device")
        return real(path, data)

    monkeypatch.setattr(ser, "atomic_write", failing)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    (tmp_path / "gone").mkdir()
    x = _x8(run_dir)
    res = runner.invoke(app, ["nll", str(run_dir / "run"), str(x), "--n", "2", "--bound", "1e-9",
                              "--out", str(tmp_path / "gone" / "n.json")], env={"COLUMNS": "500"})
    assert res.exit_code == 2 and "No space left on device" in res.output, res.output
    rescue = [p for p in tmp_path.iterdir() if p.name.startswith("hbar-rescue-")]
    assert len(rescue) == 1 and f"the results are kept in {rescue[0]}" in res.output
    got = _strict_json(rescue[0])  # every point failed the bound: the means are NaN -> null
    assert got["summary"]["n_failed"] == 2 and got["summary"]["nll0"] == [None, None]


def test_sample_ctrl_c_keeps_finished_h_values(run_dir, tmp_path, monkeypatch):
    import hbar

    real, calls = hbar.sample, []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(hbar, "sample", interrupted)
    out = tmp_path / "s.npz"
    res = runner.invoke(app, ["sample", str(run_dir / "run"), "--h", "0,1", "--n", "4", "--steps", "5", "--out",
                              str(out)])
    assert res.exit_code == 130 and "1 of 2 h values finished" in res.output, res.output
    z = np.load(out)
    assert bool(z["partial"]) and list(z["h"]) == [0.0] and z["samples"].shape == (1, 4, 2)


def test_interrupt_message_says_what_was_kept(run_dir, tmp_path, monkeypatch):
    """The old message claimed finished work was kept for every command; now it says what is."""
    import hbar.path
    import hbar.training

    def stop(*a, **k):
        raise KeyboardInterrupt

    x = _x8(run_dir)
    monkeypatch.setattr(hbar.path, "path_nll", stop)
    res = runner.invoke(app, ["path-nll", str(run_dir / "run"), str(x), "--n", "2"])
    assert res.exit_code == 130 and res.output.strip().endswith("interrupted: nothing was written"), res.output
    monkeypatch.setattr(hbar.training, "train", stop)
    res = runner.invoke(app, ["train", "--run-dir", str(tmp_path / "r"), "--n", "64", "--batch-size", "32"],
                        env={"COLUMNS": "300"})
    assert res.exit_code == 130 and f"checkpointed in {tmp_path / 'r'}" in res.output and "--resume" in res.output


def test_sample_default_bound_is_at_the_scale_of_the_training_data(run_dir, tmp_path, monkeypatch):
    """Without --bound the sampler's divergence bound is 100 (prior std + max |x_train|), so a model of
    data far from the origin is not flagged for being there (docs/theory.md section 14.1)."""
    import hbar
    from hbar.schedules import default_bound
    from hbar.training import load_checkpoint, make_training_data

    seen = []
    real = hbar.sample

    def spy(*args, **kwargs):
        seen.append(kwargs["bound"])
        return real(*args, **kwargs)

    monkeypatch.setattr(hbar, "sample", spy)
    res = runner.invoke(app, ["sample", str(run_dir / "run"), "--n", "4", "--steps", "3", "--out", str(tmp_path / "s.npy")])
    assert res.exit_code == 0, res.output
    _, schedule, cfg = load_checkpoint(run_dir / "run")
    scale = float(np.max(np.abs(make_training_data(cfg)[0])))
    assert scale > 1.5 and seen == [default_bound(schedule, scale)]


def test_study_images_command_checks_its_folder_and_calls_the_study(tmp_path, monkeypatch):
    """`hbar study images`: a results folder that is an existing file is refused before anything runs;
    otherwise the study driver gets the data set, the folder and the seed."""
    f = tmp_path / "a_file"
    f.write_text("x")
    _one_error_line(runner.invoke(app, ["study", "images", "--out", str(f)]), "is an existing file")
    import hbar.studies.images as study

    calls = []

    def fake(out, quick, seed, progress, dataset):
        calls.append((str(out), quick, seed, dataset))
        (tmp_path / "r" / "report.md").parent.mkdir(exist_ok=True)
        (tmp_path / "r" / "report.md").write_text("# report\n")

    monkeypatch.setattr(study, "run_images", fake)
    res = runner.invoke(app, ["study", "images", "--dataset", "fashion_mnist", "--out", str(tmp_path / "r"), "--seed", "3"])
    assert res.exit_code == 0, res.output
    assert calls == [(str(tmp_path / "r"), False, 3, "fashion_mnist")] and "report" in res.output


def test_path_flags_name_heavy_tails():
    """A row whose k-hat is above the threshold for its path count is flagged 'heavy tails'."""
    from hbar.cli import _path_flags

    assert _path_flags(0.5, True, 0.69, 4096) == []
    assert _path_flags(0.5, True, 0.75, 4096) == ["heavy tails"]
    assert _path_flags(0.5, False, 0.6, 256) == ["heavy tails", "not converged"]  # threshold 0.585 at 256 paths
    assert _path_flags(0.01, None, float("nan"), 16) == ["low ESS"]
