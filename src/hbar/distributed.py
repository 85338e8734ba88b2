"""Data parallelism on JAX's distributed runtime: meshes, row sharding, gathering (docs/theory.md section 15).

hbar runs its batch computations (:func:`hbar.nll`, :func:`hbar.sample`, :func:`hbar.training.train`)
data-parallel over a one-axis device mesh with axis name ``DATA_AXIS``: the rows of a batch (points,
samples, training examples) are split over the mesh's devices, everything else (score parameters,
schedule, options) is replicated, and the computation is the same jitted program as on one device,
compiled with these input shardings (GSPMD). Reductions over the batch -- the max-norm error of a
batched adaptive solve, the mean of a training loss and hence its gradient -- become all-reduces
that XLA inserts, so a sharded run computes the same numbers as the plain one up to the order of
floating-point reductions. Results are gathered back to every process as NumPy arrays.

On many hosts, one process per host, :func:`initialize` joins the processes
(``jax.distributed.initialize``); each process then holds the whole input (every host reads the
same data set) and contributes its local devices' rows. Outputs are written by process 0 only
(:func:`is_main_process`).

Importing this module changes no global state.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from hbar.validation import HbarInputError

__all__ = ["DATA_AXIS", "MeshLike", "make_mesh", "resolve_mesh", "initialize", "distributed_requested",
           "is_main_process", "padded_size", "pad_rows", "shard_rows", "replicate", "gather", "constrain_rows"]

#: name of the mesh axis that batch rows are split over
DATA_AXIS = "data"

#: what a ``mesh=`` option accepts: None (the default: every device JAX sees when there are
#: several, else the plain single-device path), an int (that many devices: 1 = the plain path),
#: a sequence of devices, or a one-axis :class:`jax.sharding.Mesh`
MeshLike = Mesh | int | Sequence[Any] | None

_ENV_FLAG = "HBAR_DISTRIBUTED"


def make_mesh(devices: int | Sequence[Any] | None = None) -> Mesh:
    """A one-axis mesh (axis ``DATA_AXIS``) over ``devices``: None = all devices of all processes
    (``jax.devices()``), an int n = the first n of them, or an explicit sequence of devices."""
    all_devices = jax.devices()
    if devices is None:
        devs = list(all_devices)
    elif isinstance(devices, (int, np.integer)) and not isinstance(devices, bool):
        if not 1 <= int(devices) <= len(all_devices):
            raise HbarInputError(f"devices must be between 1 and the {len(all_devices)} devices JAX sees, got {devices}")
        devs = list(all_devices)[: int(devices)]
    else:
        devs = list(devices)
        if not devs:
            raise HbarInputError("devices is an empty sequence")
    return Mesh(np.array(devs, dtype=object), (DATA_AXIS,))


def resolve_mesh(mesh: MeshLike) -> Mesh | None:
    """The mesh a ``mesh=`` option asks for, or None for the plain single-device path.

    None: all devices when JAX sees more than one (several local devices, or several processes
    after :func:`initialize`), else None. An int or a device sequence: :func:`make_mesh`; a mesh
    of one device (e.g. ``mesh=1``) is the plain path. A :class:`Mesh` must have the one axis
    ``DATA_AXIS``."""
    if mesh is None:
        return make_mesh() if jax.device_count() > 1 else None
    if isinstance(mesh, Mesh):
        if tuple(mesh.axis_names) != (DATA_AXIS,):
            raise HbarInputError(f"mesh must have the single axis {DATA_AXIS!r}, got axes {tuple(mesh.axis_names)}")
        m = mesh
    elif isinstance(mesh, bool):
        raise HbarInputError(f"mesh must be None, a device count, a device list or a Mesh, got {mesh!r}")
    else:
        m = make_mesh(mesh)
    if m.devices.size == 1 and jax.process_count() == 1:
        return None
    return m


def distributed_requested(environ: dict[str, str] | None = None) -> bool:
    """Whether the environment asks for a multi-process run: ``HBAR_DISTRIBUTED=1``, or JAX's own
    ``JAX_COORDINATOR_ADDRESS`` set (``HBAR_DISTRIBUTED=0`` overrides both)."""
    env = os.environ if environ is None else environ
    flag = env.get(_ENV_FLAG, "").strip().lower()
    if flag in ("0", "false", "no"):
        return False
    return flag in ("1", "true", "yes") or bool(env.get("JAX_COORDINATOR_ADDRESS"))


def _env_int(env: dict[str, str], *names: str) -> int | None:
    for name in names:
        v = env.get(name)
        if v not in (None, ""):
            try:
                return int(v)
            except ValueError:
                raise HbarInputError(f"environment variable {name} must be an integer, got {v!r}") from None
    return None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, initialization_timeout: int = 300,
               environ: dict[str, str] | None = None) -> None:
    """Join this process to a multi-process run: a thin wrapper over ``jax.distributed.initialize``.

    Arguments left None are read from ``HBAR_COORDINATOR_ADDRESS`` / ``JAX_COORDINATOR_ADDRESS``
    (host:port of process 0), ``HBAR_NUM_PROCESSES`` / ``JAX_NUM_PROCESSES`` and
    ``HBAR_PROCESS_ID`` / ``JAX_PROCESS_ID``; whatever is still missing is left to JAX's cluster
    auto-detection (SLURM: ``SLURM_NTASKS``, ``SLURM_PROCID``, the first host of the step's node
    list as coordinator; Open MPI, Kubernetes, Cloud TPU). Calling it again in an initialised
    process does nothing. Must run before the first JAX computation of the process.
    """
    if jax.distributed.is_initialized():
        return
    env = os.environ if environ is None else environ
    if coordinator_address is None:
        coordinator_address = env.get("HBAR_COORDINATOR_ADDRESS") or env.get("JAX_COORDINATOR_ADDRESS") or None
    if num_processes is None:
        num_processes = _env_int(env, "HBAR_NUM_PROCESSES", "JAX_NUM_PROCESSES")
    if process_id is None:
        process_id = _env_int(env, "HBAR_PROCESS_ID", "JAX_PROCESS_ID")
    if num_processes is not None and num_processes < 1:
        raise HbarInputError(f"num_processes must be >= 1, got {num_processes}")
    if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
        raise HbarInputError(f"process_id must be in [0, {num_processes}), got {process_id}")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, initialization_timeout=initialization_timeout)


def is_main_process() -> bool:
    """True on process 0 (the one that writes outputs), and in a single-process run."""
    return jax.process_index() == 0


def padded_size(n: int, mesh: Mesh) -> int:
    """n rounded up to a multiple of the mesh size (rows per device are equal)."""
    k = mesh.devices.size
    return int(math.ceil(n / k) * k)


def pad_rows(x: Any, size: int) -> Any:
    """(n, ...) -> (size, ...) by repeating the last row (size >= n). A repeated row changes no
    max-norm over the batch, so a batched adaptive solve takes the same steps. NumPy and JAX
    arrays (also typed PRNG keys) keep their kind."""
    if x.shape[0] == size:
        return x
    if x.shape[0] > size:
        raise HbarInputError(f"cannot pad {x.shape[0]} rows to {size}")
    xp = jax.numpy if isinstance(x, jax.Array) else np
    return xp.concatenate([x, xp.repeat(x[-1:], size - x.shape[0], axis=0)])


def _row_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS, *([None] * (ndim - 1))))


def shard_rows(x: Any, mesh: Mesh) -> jax.Array:
    """A global array with the rows of ``x`` (n, ...) split over the mesh's data axis; n must be
    a multiple of the mesh size (:func:`pad_rows`). Every process passes the same full ``x``
    and places its own devices' rows."""
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.extended):  # typed PRNG keys
        return jax.random.wrap_key_data(shard_rows(jax.random.key_data(x), mesh), impl=jax.random.key_impl(x))
    x = np.asarray(x)
    if x.ndim == 0 or x.shape[0] % mesh.devices.size:
        raise HbarInputError(f"{x.shape[0] if x.ndim else 0} rows do not split over {mesh.devices.size} devices")
    return jax.make_array_from_callback(x.shape, _row_sharding(mesh, x.ndim), lambda idx: x[idx])


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Every array leaf of ``tree`` (parameters, schedules, options) copied to all devices of the
    mesh (sharding ``PartitionSpec()``); other leaves are left as they are."""
    rep = NamedSharding(mesh, PartitionSpec())

    def put(leaf):
        if isinstance(leaf, (jax.Array, np.ndarray)) and not jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.extended):
            host = np.asarray(leaf)
            return jax.make_array_from_callback(host.shape, rep, lambda idx: host[idx])
        return leaf

    return jax.tree_util.tree_map(put, tree)


def constrain_rows(x: jax.Array, mesh: Mesh | None) -> jax.Array:
    """Inside a jitted function: ask for the rows of ``x`` to be split over the mesh (no-op for
    None). Used where a batch is formed inside the program (a training step's minibatch)."""
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, _row_sharding(mesh, x.ndim))


def gather(tree: Any) -> Any:
    """Every jax.Array leaf as a NumPy array holding its global value, on every process
    (``multihost_utils.process_allgather`` for arrays spread over several processes)."""
    from jax.experimental import multihost_utils

    def get(leaf):
        if not isinstance(leaf, jax.Array):
            return leaf
        if leaf.is_fully_addressable or leaf.is_fully_replicated:
            return np.asarray(leaf)
        return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))

    return jax.tree_util.tree_map(get, tree)
