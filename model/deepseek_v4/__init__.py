"""DeepSeek-V4 backbone in plain PyTorch (single request, single device): config, model, KV cache
with sliding window + CSA / HCA compressed entries, lightning indexer, checkpoint loading; CSA
pages (``pages``) and single-process LSA decoding over them (``lsa``, ``oracle``); the paper's
latent memory indexer (``latent_indexer``, its label dump ``latent_dump`` and ``latent_train``)."""

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
from flashmemory.model.deepseek_v4.latent_dump import (
    DumpMeta,
    LatentDump,
    LatentDumpConfig,
    Window,
    dump_latent,
    read_dump,
    write_request,
)
from flashmemory.model.deepseek_v4.latent_indexer import (
    LatentConfig,
    LatentSelectConfig,
    LatentSelector,
    LatentTower,
    choose_pages,
    load_latent,
    save_latent,
)
from flashmemory.model.deepseek_v4.latent_train import (
    LatentEval,
    LatentTrainConfig,
    dump_loss,
    evaluate_latent,
    train_latent,
)
from flashmemory.model.deepseek_v4.loader import load_deepseek_v4
from flashmemory.model.deepseek_v4.lsa import (
    DecodeRun,
    DSV4LSAConfig,
    HiddenStateSelector,
    HiddenTap,
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
    PageLayout,
    PagePayload,
    PageStore,
    evict_pages,
    fetch_pages,
    open_resident,
    pack_pages,
    resident_pages,
    unpack_pages,
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
    "DumpMeta",
    "EntryStore",
    "HiddenStateSelector",
    "HiddenTap",
    "IndexerTrace",
    "LSADecoder",
    "LSAStats",
    "LatentConfig",
    "LatentDump",
    "LatentDumpConfig",
    "LatentEval",
    "LatentSelectConfig",
    "LatentSelector",
    "LatentTower",
    "LatentTrainConfig",
    "LayerCache",
    "NativeOracleSelector",
    "PageLayout",
    "PagePayload",
    "PageStore",
    "Prefilled",
    "QuantConfig",
    "Reselection",
    "ResidentEntryStore",
    "Window",
    "WindowRing",
    "choose_pages",
    "decode_full",
    "decode_lsa",
    "dequantize",
    "dump_latent",
    "dump_loss",
    "evaluate_latent",
    "evict_pages",
    "fetch_pages",
    "load_deepseek_v4",
    "load_latent",
    "lookahead_pages",
    "open_resident",
    "pack_pages",
    "page_pick_counts",
    "pages_to_mask",
    "prefill_request",
    "read_dump",
    "resident_pages",
    "save_latent",
    "train_latent",
    "unpack_pages",
    "write_request",
]
