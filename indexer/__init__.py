"""Indexer: the selector interface, baseline selectors and the Neural Memory Indexer."""
