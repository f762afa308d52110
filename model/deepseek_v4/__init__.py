"""DeepSeek-V4 backbone in plain PyTorch (single request, single device): config, model, KV cache
with sliding window + CSA / HCA compressed entries, lightning indexer, checkpoint loading."""

from flashmemory.model.deepseek_v4.attention import IndexerTrace
from flashmemory.model.deepseek_v4.cache import (
    CSA_PAGE_ENTRIES,
    CompressorState,
    DSV4Cache,
    EntryStore,
    LayerCache,
    WindowRing,
    pages_to_mask,
)
from flashmemory.model.deepseek_v4.config import DeepseekV4Config
from flashmemory.model.deepseek_v4.loader import load_deepseek_v4
from flashmemory.model.deepseek_v4.model import DeepseekV4ForCausalLM
from flashmemory.model.deepseek_v4.quant import QuantConfig, dequantize

__all__ = [
    "CSA_PAGE_ENTRIES",
    "CompressorState",
    "DSV4Cache",
    "DeepseekV4Config",
    "DeepseekV4ForCausalLM",
    "EntryStore",
    "IndexerTrace",
    "LayerCache",
    "QuantConfig",
    "WindowRing",
    "dequantize",
    "load_deepseek_v4",
    "pages_to_mask",
]
