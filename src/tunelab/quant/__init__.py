"""Quantized storage for frozen base weights (QLoRA's NF4), chosen by ``model.quantize``."""
