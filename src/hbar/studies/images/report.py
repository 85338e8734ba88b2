"""The markdown report of the image study (docs/theory.md section 13.7), written from the results
dict only: every number in it is read from a finished stage, and missing stages are named."""

from __future__ import annotations

from typing import Any

__all__ = ["render_report", "h_answer"]


def _f(v: Any, fmt: str = ".3f") -> str:
    return "—" if v is None else format(v, fmt)


def _pm(pair: Any, fmt: str = ".3f") -> str:
    if not pair or pair[0] is None:
        return "—"
    return f"{pair[0]:{fmt}} ± {_f(pair[1], fmt)}"


def h_answer(nll_js: dict[str, Any] | None, samples: dict[float, dict[str, Any]]) -> dict[str, Any]:
    """What the first-order WKB predicts (sign of the mean C1) against the h that gives the best
    samples (lowest feature FD; lowest pixel W2). ``agree`` is None when C1 is not resolved
    (|mean| < 2 x its total error: s.e. over images and the step ladder's discretisation error)
    or a figure is missing."""
    out: dict[str, Any] = {"c1_sign": None, "wkb_prefers": None, "best_h_fd": None, "best_h_w2": None,
                           "fd_resolved": None, "agree_fd": None, "agree_w2": None}
    if nll_js:
        m, se = nll_js["c1_bpd"]
        disc = (nll_js.get("ladder") or {}).get("disc_error_bpd")
        if se is not None and disc is not None:
            se = (se**2 + disc**2) ** 0.5  # Monte Carlo and discretisation errors of the mean C1
        if m is not None and se is not None:
            resolved = abs(m) > 2.0 * se
            out["c1_sign"] = ("negative" if m < 0 else "positive") if resolved else "not resolved (|C1| < 2 s.e.)"
            out["wkb_prefers"] = (("larger h" if m < 0 else "smaller h") if resolved else None)
    scored = {h: s["quality"] for h, s in samples.items() if s and s.get("quality")}
    fd = {h: q["fd"] for h, q in scored.items() if q.get("fd") is not None}
    w2 = {h: q["w2_pixels"] for h, q in scored.items() if q.get("w2_pixels") is not None}
    if fd:
        best = min(fd, key=fd.get)
        out["best_h_fd"] = best
        se_best = scored[best]["fd_se"] or 0.0
        others = [v for h, v in fd.items() if h != best]
        out["fd_resolved"] = bool(others) and min(others) - fd[best] > 2.0 * se_best
    if w2:
        out["best_h_w2"] = min(w2, key=w2.get)
    hs = sorted(samples)
    if out["wkb_prefers"] and len(hs) > 1:
        # WKB's slope says whether a little noise helps (C1 < 0) or hurts; the samples agree when
        # their best h is above the smallest h exactly in the first case. Only resolved minima count.
        noise_helps = out["wkb_prefers"] == "larger h"
        if out["best_h_fd"] is not None and out["fd_resolved"]:
            out["agree_fd"] = (out["best_h_fd"] > hs[0]) == noise_helps
        if out["best_h_w2"] is not None:
            out["agree_w2"] = (out["best_h_w2"] > hs[0]) == noise_helps
    return out


def render_report(res: dict[str, Any]) -> str:
    """The study's markdown report from the results dict of :func:`..pipeline.collect_results`
    (data, model and training, likelihood table, sample table with figures, the h answer,
    wall times; an incomplete run says so and names the missing stages)."""
    st = res["stages"]
    cfg = res["config"]
    lines = [f"# hbar image study: {cfg['dataset']} ({cfg['name']} sizes)", ""]
    if not res.get("complete"):
        lines += ["**Incomplete run**: the stages not yet finished are listed at the end; rerun the same command "
                  "to resume.", ""]
    base, tr, clf, nl = st.get("baseline"), st.get("train"), st.get("classifier"), st.get("nll")
    if base:
        info = base.get("info", {})
        lines += ["## Data", "",
                  f"{info.get('title', cfg['dataset'])}; source: {info.get('source', '—')}; "
                  f"licence: {info.get('licence', '—')}.",
                  f"Train {base['n_train']} / test {base['n_test']} images, d = {base['d']}, {base['levels']} levels. "
                  "Model space x = 2 (k + u) / levels - 1 in [-1, 1), u ~ U[0, 1)^d (uniform dequantisation); "
                  "bits/dim = NLL / (d ln 2) + log2(levels / 2) (docs/theory.md section 13.2).", ""]
    if tr:
        net = {k: v for k, v in tr["config"]["network"].items() if k not in ("name", "d", "shape", "schedule")}
        lines += ["## Model and training", "",
                  f"U-Net score ({', '.join(f'{k}={v}' for k, v in net.items())}), "
                  f"{res.get('param_count', '—')} parameters; schedule {tr['config'].get('schedule')}; "
                  f"{tr['epochs']} epochs, {tr['steps']} steps of batch {tr['batch_size']}, EMA weights.",
                  f"Training wall time (this machine, 2 cores): {_f(res.get('train_seconds_total'), '.0f')} s "
                  f"({_f(tr.get('images_per_second_this_call'), '.0f')} images/s in the last call); "
                  f"held-out DSM loss {_pm(tr.get('test_loss'), '.4g')}.", ""]
    if clf:
        r = clf["record"]
        lines += [f"Feature classifier (for the Fréchet distance): test accuracy {r['test_accuracy']:.4f} on "
                  f"{r['n_test']} images, trained in {r['train_seconds']:.0f} s.", ""]
    lines += ["## Likelihood", ""]
    if nl:
        gap = None
        if base:
            gap = base["test_bits_per_dim"] - nl["nll0_bpd"][0]
        lines += ["| quantity | value |", "|---|---|",
                  f"| NLL0 (probability-flow ODE, h = 0), bits/dim, {nl['n']} test images | {_pm(nl['nll0_bpd'], '.4f')} |",
                  f"| Gaussian (PCA, k = {base['k'] if base else '—'}) baseline, bits/dim, all "
                  f"{base['n_test'] if base else '—'} test images | "
                  f"{_pm([base['test_bits_per_dim'], base['test_bits_per_dim_se']] if base else None, '.4f')} |",
                  f"| model better than the baseline by (bits/dim; difference of the two rows) | {_f(gap, '.4f')} |",
                  f"| same, paired on the {nl['n']} images of the NLL0 row (baseline - model, mean ± s.e.) | "
                  f"{_pm((st.get('paired') or {}).get('gap_bpd'), '.4f')} |",
                  f"| C1 = dNLL/dh at h = 0 (one-loop, {nl['probes']} probes per image), bits/dim, mean ± s.e. over images | "
                  f"{_pm(nl['c1_bpd'], '.4f')} |",
                  f"| of which estimator (probe) s.e. | {_f(nl.get('c1_estimator_se_bpd'), '.4f')} |",
                  f"| C1 discretisation error (step ladder {(nl.get('ladder') or {}).get('steps', '—')}: level means "
                  f"{', '.join(f'{m:.4f}' for m in (nl.get('ladder') or {}).get('level_means_bpd', []))}) | "
                  f"{_f((nl.get('ladder') or {}).get('disc_error_bpd'), '.4f')} |",
                  f"| images with C1 < 0 | {_f(nl.get('c1_negative_fraction'), '.2f')} |",
                  f"| failed trajectories | {nl['n_failed']} of {nl['n']} |",
                  f"| wall time per image (NLL0 + C1) | {nl['seconds_per_image']:.1f} s |", "",
                  "The WKB line NLL0 + h C1 is the first-order prediction; for learned scores the series is only "
                  "trustworthy for small h (docs/theory.md section 6.3), so the line states a slope at h = 0 and is "
                  "drawn up to the smallest h > 0 of the study only (band: 2 x the total error, Monte Carlo and "
                  "discretisation).", "", "![WKB line](figures/nll_h.png)", ""]
    else:
        lines += ["(not computed yet)", ""]
    samples = {float(k): v for k, v in res.get("samples", {}).items()}
    lines += ["## Samples at each h", ""]
    if samples:
        lines += ["| h | failed | feature FD ± s.e. | FD floor (test vs test) | class entropy / max | W2 pixels "
                  "(n per side) | W2 floor | images/s |", "|---|---|---|---|---|---|---|---|"]
        for h in sorted(samples):
            s = samples[h]
            q = s["quality"]
            if not q:
                lines.append(f"| {h:g} | {s['n_failed']} of {s['n']} | not scored: fewer than 2 valid samples | | | | | "
                             f"{_f(s.get('images_per_second'), '.1f')} |")
                continue
            lines.append(f"| {h:g} | {s['n_failed']} | {_f(q['fd'])} ± {_f(q['fd_se'])} | {_f(q['fd_floor'])} | "
                         f"{_f(q['label_entropy'])} / {_f(q['label_entropy_max'])} | {_f(q['w2_pixels'])} "
                         f"({q['n_w2']}) | {_f(q['w2_floor'])} | {_f(s.get('images_per_second'), '.1f')} |")
        lines += ["", "![quality vs h](figures/quality_h.png)", ""]
        for h in sorted(samples):
            if samples[h].get("grid"):
                lines.append(f"h = {h:g}: ![samples at h={h:g}]({samples[h]['grid']})")
        lines.append("")
    ans = res.get("answer") or {}
    lines += ["## Does the sign of C1 predict the better h?", ""]
    if ans.get("c1_sign") is not None and ans.get("best_h_fd") is not None:
        lines += [f"Mean C1 is {ans['c1_sign']}"
                  + (f", so the first-order WKB says the likelihood improves towards {ans['wkb_prefers']}." if
                     ans.get("wkb_prefers") else "."),
                  f"Best samples: h = {ans['best_h_fd']:g} by feature FD "
                  f"({'resolved beyond 2 s.e.' if ans.get('fd_resolved') else 'not resolved beyond 2 s.e.'}), "
                  f"h = {_f(ans.get('best_h_w2'), 'g')} by pixel W2.",
                  "Agreement with the WKB direction: FD "
                  f"{ {True: 'yes', False: 'no', None: 'undecided'}[ans.get('agree_fd')] }, W2 "
                  f"{ {True: 'yes', False: 'no', None: 'undecided'}[ans.get('agree_w2')] }.", ""]
    else:
        lines += ["(needs the nll stage and the samples)", ""]
    lines += ["## Wall times", "", "| stage | seconds |", "|---|---|"]
    for k, v in sorted(res.get("stage_seconds", {}).items()):
        lines.append(f"| {k} | {_f(v, '.0f')} |")
    missing = res.get("stages_missing") or []
    if missing:
        lines += ["", "Not finished: " + ", ".join(missing)]
    return "\n".join(lines) + "\n"
