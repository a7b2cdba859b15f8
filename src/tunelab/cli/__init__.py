"""Command-line interface (``tunelab ...``)."""
