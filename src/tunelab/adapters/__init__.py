"""Adapters: LoRA layers, injection, merge, and the PEFT on-disk layout."""
