"""Model loading (HF dirs, hub ids, GGUF files, built-in aliases)."""
