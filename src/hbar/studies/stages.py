"""Resumable, atomic stages shared by the studies (docs/theory.md sections 10 and 14.6).

Each finished stage writes ``out_dir/stages/<stage>.json`` (its numbers, wall time and a
timestamp) and, where needed, ``<stage>.npz`` (per-point arrays and samples). Both are written
atomically (:func:`hbar.serialization.atomic_write`), the JSON last: it marks completion. A later
call with the same ``out_dir`` loads finished stages instead of recomputing them, so an
interrupted run resumes where it stopped. ``out_dir/config.json`` pins the configuration
(:func:`pin_config`). A study driver holds :func:`hbar.locking.run_lock` on ``out_dir`` while it
runs, so two runs never write the same folder.

A damaged cache file (truncated or invalid JSON or npz: written by something else than hbar,
since hbar's writes are atomic) is never guessed around: reading it raises
:class:`~hbar.validation.HbarInputError` naming the file and saying to delete it; the next run
then recomputes that stage only.
"""

from __future__ import annotations

import datetime
import io
import json
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from hbar.serialization import atomic_write, to_jsonable
from hbar.validation import HbarInputError

__all__ = ["Progress", "StageRunner", "load_stage", "write_json", "read_json", "pin_config", "utc_now"]

Progress = Callable[[str, int, int], Any] | None


def utc_now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Strict JSON (NaN -> null), written atomically."""
    atomic_write(path, (json.dumps(to_jsonable(obj), indent=1, allow_nan=False) + "\n").encode())


def read_json(path: str | os.PathLike) -> Any:
    """Parse a JSON file; a damaged file is an HbarInputError naming it (see the module doc)."""
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise HbarInputError(f"{os.fspath(path)} is damaged (not valid JSON: {err}); delete it and rerun: the "
                             "stage it belongs to is recomputed") from None


def _stage_file(out_dir: str, stage: str, ext: str) -> str:
    return os.path.join(out_dir, "stages", stage.replace("/", "__") + ext)


def load_stage(out_dir: str | os.PathLike, stage: str) -> tuple[dict | None, dict[str, np.ndarray] | None]:
    """(json dict or None, npz arrays or None) of a stored stage."""
    out_dir = os.fspath(out_dir)
    pj, pz = _stage_file(out_dir, stage, ".json"), _stage_file(out_dir, stage, ".npz")
    js = read_json(pj) if os.path.exists(pj) else None
    if js is not None and not isinstance(js, dict):
        raise HbarInputError(f"{pj} is damaged (a JSON object expected); delete it and rerun: the stage is recomputed")
    arr = None
    if os.path.exists(pz):
        try:
            with np.load(pz, allow_pickle=False) as z:
                arr = {k: z[k] for k in z.files}
        except Exception as err:  # noqa: BLE001 - zipfile/numpy raise many types for a damaged file
            raise HbarInputError(f"{pz} is damaged ({type(err).__name__}: {err}); delete it and {os.path.basename(pj)} "
                                 "and rerun: the stage is recomputed") from None
    return js, arr


def pin_config(out_dir: str, config: dict[str, Any], seed: int) -> None:
    """Write ``out_dir/config.json`` or check that it holds the same configuration.

    Forward compatibility: fields added to the configuration after a run started only control
    new stages, so they are accepted (and listed under ``added_fields``); every stored field
    must still match, otherwise :class:`HbarInputError`."""
    cpath = os.path.join(out_dir, "config.json")
    want = json.loads(json.dumps(to_jsonable({"config": config, "seed": seed})))
    if not os.path.exists(cpath):
        write_json(cpath, want)
        return
    have = read_json(cpath)
    if have == want:
        return
    old, new = have.get("config", {}), want["config"]
    same = have.get("seed") == seed and all(k in new and new[k] == v for k, v in old.items())
    if not same:
        raise HbarInputError(f"{out_dir} holds results of a different configuration ({cpath}); "
                             "use another out_dir or delete it")
    want["added_fields"] = sorted(set(have.get("added_fields", [])) | (set(new) - set(old)))
    write_json(cpath, want)


class StageRunner:
    """Run-once stages: ``run(name, fn)`` returns the cached (json, arrays) or computes
    ``fn() -> (json dict, arrays dict | None)`` and stores it with its wall time."""

    def __init__(self, out_dir: str, progress: Progress = None, on_done: Callable[[], None] | None = None):
        self.out_dir = out_dir
        self.progress = progress
        self.on_done = on_done
        self.log: dict[str, dict[str, Any]] = {}

    def report(self, stage: str, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(stage, int(done), int(total))

    def sub(self, stage: str) -> Callable[[int, int], None]:
        """progress(done, total) for the library functions that take one."""
        return lambda done, total: self.report(stage, done, total)

    def run(self, stage: str, fn: Callable[[], tuple[dict, dict | None]]) -> tuple[dict, dict | None]:
        js, arr = load_stage(self.out_dir, stage)
        if js is not None and js.get("_complete"):
            self.log[stage] = {"seconds": js.get("seconds"), "cached": True, "finished_at": js.get("finished_at")}
            self.report(stage, 1, 1)
            return js, arr
        self.report(stage, 0, 1)
        t0 = time.perf_counter()
        js, arr = fn()
        js = dict(js)
        js["seconds"] = time.perf_counter() - t0
        js["finished_at"] = utc_now()
        js["_complete"] = True
        if arr:
            buf = io.BytesIO()
            np.savez_compressed(buf, **{k: np.asarray(v) for k, v in arr.items()})
            atomic_write(_stage_file(self.out_dir, stage, ".npz"), buf.getvalue())
        # the JSON marks completion, so it is written last
        write_json(_stage_file(self.out_dir, stage, ".json"), js)
        js = json.loads(json.dumps(to_jsonable(js)))
        self.log[stage] = {"seconds": js["seconds"], "cached": False, "finished_at": js["finished_at"]}
        self.report(stage, 1, 1)
        if self.on_done is not None:
            self.on_done()
        return js, arr
