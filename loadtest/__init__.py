"""Locust load tests for the OpenAI-compatible server: long-context streaming chat with TTFT and
inter-token latency as their own Locust entries, prompt sets of a given context length, and a
summary in vLLM's benchmark definitions (``flashmemory loadtest``)."""

from pathlib import Path


def locustfile_path() -> Path:
    """The locustfile, for ``locust -f`` (``flashmemory loadtest`` passes it)."""
    return Path(__file__).with_name("locustfile.py")
