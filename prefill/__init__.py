"""Prefill: dense chunked prefill into the chunk store (``runner``, ``chunk_store``)."""
