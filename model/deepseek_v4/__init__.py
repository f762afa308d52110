"""DeepSeek-V4 backbone in plain PyTorch (single request, single device): config, model, KV cache
with sliding window + CSA / HCA compressed entries, lightning indexer, checkpoint loading; CSA
pages (``pages``) and single-process LSA decoding over them (``lsa``, ``oracle``)."""

from flashmemory.model.deepseek_v4.attention import IndexerTrace
from flashmemory.model.deepseek_v4.cache import (
    CSA_PAGE_ENTRIES,
    CompressorState,
    DSV4Cache,
    EntryStore,
    LayerCache,
    ResidentEntryStore,
    WindowRing,
    pages_to_mask,
)
from flashmemory.model.deepseek_v4.config import DeepseekV4Config
from flashmemory.model.deepseek_v4.loader import load_deepseek_v4
from flashmemory.model.deepseek_v4.lsa import (
    DecodeRun,
    DSV4LSAConfig,
    LSADecoder,
    LSAStats,
    Prefilled,
    Reselection,
    decode_full,
    decode_lsa,
    prefill_request,
)
from flashmemory.model.deepseek_v4.model import DeepseekV4ForCausalLM
from flashmemory.model.deepseek_v4.oracle import (
    NativeOracleSelector,
    lookahead_pages,
    page_pick_counts,
)
from flashmemory.model.deepseek_v4.pages import (
    PagePayload,
    PageStore,
    evict_pages,
    fetch_pages,
    open_resident,
    resident_pages,
)
from flashmemory.model.deepseek_v4.quant import QuantConfig, dequantize

__all__ = [
    "CSA_PAGE_ENTRIES",
    "CompressorState",
    "DSV4Cache",
    "DSV4LSAConfig",
    "DecodeRun",
    "DeepseekV4Config",
    "DeepseekV4ForCausalLM",
    "EntryStore",
    "IndexerTrace",
    "LSADecoder",
    "LSAStats",
    "LayerCache",
    "NativeOracleSelector",
    "PagePayload",
    "PageStore",
    "Prefilled",
    "QuantConfig",
    "Reselection",
    "ResidentEntryStore",
    "WindowRing",
    "decode_full",
    "decode_lsa",
    "dequantize",
    "evict_pages",
    "fetch_pages",
    "load_deepseek_v4",
    "lookahead_pages",
    "open_resident",
    "page_pick_counts",
    "pages_to_mask",
    "prefill_request",
    "resident_pages",
]
