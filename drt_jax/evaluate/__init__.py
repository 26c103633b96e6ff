"""Evaluation: perplexity by length, NIAH sweeps, retrieval inspection, plots (CLI: eval.py)."""
