"""Backbones: Llama-family decoder (``llama``), its config, RoPE variants and checkpoint loading;
the DeepSeek-V4 backbone lives in the ``deepseek_v4`` subpackage (``load_deepseek_v4``)."""
