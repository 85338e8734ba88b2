"""The README's examples run: every ```python block in a fresh interpreter in an empty
directory, and the ```bash command block through the CLI."""

import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_examples():
    assert len(_blocks("python")) >= 4 and len(_blocks("bash")) == 1


@pytest.mark.parametrize("i", range(len(_blocks("python"))))
def test_readme_python_block_runs(i, tmp_path):
    code = _blocks("python")[i]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env=env)
    assert proc.returncode == 0, f"README block {i} failed:\n{code}\n--- stderr ---\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr


def test_readme_cli_block_runs(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from hbar.cli import app

    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    for line in _blocks("bash")[0].strip().splitlines():
        args = shlex.split(line)
        assert args[0] == "hbar", line
        res = runner.invoke(app, args[1:])
        assert res.exit_code == 0, f"{line}\n{res.output}"
    assert (tmp_path / "samples.npy").exists() and (tmp_path / "nll.json").exists()
