"""The indexer's choice of decode worker: least loaded, around workers reported dead and those a
client already failed to submit to."""

from __future__ import annotations

import pytest

from flashmemory.indexer.actor import pick_decode


def test_least_loaded_then_lowest_index() -> None:
    assert pick_decode([2, 1, 1], set()) == 1
    assert pick_decode([0, 0, 0], set()) == 0


def test_dead_and_excluded_workers_are_avoided() -> None:
    assert pick_decode([0, 5, 9], {0}) == 1  # reported dead: skipped although least loaded
    assert pick_decode([0, 5, 9], {0}, (1,)) == 2  # and the one a submit just failed on
    # every live worker excluded: a worker only reported dead may be back, try it
    assert pick_decode([3, 0], {0}, (1,)) == 0
    assert pick_decode([3, 0], set(), (0, 1)) == 1  # everything tried: least loaded anyway


def test_no_workers_is_an_error() -> None:
    with pytest.raises(ValueError):
        pick_decode([], set())
