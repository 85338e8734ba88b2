"""Data parallelism (hbar.distributed, docs/theory.md section 15).

Several devices are simulated in child processes (``--xla_force_host_platform_device_count=4``
must be set before JAX starts, so never in this process): nll, sample and training on a 4-device
mesh must equal the single-device results; two real processes joined by
``jax.distributed.initialize`` must give the single-process NLL0 and C1.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap

import equinox as eqx
import jax
import numpy as np
import pytest

import hbar
from hbar import distributed
from hbar.validation import HbarInputError

TESTS = os.path.dirname(os.path.abspath(__file__))
SINGLE_THREAD = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"

# A small score network (parameters to replicate) damped towards -x so that untrained weights
# give finite trajectories; the same in the children and here.
PREAMBLE = textwrap.dedent("""
    import json, sys
    import equinox as eqx
    import jax
    import numpy as np
    jax.config.update("jax_enable_x64", True)
    import hbar
    from hbar.networks import network_from_config
    from hbar.schedules import schedule_from_config

    class Damped(eqx.Module):
        net: eqx.Module
        def __call__(self, x, t):
            return -x + 0.1 * self.net(x, t)

    def model(d):
        return Damped(network_from_config({"name": "paper_mlp", "d": d, "width": 16, "depth": 2}, 0)), \\
            schedule_from_config("simple")

    def diff(a, b):
        return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))

    def report(**kw):
        print("RESULT " + json.dumps(kw), flush=True)
""")


def _run_child(body: str, devices: int = 4, timeout: float = 300, env_extra: dict | None = None,
               args: tuple = ()) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices} {SINGLE_THREAD}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = TESTS + os.pathsep + env.get("PYTHONPATH", "")
    env.update(env_extra or {})
    proc = subprocess.run([sys.executable, "-c", PREAMBLE + textwrap.dedent(body), *args], env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, proc.stdout[-2000:] + proc.stderr[-2000:]
    return json.loads(lines[-1][len("RESULT "):])


def test_mesh_resolution_padding_and_environment():
    assert jax.device_count() == 1  # this process: the plain path by default
    assert distributed.resolve_mesh(None) is None
    assert distributed.resolve_mesh(1) is None
    m = distributed.make_mesh(1)
    assert m.axis_names == (distributed.DATA_AXIS,) and m.devices.size == 1
    for bad in (0, 2, True, []):
        with pytest.raises(HbarInputError):
            distributed.resolve_mesh(bad)
    with pytest.raises(HbarInputError, match="axis"):
        distributed.resolve_mesh(jax.sharding.Mesh(np.array(jax.devices()), ("batch",)))
    assert distributed.padded_size(10, m) == 10
    x = np.arange(6.0).reshape(3, 2)
    np.testing.assert_array_equal(distributed.pad_rows(x, 5)[3:], [[4.0, 5.0]] * 2)
    with pytest.raises(HbarInputError):
        distributed.pad_rows(x, 2)
    np.testing.assert_array_equal(distributed.gather(distributed.shard_rows(x, m)), x)
    assert distributed.is_main_process()
    assert distributed.distributed_requested({"HBAR_DISTRIBUTED": "1"})
    assert distributed.distributed_requested({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"})
    assert not distributed.distributed_requested({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "HBAR_DISTRIBUTED": "0"})
    assert not distributed.distributed_requested({"SLURM_NTASKS": "4"})
    with pytest.raises(HbarInputError, match="process_id"):  # checked before JAX is asked
        distributed.initialize("127.0.0.1:1", 2, 5)
    with pytest.raises(HbarInputError, match="HBAR_NUM_PROCESSES"):
        distributed.initialize(environ={"HBAR_NUM_PROCESSES": "two"})


def test_default_mesh_keeps_the_plain_path():
    """mesh=None on one device and mesh=1 are the unchanged single-device computation."""
    s, score, _, _, _ = __import__("_cases").gaussian_case(2, 0.1)
    x = np.random.default_rng(0).normal(size=(5, 2))
    a = hbar.nll(score, s, x, batch_size=4)
    b = hbar.nll(score, s, x, batch_size=4, mesh=1)
    np.testing.assert_array_equal(a.nll0, b.nll0)


NLL_CASES = {
    "characteristics": """
        for name, kw in {"order0": dict(order=0), "order1": dict(order=1)}.items():
            CASES[name] = (model(2), np.random.default_rng(0).normal(size=(6, 2)), kw)
    """,
    "per-point-hutchinson": """
        for name, kw in {"per-point": dict(order=0, batching="per-point"),
                         "hutchinson": dict(order=0, divergence="hutchinson", key=jax.random.PRNGKey(1))}.items():
            CASES[name] = (model(2), np.random.default_rng(0).normal(size=(6, 2)), kw)
    """,
    "one-loop-16d": """
        CASES["one-loop"] = (model(16), np.random.default_rng(1).normal(size=(3, 16)),
                             dict(order=1, method="one-loop", key=jax.random.PRNGKey(2), probes=4, steps=16))
    """,
}


@pytest.mark.parametrize("case", [
    "characteristics",
    pytest.param("per-point-hutchinson", marks=pytest.mark.slow),
    pytest.param("one-loop-16d", marks=pytest.mark.slow),
])
def test_nll_on_four_devices_equals_one_device(case):
    """Order 0 (batched and per-point step control, Hutchinson), order 1 by characteristics (2-D)
    and the one-loop C1 (16-D): per point equal to the single-device values to 1e-9 (the same
    batches and step sizes; only float reduction order may differ), although the batch (6 points,
    or 3 x 4 probes = 12 samples) does not split evenly over 4 devices (padded to 8 / 4 x 4)."""
    r = _run_child("CASES = {}\n" + textwrap.dedent(NLL_CASES[case]) + textwrap.dedent("""
        assert jax.device_count() == 4
        out = {}
        for name, ((score, s), x, kw) in CASES.items():
            a = hbar.nll(score, s, x, mesh=1, **kw)
            b = hbar.nll(score, s, x, **kw)  # default: all 4 devices
            out[name] = [diff(a.nll0, b.nll0), 0.0 if a.c1 is None else diff(a.c1, b.c1),
                         int(a.valid.all() and b.valid.all()), a.evals_forward == b.evals_forward,
                         a.c1_se is None or diff(a.c1_se, b.c1_se) < 1e-9]
        report(**out)
    """))
    for name, (d0, d1, ok, same_evals, same_se) in r.items():
        assert ok and same_evals and same_se, name
        assert d0 < 1e-9 and d1 < 1e-9, (name, d0, d1)


@pytest.mark.slow  # a long check (CI default suite budget); run with pytest -m slow
def test_sample_on_four_devices_equals_one_device():
    """Fixed-step (with its path) and adaptive sampling: the same samples on 4 devices."""
    r = _run_child("""
        score, s = model(2)
        out = {}
        for name, kw in {"euler": dict(h=0.5, steps=40, return_path=True),
                         "heun": dict(h=1.0, steps=20, key=jax.random.key(5)),
                         "adaptive": dict(h=0.0, method="adaptive")}.items():
            kw = {"method": name if name != "adaptive" else "adaptive", "key": jax.random.PRNGKey(4), **kw}
            a = hbar.sample(score, s, n=6, d=2, mesh=1, **kw)
            b = hbar.sample(score, s, n=6, d=2, mesh=4, **kw)
            out[name] = [diff(a.samples, b.samples), int((a.valid == b.valid).all() and a.valid.all()),
                         a.nfe == b.nfe, 0.0 if a.path is None else diff(a.path, b.path),
                         None if b.path is None else list(b.path.shape)]
        report(**out)
    """)
    assert r["euler"][4] == [41, 6, 2]
    for name, (dx, ok, same_nfe, dpath, _) in r.items():
        assert ok and same_nfe, name
        assert dx < 1e-9 and dpath < 1e-9, (name, dx, dpath)


# Stated tolerance (docs/theory.md section 15): float32 weights after N steps on 1 and on 4
# devices differ by float reduction order only, max |w_4 - w_1| <= TRAIN_ATOL (1 + max |w_1|).
TRAIN_ATOL = 1e-5


@pytest.mark.slow  # a long check (CI default suite budget); run with pytest -m slow
def test_training_on_four_devices_equals_one_device():
    """20 Adam steps, batch 30 (not a multiple of 4): raw and EMA weights agree to TRAIN_ATOL,
    the losses to 1e-5 relative."""
    r = _run_child("""
        from hbar.training import TrainConfig, train
        cfg = TrainConfig(dataset="swiss_roll", n_train=120, epochs=5, batch_size=30, checkpoint_every=10_000,
                          network={"name": "paper_mlp", "width": 16, "depth": 2}, schedule={"name": "simple"}, seed=1)
        r1, r4 = train(cfg, mesh=1), train(cfg, mesh=4)
        w = lambda m: jax.tree_util.tree_leaves(eqx.filter(m, eqx.is_inexact_array))
        report(raw=max(diff(a, b) for a, b in zip(w(r1.raw_fn), w(r4.raw_fn))),
               ema=max(diff(a, b) for a, b in zip(w(r1.score_fn), w(r4.score_fn))),
               scale=max(float(np.max(np.abs(a))) for a in w(r1.raw_fn)),
               loss=diff(r1.losses, r4.losses) / float(np.max(np.abs(r1.losses))), steps=r4.steps_done,
               moved=max(diff(a, b) for a, b in zip(w(r1.raw_fn), w(hbar.networks.network_from_config(
                   dict(cfg.network, d=2), jax.random.split(jax.random.PRNGKey(1))[0])))),
               local=all(len(a.devices()) == 1 for a in w(r4.score_fn)))
    """)
    assert r["steps"] == 20 and r["local"]
    assert r["moved"] > 1e-3  # training changed the weights
    assert r["raw"] <= TRAIN_ATOL * (1 + r["scale"]) and r["ema"] <= TRAIN_ATOL * (1 + r["scale"]), r
    assert r["loss"] < 1e-5, r


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(cmds_env: list[tuple[list[str], dict]], timeout: float = 150) -> list[tuple[int, str, str]]:
    """Start the processes together, wait at most ``timeout`` s each, kill what is left."""
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for cmd, env in cmds_env]
    outs = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=timeout)
            outs.append((p.returncode, stdout, stderr))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return outs


MULTI_PROCESS = """
    from hbar import distributed
    pid, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    distributed.initialize(f"127.0.0.1:{port}", 2, pid, initialization_timeout=60)
    assert jax.process_count() == 2 and jax.device_count() == 2 and jax.local_device_count() == 1
    score, s = model(2)
    x = np.random.default_rng(0).normal(size=(5, 2))
    res = hbar.nll(score, s, x, order=1)  # default mesh: both processes' devices, 5 points padded to 6
    if distributed.is_main_process():
        np.savez(out, nll0=res.nll0, c1=res.c1, valid=res.valid)
    report(pid=pid, main=distributed.is_main_process(), n=len(res.nll0))
"""


def test_two_processes_give_the_single_process_result(tmp_path):
    """Two local processes joined by jax.distributed.initialize (coordinator on 127.0.0.1) compute
    NLL0 and C1 of 5 points split over them; process 0 writes the gathered result, which equals
    the single-process one. Each child is killed after 150 s at most."""
    port, out = _free_port(), tmp_path / "nll.npz"
    env = dict(os.environ, XLA_FLAGS=SINGLE_THREAD, JAX_PLATFORMS="cpu",
               PYTHONPATH=TESTS + os.pathsep + os.environ.get("PYTHONPATH", ""))
    runs = _launch([([sys.executable, "-c", PREAMBLE + textwrap.dedent(MULTI_PROCESS), str(pid), str(port), str(out)],
                     env) for pid in (0, 1)])
    results = []
    for rc, stdout, stderr in runs:
        assert rc == 0, stderr[-3000:]
        results.append(json.loads([ln for ln in stdout.splitlines() if ln.startswith("RESULT ")][-1][7:]))
    assert [r["main"] for r in results] == [True, False] and all(r["n"] == 5 for r in results)
    got = np.load(out)
    ref = _run_child("""
        score, s = model(2)
        x = np.random.default_rng(0).normal(size=(5, 2))
        res = hbar.nll(score, s, x, order=1)
        report(nll0=res.nll0.tolist(), c1=res.c1.tolist())
    """, devices=1)
    assert got["valid"].all()
    np.testing.assert_allclose(got["nll0"], ref["nll0"], rtol=0, atol=1e-9)
    np.testing.assert_allclose(got["c1"], ref["c1"], rtol=0, atol=1e-9)


@pytest.mark.slow
def test_cli_nll_under_a_two_process_launch(tmp_path):
    """`hbar nll` launched as two processes with the JAX environment variables (as a cluster
    launcher sets them): process 0 alone prints and writes --out, whose per-point NLL0 and C1
    equal a plain single-process run's."""
    from hbar.training import TrainConfig, train

    cfg = TrainConfig(dataset="swiss_roll", n_train=64, epochs=2, batch_size=32, checkpoint_every=10_000,
                      network={"name": "paper_mlp", "width": 16, "depth": 2}, schedule={"name": "simple"})
    train(cfg, tmp_path / "run")
    np.save(tmp_path / "x.npy", hbar.data.load_dataset("swiss_roll", 5, seed=3))
    cli = [sys.executable, "-c", "from hbar.cli import app; app()", "nll", str(tmp_path / "run"),
           str(tmp_path / "x.npy"), "--order", "1"]
    base = dict(os.environ, XLA_FLAGS=SINGLE_THREAD, JAX_PLATFORMS="cpu")
    port = _free_port()
    launch = [(cli + ["--out", str(tmp_path / f"p{pid}.json")],
               dict(base, HBAR_DISTRIBUTED="1", JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                    JAX_PROCESS_ID=str(pid))) for pid in (0, 1)]
    (rc0, out0, err0), (rc1, out1, err1) = _launch(launch)
    assert rc0 == 0 and rc1 == 0, err0[-2000:] + err1[-2000:]
    assert "NLL" in out0 or "nll" in out0.lower()
    assert [ln for ln in out1.splitlines() if ln.strip() and not ln.startswith("[Gloo]")] == []  # process 1 is quiet ...
    assert not (tmp_path / "p1.json").exists()  # ... and writes nothing
    [(rc, _, err)] = _launch([(cli + ["--out", str(tmp_path / "ref.json")], base)])
    assert rc == 0, err[-2000:]
    got, ref = (json.loads((tmp_path / f).read_text()) for f in ("p0.json", "ref.json"))
    np.testing.assert_allclose(got["nll0"], ref["nll0"], rtol=0, atol=1e-9)
    np.testing.assert_allclose(got["c1"], ref["c1"], rtol=0, atol=1e-9)


TRAIN_TWO_PROCESSES = """
    from hbar import distributed
    from hbar.training import TrainConfig, train
    pid, port, run_dir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    if pid >= 0:
        distributed.initialize(f"127.0.0.1:{port}", 2, pid, initialization_timeout=60)
    cfg = TrainConfig(dataset="swiss_roll", n_train=120, epochs=4, batch_size=30, checkpoint_every=2,
                      network={"name": "paper_mlp", "width": 16, "depth": 2}, schedule={"name": "simple"}, seed=1)
    res = train(cfg, run_dir)
    w = jax.tree_util.tree_leaves(eqx.filter(res.score_fn, eqx.is_inexact_array))
    report(pid=pid, weights=[np.asarray(a).tolist() for a in w], losses=res.losses.tolist())
"""


@pytest.mark.slow
def test_training_on_two_processes(tmp_path):
    """hbar.training.train in two processes (default mesh: both devices): the same EMA weights
    on both processes and as a one-process run to TRAIN_ATOL; process 0 alone writes the run
    directory, whose checkpoint holds those weights."""
    from hbar.training import load_checkpoint

    env = dict(os.environ, XLA_FLAGS=SINGLE_THREAD, JAX_PLATFORMS="cpu")
    code = PREAMBLE + textwrap.dedent(TRAIN_TWO_PROCESSES)
    port = _free_port()
    runs = _launch([([sys.executable, "-c", code, str(pid), str(port), str(tmp_path / "two")], env) for pid in (0, 1)])
    [(rc, out, err)] = _launch([([sys.executable, "-c", code, "-1", "0", str(tmp_path / "one")], env)])
    results = []
    for rc_, out_, err_ in runs + [(rc, out, err)]:
        assert rc_ == 0, err_[-3000:]
        results.append(json.loads([ln for ln in out_.splitlines() if ln.startswith("RESULT ")][-1][7:]))
    two0, two1, one = ([np.asarray(a) for a in r["weights"]] for r in results)
    scale = max(float(np.max(np.abs(a))) for a in one)
    for a, b, c in zip(two0, two1, one):
        np.testing.assert_array_equal(a, b)
        assert np.max(np.abs(a - c)) <= TRAIN_ATOL * (1 + scale)
    score, _, _ = load_checkpoint(tmp_path / "two")
    for a, b in zip(jax.tree_util.tree_leaves(eqx.filter(score, eqx.is_inexact_array)), two0):
        np.testing.assert_array_equal(np.asarray(a), b)
    assert not (tmp_path / "two" / ".hbar.lock").exists()
