"""Evaluation utilities for FlashMemory: synthetic long-context tasks and their scoring."""
