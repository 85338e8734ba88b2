"""The README's examples run.

Default suite (fast): every ```python block and the ```bash command block, with small sizes
(the textual replacements below; each must still match the README, so an edited example is
noticed), python blocks executed in this process in an empty directory. ``pytest -m slow``:
every block exactly as written, each python block in a fresh interpreter."""

import contextlib
import io
import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"

#: small sizes for the default suite: per python block, (README text, replacement)
SMALL_PY = {
    "hbar.PerturbedScore(exact, eps=0.05)": [
        ("n=500, h=0.5, steps=100", "n=50, h=0.5, steps=10"),
        # the 1-D mixture of the next block: its order-2 derivatives compile once for both blocks
        ('mixture_spec("25gaussians")', 'mixture_spec("mixture1d")'),
        ('load_dataset("25gaussians", 4, seed=1)', 'load_dataset("mixture1d", 1, seed=1)'),
    ],
    "fokker_planck_nll": [('load_dataset("mixture1d", 50, seed=1)', 'load_dataset("mixture1d", 1, seed=1)'),
                          ("tol=1e-2", "tol=5e-2")],
    "TrainConfig(dataset=": [("n_train=1000, batch_size=250, epochs=20", "n_train=64, batch_size=32, epochs=2")],
    "from_eps": [],
    "TrainConfig.images(": [
        ('TrainConfig.images("mnist5k", epochs=3)', 'TrainConfig.images("digits8x8", epochs=1, n_train=64, batch_size=32, '
         'network={"name": "unet", "base_channels": 4, "channel_mults": [1], "blocks": 1, "groups": 2, "embed_dim": 8})'),
        ('load_images("mnist5k", "test", n=4)', 'load_images("digits8x8", "test", n=2)'),
        ('order=1, method="one-loop", key=jax.random.PRNGKey(1))', 'order=0, key=jax.random.PRNGKey(1))'),
    ],
    "converged_path_nll": [("size=8)", "size=2)"), ("[0.5, 1.0], jax", "[1.0], jax"),
                           ("tol=0.01)", "tol=0.2, steps0=50, max_steps=200, max_paths=512)")],
    "h_window(": [("n=500, h=churn, steps=100", "n=50, h=churn, steps=10"), ("n=200, h=1.0", "n=20, h=1.0")],
}
SMALL_CLI = [("--epochs 20", "--epochs 2 --n 256 --batch-size 64 --h 1"), ("--epochs 30", "--epochs 3"),
             ("--n 500 --steps 100", "--n 20 --steps 10"), ("--n 5 --order 1", "--n 1 --order 0"),
             ("--n 5 --paths 64 --steps 50", "--n 2 --paths 8 --steps 5")]


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), flags=re.S)


def _small(text: str, replacements: list[tuple[str, str]]) -> str:
    for old, new in replacements:
        assert old in text, f"README example changed: {old!r} not found; update tests/test_readme.py"
        text = text.replace(old, new)
    return text


def _run_cli_block(block: str, replacements: list[tuple[str, str]]) -> None:
    from typer.testing import CliRunner

    from hbar.cli import app

    runner = CliRunner()
    for line in block.strip().splitlines():
        args = shlex.split(_small(line, [(o, n) for o, n in replacements if o in line]))
        assert args[0] == "hbar", line
        res = runner.invoke(app, args[1:])
        assert res.exit_code == 0, f"{line}\n{res.output}"


def test_readme_has_examples():
    assert len(_blocks("python")) >= 4 and len(_blocks("bash")) == 1
    for block in _blocks("python"):
        assert sum(marker in block for marker in SMALL_PY) == 1, f"no small-size recipe for:\n{block}"


# the image block compiles a U-Net training step and its likelihood (~25 s even at small sizes):
# slow suite, where it also runs as written
@pytest.mark.parametrize("i", [pytest.param(i, marks=pytest.mark.slow) if "TrainConfig.images(" in b else i
                               for i, b in enumerate(_blocks("python"))])
def test_readme_python_block_small(i, tmp_path, monkeypatch):
    """Each python block with small sizes, in this process (no interpreter start-up per block;
    one test per block, so that the workers share them)."""
    block = _blocks("python")[i]
    (marker,) = [m for m in SMALL_PY if m in block]
    code = _small(block, SMALL_PY[marker])
    monkeypatch.chdir(tmp_path)
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        exec(compile(code, f"README.md python block {i}", "exec"), {"__name__": "__readme__"})
    assert printed.getvalue().strip(), f"block {i} printed nothing"


@pytest.mark.slow
def test_readme_cli_block_small(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _run_cli_block(_blocks("bash")[0], SMALL_CLI)
    for f in ("samples.npy", "churn.npy", "family.npz", "nll.json", "path_nll.json"):
        assert (tmp_path / f).exists(), f


@pytest.mark.slow
@pytest.mark.parametrize("i", range(len(_blocks("python"))))
def test_readme_python_block_runs(i, tmp_path):
    code = _blocks("python")[i]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=1200,
                          env=env)
    assert proc.returncode == 0, f"README block {i} failed:\n{code}\n--- stderr ---\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_readme_cli_block_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _run_cli_block(_blocks("bash")[0], [])
    for f in ("samples.npy", "churn.npy", "family.npz", "nll.json", "path_nll.json"):
        assert (tmp_path / f).exists(), f
