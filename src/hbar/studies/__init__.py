"""Studies built on hbar: experiment harnesses that are not part of the core library.

``import hbar`` does not load this package. Each study is a subpackage with its own
configuration, resumable stages, figures and report:

* :mod:`hbar.studies.paper2024` -- the experiments of Hirono, Tanaka & Fukushima (ICML 2024)
  (docs/theory.md section 10) and the README demo (``hbar reproduce`` / ``hbar demo``).
"""
