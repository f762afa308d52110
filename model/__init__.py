"""Backbones: Llama-family decoder (``llama``), its config, RoPE variants and checkpoint loading."""
