"""The ``hbar`` command line: train, sample, nll, path-nll, demo, reproduce, datasets.

Every command runs in float64 (likelihoods need it; switched on for the command only, with
``jax.enable_x64``); bad input ends with a one-line message naming the problem and exit code 2,
never with a traceback or a silent number. ``demo`` and ``reproduce`` load the study package
:mod:`hbar.studies.paper2024` (docs/theory.md section 10) only when they run.
"""

from __future__ import annotations

import json
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="hbar: diffusion models in the path-integral picture (h = noise strength; "
                       "h = 1 reverse SDE, h = 0 probability-flow ODE).")
console = Console(stderr=True)
out = Console()


@contextmanager
def _errors():
    """Run a command body in float64 and turn library input errors into a clear message and
    exit code 2."""
    import jax

    from hbar.validation import HbarInputError

    try:
        with jax.enable_x64(True):
            yield
    except HbarInputError as err:
        console.print(f"[bold red]error:[/] {err}")
        raise typer.Exit(code=2) from None
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]: finished stages and checkpoints are kept; rerun the same "
                      "command (with --resume for train) to continue")
        raise typer.Exit(code=130) from None


def _progress() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False)


class _StageBars:
    """Adapter: progress(stage, done, total) -> one rich bar per stage."""

    def __init__(self, prog: Progress):
        self.prog, self.tasks = prog, {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage not in self.tasks:
            self.tasks[stage] = self.prog.add_task(stage, total=total)
        self.prog.update(self.tasks[stage], completed=done, total=total)


def _parse_floats(text: str, name: str) -> list[float]:
    from hbar.validation import HbarInputError

    try:
        vals = [float(v) for v in text.replace(" ", "").split(",") if v != ""]
    except ValueError:
        raise HbarInputError(f"{name} must be a comma-separated list of numbers, got {text!r}") from None
    if not vals:
        raise HbarInputError(f"{name} is empty")
    return vals


def _fmt(ms: tuple[float, float] | None) -> str:
    return "-" if ms is None else f"{ms[0]:.4f} ± {ms[1]:.4f}"


def _load_model_and_data(run_dir: Path, data: Path, n: int | None):
    from hbar.data import load_points
    from hbar.training import check_dimension, load_checkpoint

    score, schedule, cfg = load_checkpoint(run_dir)
    x = load_points(str(data))
    check_dimension(x, run_dir)
    if n is not None:
        x = x[:n]
    return score, schedule, cfg, x


@app.command()
def train(
    config: Annotated[Path | None, typer.Option(help="TrainConfig as .json or .toml")] = None,
    run_dir: Annotated[Path, typer.Option(help="where config, checkpoints and losses go")] = Path("runs/train"),
    dataset: Annotated[str | None, typer.Option(help="data set name (see `hbar datasets`)")] = None,
    data_path: Annotated[Path | None, typer.Option(help="user data (.npy or .csv) instead of a data set")] = None,
    schedule: Annotated[str | None, typer.Option(help="simple | cosine | vp-linear | ve | ou")] = None,
    epochs: Annotated[int | None, typer.Option(help="override the number of epochs")] = None,
    paper: Annotated[bool, typer.Option(help="the paper's setting: 3000 points, batch 512, lr 1e-3, 16000 epochs")] = False,
    resume: Annotated[bool, typer.Option(help="continue an interrupted run in run-dir")] = False,
    overwrite: Annotated[bool, typer.Option(help="replace an existing run in run-dir")] = False,
    kl_h: Annotated[str, typer.Option(help="h values for the path-KL bound report")] = "0.25,1,2",
    seed: Annotated[int | None, typer.Option()] = None,
) -> None:
    """Train a score network by denoising score matching (g^2 weighting by default)."""
    with _errors():
        import jax

        from hbar.path import path_kl_bound
        from hbar.training import TrainConfig, make_training_data
        from hbar.training import train as run_train

        overrides: dict[str, Any] = {}
        if dataset is not None:
            overrides.update(dataset=dataset, data_path=None)
        if data_path is not None:
            overrides.update(data_path=str(data_path), dataset=None)
        if schedule is not None:
            overrides["schedule"] = {"name": schedule}
        if epochs is not None:
            overrides["epochs"] = epochs
        if seed is not None:
            overrides["seed"] = seed
        if config is not None:
            cfg = TrainConfig.load(config)
            cfg = cfg.replace(**overrides) if overrides else cfg
        elif resume and (run_dir / "config.json").exists() and not paper:
            cfg = None
            if overrides:
                from hbar.training import load_config
                cfg = load_config(run_dir).replace(**overrides)
        elif paper:
            cfg = TrainConfig.paper(dataset or "swiss_roll", schedule or "simple",
                                    **{k: v for k, v in overrides.items() if k not in ("dataset", "schedule")})
        else:
            base = TrainConfig(dataset="swiss_roll", epochs=2000)
            cfg = base.replace(**overrides) if overrides else base
        hs = _parse_floats(kl_h, "--kl-h")
        with _progress() as prog:
            task = prog.add_task("training", total=None)

            def cb(step: int, total: int, loss: float) -> None:
                prog.update(task, completed=step, total=total, description=f"training (loss {loss:.4f})")

            res = run_train(cfg, run_dir, resume=resume, progress=cb, overwrite=overwrite)
        out.print(f"trained {res.epochs_done} epochs ({res.steps_done} steps) in {res.seconds:.1f} s; "
                  f"final epoch loss {res.losses[-1]:.4f}; run dir {run_dir}")
        if res.test_loss is not None:
            out.print(f"held-out DSM loss (EMA weights): {_fmt(res.test_loss)}")
        x_train, _ = make_training_data(res.config)
        kl = path_kl_bound(res.score_fn, res.schedule, x_train[:1000], hs, jax.random.PRNGKey(0))
        table = Table(title="path-KL bound KL(P^h || Q^h) up to an s-independent constant (theory.md §3)")
        for col in ("h", "(1+h)^2/(8h)", "KL bound + const", "se"):
            table.add_column(col)
        for h, fac, v, se in zip(kl.hs, kl.factor, kl.kl_up_to_constant, kl.kl_up_to_constant_se):
            table.add_row(f"{h:g}", f"{fac:.4f}", f"{v:.4f}", f"{se:.4f}")
        out.print(table)


@app.command()
def sample(
    run_dir: Annotated[Path, typer.Argument(help="training run directory")],
    h: Annotated[float, typer.Option(help="noise strength h >= 0 (0: probability-flow ODE, 1: reverse SDE)")] = 1.0,
    n: Annotated[int, typer.Option(help="number of samples")] = 1000,
    steps: Annotated[int, typer.Option(help="fixed steps (euler / heun)")] = 1000,
    method: Annotated[str, typer.Option(help="euler | heun | adaptive (h = 0 only)")] = "euler",
    seed: Annotated[int, typer.Option()] = 0,
    bound: Annotated[float | None, typer.Option(help="count trajectories leaving [-bound, bound]^d as failed")] = None,
    output: Annotated[Path, typer.Option("--out", help="output .npy (samples) ")] = Path("samples.npy"),
) -> None:
    """Sample a trained model with the h-family sampler."""
    with _errors():
        import jax
        import numpy as np

        from hbar import sample as run_sample
        from hbar.training import load_checkpoint

        score, schedule, cfg = load_checkpoint(run_dir)
        t0 = time.perf_counter()
        res = run_sample(score, schedule, jax.random.PRNGKey(seed), n, h, steps=steps, method=method,
                         d=cfg.network["d"], bound=bound)
        np.save(output, res.samples)
        out.print(f"{n} samples at h={h:g} ({method}, {res.nfe} score evaluations) in "
                  f"{time.perf_counter() - t0:.2f} s -> {output}; failed trajectories: {res.n_failed}")


@app.command()
def nll(
    run_dir: Annotated[Path, typer.Argument(help="training run directory")],
    data: Annotated[Path, typer.Argument(help="points (.npy or .csv), shape (n, d)")],
    order: Annotated[int, typer.Option(help="0: NLL at h=0; 1: + C1; 2: + C2")] = 1,
    method: Annotated[str, typer.Option(help="auto (exact characteristics below d = 16, one-loop estimator from "
                                             "there) | characteristics | one-loop | finite-difference (paper's baseline)")] = "auto",
    probes: Annotated[int, typer.Option(help="one-loop: C1 samples per point")] = 16,
    steps: Annotated[int, typer.Option(help="one-loop: steps of the fixed fluctuation grid")] = 128,
    seed: Annotated[int, typer.Option(help="PRNG seed of the one-loop samples / Hutchinson probes")] = 0,
    rtol: Annotated[float, typer.Option()] = 1e-5,
    atol: Annotated[float, typer.Option()] = 1e-5,
    bound: Annotated[float | None, typer.Option(help="fail trajectories leaving [-bound, bound]^d")] = None,
    n: Annotated[int | None, typer.Option(help="use only the first n points")] = None,
    h: Annotated[str, typer.Option(help="h values at which to print the WKB expansion")] = "0.05,0.1,0.2",
    output: Annotated[Path | None, typer.Option("--out", help="write per-point results as JSON")] = None,
) -> None:
    """NLL at h = 0 and the WKB coefficients C1, C2 (exact, by characteristics)."""
    with _errors():
        import jax
        import numpy as np

        from hbar import nll as run_nll
        from hbar.ode import ODEOptions

        score, schedule, _, x = _load_model_and_data(run_dir, data, n)
        hs = _parse_floats(h, "--h")
        t0 = time.perf_counter()
        with _progress() as prog:
            task = prog.add_task("likelihood", total=len(x))
            res = run_nll(score, schedule, x, order=order, method=method,
                          options=ODEOptions(rtol=rtol, atol=atol), bound=bound,
                          key=jax.random.PRNGKey(seed), probes=probes, steps=steps,
                          progress=lambda done, tot: prog.update(task, completed=done))
        table = Table(title=f"NLL(h) ≈ NLL0 + h C1 + h² C2  (nats, mean ± s.e. over {int(res.valid.sum())} points)")
        table.add_column("quantity")
        table.add_column("value")
        table.add_row("NLL0", _fmt(res.nll0_mean))
        if res.c1 is not None:
            table.add_row("C1" + (" (spread over points)" if res.c1_se is not None else ""), _fmt(res.c1_mean))
        if res.c1_se is not None:
            table.add_row(f"C1 estimator s.e. (one-loop, {res.probes} probes/point)", f"{res.c1_estimator_se:.4f}")
        if res.c2 is not None:
            table.add_row("C2", _fmt(res.c2_mean))
        if order >= 1:
            for hv in hs:
                table.add_row(f"NLL(h={hv:g}) WKB-{order}", f"{res.nll(hv):.4f}")
        table.add_row("failed trajectories", str(res.n_failed))
        table.add_row("wall time", f"{time.perf_counter() - t0:.1f} s")
        out.print(table)
        if output is not None:
            payload = {"summary": res.summary(), "nll0": res.nll0.tolist(), "valid": res.valid.tolist(),
                       "c1": None if res.c1 is None else res.c1.tolist(),
                       "c1_se": None if res.c1_se is None else res.c1_se.tolist(),
                       "c2": None if res.c2 is None else res.c2.tolist()}
            output.write_text(json.dumps(payload, default=lambda o: np.asarray(o).tolist()))


@app.command("path-nll")
def path_nll_cmd(
    run_dir: Annotated[Path, typer.Argument(help="training run directory")],
    data: Annotated[Path, typer.Argument(help="points (.npy or .csv), shape (n, d)")],
    h: Annotated[str, typer.Option(help="h values > 0")] = "0.1,0.5,1",
    paths: Annotated[int, typer.Option(help="importance-sampled paths per point")] = 256,
    steps: Annotated[int, typer.Option(help="Euler steps of the discretised model")] = 100,
    n: Annotated[int | None, typer.Option(help="use only the first n points")] = None,
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Path-integral Monte Carlo NLL of the time-discretised h-model (any h > 0, any d)."""
    with _errors():
        import jax

        from hbar.path import path_nll

        score, schedule, _, x = _load_model_and_data(run_dir, data, n)
        hs = _parse_floats(h, "--h")
        res = path_nll(score, schedule, x, hs, jax.random.PRNGKey(seed), n_paths=paths, steps=steps)
        table = Table(title=f"path-integral NLL ({steps} Euler steps, {paths} paths/point; biased high by ~bias)")
        for col in ("h", "NLL", "s.e.", "bias", "ESS min", "ESS median"):
            table.add_column(col)
        for i, hv in enumerate(res.hs):
            table.add_row(f"{hv:g}", f"{res.nll[i]:.4f}", f"{res.se[i]:.4f}", f"{res.bias[i]:.2e}",
                          f"{res.ess_min[i]:.2f}", f"{res.ess_median[i]:.2f}")
        out.print(table)


def _run_study(which: str, output: Path, quick: bool, seed: int, report_name: str) -> None:
    """Run hbar.studies.paper2024.run_demo / run_reproduce with stage progress bars and print
    where the report is (stages are cached in the output folder, so a rerun resumes)."""
    with _errors():
        from hbar.studies import paper2024 as study

        t0 = time.perf_counter()
        with _progress() as prog:
            getattr(study, which)(output, quick=quick, seed=seed, progress=_StageBars(prog))
        report = Path(output) / report_name
        out.print(f"{which} finished in {time.perf_counter() - t0:.0f} s; report: {report}")
        if report.exists() and which == "run_demo":
            out.print(report.read_text())


@app.command()
def demo(
    output: Annotated[Path, typer.Option("--out", help="results folder")] = Path("results/demo"),
    quick: Annotated[bool, typer.Option(help="smaller sizes (about a minute)")] = False,
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """The main job: train on the swiss roll, sample at several h, NLL(h) by WKB vs brute force."""
    _run_study("run_demo", output, quick, seed, "report.md")


@app.command()
def reproduce(
    output: Annotated[Path, typer.Option("--out", help="results folder")] = Path("results/reproduce"),
    quick: Annotated[bool, typer.Option(help="reduced sizes (under 15 minutes on 2 cores)")] = False,
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Reproduce the paper's experiments (1-D Gaussian study, 2-D Table 1, W2(h)); resumable."""
    _run_study("run_reproduce", output, quick, seed, "report.md")


@app.command()
def datasets() -> None:
    """List the bundled data sets with their dimension and known exact entropy."""
    from hbar.data import DATASETS, dataset_dim, dataset_entropy

    table = Table(title="data sets (generated locally, no downloads)")
    for col in ("name", "d", "entropy (nats)"):
        table.add_column(col)
    for name in DATASETS:
        try:
            ent = dataset_entropy(name)
        except Exception:  # entropy unknown for this data set
            ent = None
        try:
            dim = str(dataset_dim(name))
        except Exception:  # needs parameters (e.g. a general mixture)
            dim = "given"
        table.add_row(name, dim, "-" if ent is None else f"{ent[0]:.3f} ± {ent[1]:.3f}")
    out.print(table)


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
