"""The upper-bound rankings of benchmarks/indexer_gap.py --ceilings, on rows with known facts and
masses: facts first (by the indexer or by their mass), filler by the other rows' mean mass at
its distance from the tail."""

from __future__ import annotations

import re

import pytest
import torch

from benchmarks.indexer_gap import ceiling_rankings, fact_flags

FACT = re.compile("FACT")
PAD = "." * 70  # a chunk's fact stays out of the next chunk's 60-character look-back


def _row(texts: list[str], mass: list[float]) -> dict:
    # candidates are chunks 1.. (chunk 0 is the sink); the last candidate is at distance 0
    return dict(doc_id="d", window=0, query="q", chunk_texts=["sink"] + [t + PAD for t in texts],
                candidates=list(range(1, len(texts) + 1)), mass=mass)


def test_fact_flags_read_the_chunk_and_the_end_of_the_one_before():
    row = _row(["filler", "a FACT here", "fil", "ler"], [1, 1, 1, 1])
    assert fact_flags(row, FACT) == [False, True, False, False]
    row["chunk_texts"][3] = PAD + "a FA"  # split across chunks 3 and 4
    row["chunk_texts"][4] = "CT here" + PAD
    assert fact_flags(row, FACT) == [False, True, False, True]


def test_ceiling_rankings_order_facts_first_and_filler_by_the_other_rows():
    # row 0: filler at distances 3, 1, 0 and a fact at distance 2
    # row 1: filler at distances 3, 2, 0 and a fact at distance 1
    rows = [_row(["f", "FACT", "f", "f"], [1.0, 6.0, 2.0, 1.0]),
            _row(["f", "f", "FACT", "f"], [0.0, 2.0, 5.0, 3.0])]
    indexer = [torch.tensor([0.9, 0.1, 0.5, 0.2]), torch.tensor([0.3, 0.2, 0.1, 0.4])]
    known, exact, alone = (s for _, s in ceiling_rankings(rows, indexer, FACT))
    # row 0's filler is scored by row 1's filler share at the same distance, and the reverse;
    # distances with no filler in the other row score 0
    assert exact[0].tolist() == pytest.approx([0.0, 0.6, 0.0, 0.3])
    assert exact[1].tolist() == pytest.approx([0.1, 0.0, 0.5, 0.1])
    # the fact chunk ranks above every filler chunk, whatever the indexer gave it
    assert int(known[0].argmax()) == 1 and int(known[1].argmax()) == 2
    assert known[0][[0, 2, 3]].tolist() == pytest.approx(exact[0][[0, 2, 3]].tolist())
    # without filler knowledge, every filler chunk ranks below every fact chunk
    assert alone[0].tolist() == pytest.approx([-1.0, 0.6, -1.0, -1.0])


def test_known_facts_rank_among_themselves_by_the_indexer():
    rows = [_row(["FACT a", "FACT b", "f"], [1.0, 3.0, 1.0])]
    known, exact, _ = (s for _, s in ceiling_rankings(rows, [torch.tensor([0.8, 0.2, 0.5])],
                                                      FACT))
    assert known[0][0] > known[0][1] > known[0][2]  # indexer order among the facts, then filler
    assert exact[0][1] > exact[0][0]  # the exact ranking follows the mass instead
