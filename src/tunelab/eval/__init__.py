"""Evaluation: held-out loss/perplexity and side-by-side answers."""
