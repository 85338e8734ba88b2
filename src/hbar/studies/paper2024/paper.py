"""Numbers and settings of the paper itself (Hirono, Tanaka & Fukushima 2024), put beside
ours in the report (docs/theory.md section 10). These are constants of the publication,
not of any run."""

from __future__ import annotations

__all__ = ["PAPER_TABLE1", "PAPER_EPOCHS", "PAPER_W2_TRIALS", "PAPER_N_TEST"]

# (NLL0, +-, C1 outer tol 1e-3, +-, C1 tol 1e-5, +-): the paper's Table 1, mean +- std
PAPER_TABLE1: dict[str, tuple[float, ...]] = {
    "swiss_roll-simple": (1.39, 0.05, -0.31, 0.21, -0.44, 0.38),
    "swiss_roll-cosine": (1.42, 0.02, -1.59, 0.57, -3.27, 1.11),
    "25gaussians-simple": (-1.22, 0.01, -3.64, 0.49, -3.61, 0.64),
    "25gaussians-cosine": (-1.71, 0.02, -17.57, 5.56, -19.65, 17.46),
}
PAPER_EPOCHS = 16000
PAPER_W2_TRIALS = 10
PAPER_N_TEST = 1000
