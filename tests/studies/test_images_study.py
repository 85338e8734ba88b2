"""The image study: the h answer, the report, the config checks and (slow) a full quick run."""

from __future__ import annotations

import json
import os

import pytest

from hbar.studies.images import ImageStudyConfig, run_images
from hbar.studies.images.report import h_answer, render_report
from hbar.validation import HbarInputError


def _q(fd, fd_se=0.1, w2=None):
    return {"quality": {"fd": fd, "fd_se": fd_se, "w2_pixels": w2}}


def test_h_answer_agrees_when_c1_negative_and_large_h_wins():
    a = h_answer({"c1_bpd": [-0.05, 0.01]}, {0.0: _q(5.0, w2=3.0), 0.5: _q(4.0, w2=2.9), 1.0: _q(3.0, w2=2.8)})
    assert a["c1_sign"] == "negative" and a["wkb_prefers"] == "larger h"
    assert a["best_h_fd"] == 1.0 and a["fd_resolved"] is True and a["agree_fd"] is True
    assert a["best_h_w2"] == 1.0 and a["agree_w2"] is True


def test_h_answer_disagrees_and_unresolved_cases():
    a = h_answer({"c1_bpd": [-0.05, 0.01]}, {0.0: _q(3.0), 1.0: _q(3.05)})
    assert a["best_h_fd"] == 0.0 and a["fd_resolved"] is False and a["agree_fd"] is None  # not resolved: no claim
    a = h_answer({"c1_bpd": [-0.05, 0.01]}, {0.0: _q(3.0), 0.5: _q(3.5), 1.0: _q(4.0)})
    assert a["best_h_fd"] == 0.0 and a["fd_resolved"] is True and a["agree_fd"] is False
    a = h_answer({"c1_bpd": [0.05, 0.01]}, {0.0: _q(4.0), 0.1: _q(3.0), 1.0: _q(5.0)})
    assert a["wkb_prefers"] == "smaller h" and a["best_h_fd"] == 0.1 and a["agree_fd"] is False
    b = h_answer({"c1_bpd": [0.001, 0.01]}, {0.0: _q(3.0), 1.0: _q(4.0)})
    assert b["wkb_prefers"] is None and b["agree_fd"] is None and b["c1_sign"].startswith("not resolved")
    d = h_answer({"c1_bpd": [-0.05, 0.01], "ladder": {"disc_error_bpd": 0.05}}, {0.0: _q(3.0), 1.0: _q(4.0)})
    assert d["wkb_prefers"] is None  # resolved by its s.e. alone, not once the discretisation error counts
    c = h_answer(None, {})
    assert c["c1_sign"] is None and c["best_h_fd"] is None


def test_report_marks_incomplete_runs_and_missing_stages():
    res = {"config": ImageStudyConfig.quick().to_dict(), "complete": False,
           "stages": {"baseline": None, "train": None, "classifier": None, "nll": None}, "samples": {},
           "answer": h_answer(None, {}), "stage_seconds": {}, "stages_missing": ["nll", "samples/h=0"]}
    text = render_report(res)
    assert "Incomplete run" in text and "Not finished: nll, samples/h=0" in text
    assert "(not computed yet)" in text


def test_report_and_answer_with_a_sample_set_that_failed_entirely():
    failed = {"h": 1.0, "n": 64, "n_failed": 64, "quality": None, "grid": None, "images_per_second": 10.0}
    samples = {0.0: {"h": 0.0, "n": 64, "n_failed": 0, "grid": "figures/a.png", "images_per_second": 10.0,
                     "quality": {"fd": 3.0, "fd_se": 0.1, "fd_floor": 1.0, "label_entropy": 2.2, "label_entropy_max": 2.3,
                                 "w2_pixels": 9.0, "n_w2": 32, "w2_floor": 8.0}}, 1.0: failed}
    ans = h_answer({"c1_bpd": [-0.05, 0.01]}, samples)
    assert ans["best_h_fd"] == 0.0 and ans["fd_resolved"] is False and ans["agree_fd"] is None
    res = {"config": ImageStudyConfig.quick().to_dict(), "complete": True,
           "stages": {"baseline": None, "train": None, "classifier": None, "nll": None},
           "samples": {str(k): v for k, v in samples.items()}, "answer": ans, "stage_seconds": {}, "stages_missing": []}
    text = render_report(res)
    assert "| 1 | 64 of 64 | not scored" in text and "samples at h=1" not in text


@pytest.mark.parametrize("bad", [dict(n_nll=0), dict(h_values=()), dict(h_values=(0.0, -0.1)),
                                 dict(n_w2=2000), dict(probes=1.5),
                                 dict(ol_steps=(8, 12)), dict(ol_steps=16)])
def test_config_rejects_bad_sizes(bad):
    with pytest.raises(HbarInputError):
        ImageStudyConfig(**bad)


@pytest.mark.slow
def test_quick_run_end_to_end_and_resume(tmp_path):
    out = tmp_path / "img"
    res = run_images(out, quick=True, seed=0)
    assert res["complete"] and not res["stages_missing"]
    nl = res["stages"]["nll"]
    assert nl["n_failed"] == 0 and nl["nll0_bpd"][1] > 0 and nl["c1_bpd"][1] > 0
    assert res["stages"]["baseline"]["test_bits_per_dim"] > 0
    for h in ImageStudyConfig.quick().h_values:
        s = res["samples"][str(float(h))]
        assert os.path.exists(out / s["grid"]) and s["quality"]["fd"] >= 0
    assert (out / "figures" / "nll_h.png").exists() and (out / "figures" / "quality_h.png").exists()
    text = (out / "report.md").read_text()
    assert "bits/dim" in text and "Incomplete" not in text
    json.loads((out / "results.json").read_text(), parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
    before = {p: p.stat().st_mtime_ns for p in (out / "stages").rglob("*.json")}
    again = run_images(out, quick=True, seed=0)
    assert again["stages"]["nll"] == res["stages"]["nll"]
    assert {p: p.stat().st_mtime_ns for p in (out / "stages").rglob("*.json")} == before
