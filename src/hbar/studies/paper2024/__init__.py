"""The experiments of Hirono, Tanaka & Fukushima (ICML 2024) and the README demo
(docs/theory.md section 10; data sets: section 9).

* :func:`run_reproduce` -- the 1-D Gaussian study (closed form vs WKB vs samplers vs
  Fokker-Planck) and the 2-D study (swiss roll and 25 Gaussians, SIMPLE and COSINE: Table 1
  with C2, Fokker-Planck NLL(h), excess NLL over the data entropy, W2(h), minimisers, the
  paper's finite-difference C1 against the exact one).
* :func:`run_demo` -- a few-minute version (swiss roll, SIMPLE) for the README.

Modules: ``config`` (:class:`ReproduceConfig`: ``.full()``, ``.quick()``, ``.tiny()``,
``.demo_config()``), ``stages`` (resumable, atomic stage cache), ``gauss1d`` and
``experiments`` (the stage functions), ``analysis`` (minimisers, robust summaries), ``plots``,
``report`` (section by section, from the results only; commentary in ``notes.md``),
``outputs`` (figures, CSV, report.md), ``pipeline`` (the driver).

Work is split into stages cached under ``out_dir/stages``; a later call with the same
``out_dir`` resumes (see :mod:`.stages`). Conventions: NLL in nats, means with standard errors
over points; the sampler is Euler-Maruyama with the noise amplitude sqrt(h) g
(docs/theory.md section 2); W2 is reported both as the distance and squared.

Importing this package changes no global state: float64 is enabled only inside the runs.
"""

from .config import ReproduceConfig, model_name, model_train_config
from .pipeline import run_demo, run_reproduce
from .stages import load_stage

__all__ = ["ReproduceConfig", "run_reproduce", "run_demo", "load_stage", "model_name", "model_train_config"]
