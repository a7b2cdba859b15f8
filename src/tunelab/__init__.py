"""tunelab: fine-tune pre-trained models with one command."""

__version__ = "0.1.0"
