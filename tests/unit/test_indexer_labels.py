"""Indexer training pipeline pieces computed from known inputs: corpus, labels, evaluation."""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch

from flashmemory.engine import Trace
from flashmemory.indexer import corpus
from flashmemory.indexer.evaluate import (
    against_oracle,
    evaluate,
    oracle_scorer,
    recency_scorer,
    score_row,
)
from flashmemory.indexer.labels import DumpConfig, label_rows, top_p_positives
from flashmemory.indexer.train import TrainConfig, chunk_view, triples
from flashmemory.types import RequestOutput


def test_synthetic_corpus_is_seeded_split_by_family_and_round_trips(tmp_path):
    docs = list(corpus.synthetic(["retrieve", "aggregate", "multihop"], 3, 2000, seed=5))
    again = list(corpus.synthetic(["retrieve", "aggregate", "multihop"], 3, 2000, seed=5))
    assert docs == again and len({d.doc_id for d in docs}) == 9
    assert {d.split for d in docs if d.family == "multihop"} == {"eval"}
    assert {d.split for d in docs if d.family != "multihop"} == {"train"}
    for d in docs:
        for part in d.answer.split("; "):
            assert part in d.context  # every answer is stated in its document
        assert abs(len(d.context) - 2000) < 1000
    path = corpus.write_corpus(docs, tmp_path / "c.parquet")
    assert corpus.read_corpus(path) == docs
    assert [d.family for d in corpus.read_corpus(path, "eval")] == ["multihop"] * 3
    with pytest.raises(ValueError, match="unknown synthetic family"):
        list(corpus.synthetic(["poetry"], 1, 100, 0))


def test_vartrack_chains_are_in_order_and_the_answer_is_the_first_chain():
    for d in corpus.synthetic(["vartrack"], 5, 3000, seed=2):
        assert d.split == "train"
        value = d.question.split()[-1].rstrip("?")
        names = d.answer.split("; ")
        assert len(names) == 4 and f"VAR {names[0]} = {value}." in d.context
        # each assignment comes after the one it copies, so the chain reads front to back
        at = [d.context.index(f"VAR {names[0]} = {value}.")]
        at += [d.context.index(f"VAR {b} = VAR {a}.") for a, b in pairwise(names)]
        assert at == sorted(at)
        assert d.context.count(" = VAR ") == 6  # a second, distracting chain of four


def test_text_documents_from_html(tmp_path):
    body = " ".join(f"Sentence number {i} explains how the parser handles case {i}." for i in
                    range(60))
    (tmp_path / "a.html").write_text(f"<html><script>x()</script><p>{body}</p></html>")
    docs = list(corpus.text_documents(tmp_path, 1, 1500, seed=0))
    assert len(docs) == 1 and "x()" not in docs[0].context and "<p>" not in docs[0].context
    assert docs[0].answer in docs[0].context and docs[0].split == "train"


def test_top_p_positives():
    mass = torch.tensor([0.1, 5.0, 0.0, 3.0, 2.0])
    assert top_p_positives(mass, 0.4, 10) == [1]  # 5.0 of 10.1
    assert top_p_positives(mass, 0.75, 10) == [1, 3]
    assert top_p_positives(mass, 0.8, 10) == [1, 3, 4]
    assert top_p_positives(mass, 1.0, 2) == [1, 3]
    assert top_p_positives(torch.zeros(3), 0.9, 5) == []


def test_label_rows_sum_windows_and_exclude_sink_and_tail():
    # 6 prompt chunks of 4 tokens (24 tokens); sink 1 chunk, tail 4 tokens -> chunks 0 and 5 fixed
    cfg = DumpConfig(window=2, chunk_size=4, sink_chunks=1, recent_tokens=4, top_p=0.6)
    steps = [torch.tensor([9.0, 1, 0, 0, 0, 9]), torch.tensor([9.0, 2, 0, 1, 0, 9, 1]),
             torch.tensor([9.0, 0, 0, 0, 3, 9, 1])]
    doc = corpus.Document("d", "retrieve", "train", "ctx", "q?", "a")
    out = RequestOutput("r", "", [7, 8, 9], "length", "full", None)
    trace = Trace(out, steps, [f"c{i}" for i in range(6)], {0: torch.arange(6.0)})
    rows = label_rows(doc, trace, 24, "base", lambda ids: "".join(f"<{i}>" for i in ids), cfg)
    assert rows[0]["quest"] == [1.0, 2.0, 3.0, 4.0] and rows[1]["quest"] is None
    assert [r["window"] for r in rows] == [0, 1] and [r["step_start"] for r in rows] == [0, 2]
    assert rows[0]["candidates"] == [1, 2, 3, 4] and rows[0]["mass"] == [3.0, 0.0, 1.0, 0.0]
    assert rows[0]["positives"] == [1] and rows[0]["query"] == "base"
    assert rows[1]["mass"] == [0.0, 0.0, 0.0, 3.0] and rows[1]["positives"] == [4]
    assert rows[1]["query"] == "base <7><8>" and rows[1]["output"] == "<7><8><9>"
    assert rows[0]["mass_mean"] is None and rows[0]["positives_mean"] is None  # no mean record


def test_label_rows_carry_the_mean_mass_next_to_the_peak():
    cfg = DumpConfig(window=2, chunk_size=4, sink_chunks=1, recent_tokens=4, top_p=0.6)
    peak = [torch.tensor([9.0, 1, 0, 0, 0, 9]), torch.tensor([9.0, 2, 0, 1, 0, 9, 1])]
    mean = [torch.tensor([0.5, 0.0, 0.1, 0.0, 0.2, 0.2]),
            torch.tensor([0.5, 0.0, 0.3, 0.0, 0.0, 0.1, 0.1])]
    doc = corpus.Document("d", "retrieve", "train", "ctx", "q?", "a")
    out = RequestOutput("r", "", [7, 8], "length", "full", None)
    trace = Trace(out, peak, [f"c{i}" for i in range(6)], {}, mean)
    (row,) = label_rows(doc, trace, 24, "base", lambda ids: "", cfg)
    assert row["mass"] == [3.0, 0.0, 1.0, 0.0] and row["positives"] == [1]
    assert row["mass_mean"] == pytest.approx([0.0, 0.4, 0.0, 0.2])  # chunks 1-4, summed
    assert row["positives_mean"] == [2]  # 0.4 of the 0.6 total: top-p 0.6 needs only chunk 2


def test_recorder_keeps_the_peak_and_the_mean_over_layers_and_heads():
    from flashmemory.decode.step import AttentionRecorder

    rec = AttentionRecorder(num_layers=2)
    # layer 0: 2 heads over chunks 0-2; layer 1: 2 heads over chunks 0-3 (a chunk opened)
    rec.add("r", torch.tensor([0, 1, 2]), torch.tensor([[0.6, 0.4, 0.0], [0.2, 0.2, 0.6]]))
    rec.add("r", torch.tensor([0, 1, 2, 3]),
            torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.5, 0.5]]))
    rec.end_step()
    assert rec.steps["r"][0].tolist() == pytest.approx([1.0, 0.4, 0.6, 0.5])
    assert rec.mean_steps["r"][0].tolist() == pytest.approx([0.45, 0.15, 0.275, 0.125])
    assert float(rec.mean_steps["r"][0].sum()) == pytest.approx(1.0)  # a share of attention
    rec.add("r", torch.tensor([0]), torch.tensor([[1.0]]))  # the next step starts afresh
    rec.end_step()
    assert rec.mean_steps["r"][1].tolist() == [1.0] and len(rec.steps["r"]) == 2


def test_read_labels_reads_the_mean_mass_or_refuses_a_dump_without_it(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from flashmemory.indexer.train import read_labels

    row = dict(doc_id="d", split="train", candidates=[1, 2], mass=[3.0, 1.0], positives=[1],
               mass_mean=[0.1, 0.3], positives_mean=[2])
    pq.write_table(pa.Table.from_pylist([row]), tmp_path / "new.parquet")
    (peak,) = read_labels(tmp_path / "new.parquet")
    (mean,) = read_labels(tmp_path / "new.parquet", mass="mean")
    assert peak["mass"] == [3.0, 1.0] and peak["positives"] == [1]
    assert mean["mass"] == pytest.approx([0.1, 0.3]) and mean["positives"] == [2]
    old = {k: v for k, v in row.items() if not k.endswith("_mean")}
    pq.write_table(pa.Table.from_pylist([old]), tmp_path / "old.parquet")
    with pytest.raises(ValueError, match="without mass_mean"):
        read_labels(tmp_path / "old.parquet", mass="mean")
    with pytest.raises(ValueError, match="mass must be one of"):
        read_labels(tmp_path / "new.parquet", mass="max")


def test_score_row_and_evaluate_from_known_inputs():
    row = dict(doc_id="d", window=0, family="f", chunk_texts=["x"] * 10,
               candidates=[1, 2, 3, 4, 5], mass=[1.0, 0.0, 6.0, 0.0, 3.0], positives=[3, 5])
    s = score_row(row, torch.tensor([5.0, 4, 3, 2, 1]), 0.2)  # keeps 2 chunks: 1 and 2
    assert (s.mass_recall, s.recall, s.precision) == (0.1, 0.0, 0.0)
    s = score_row(row, torch.tensor(row["mass"]), 0.2)  # the oracle keeps 3 and 5
    assert (s.mass_recall, s.recall, s.precision) == (0.9, 1.0, 1.0)
    res = evaluate([row], {"oracle": oracle_scorer, "recency": recency_scorer}, (0.1, 0.3))
    by = {(r["selector"], r["budget"], r["family"]): r for r in res}
    assert by[("oracle", 0.1, "all")]["mass_recall"] == pytest.approx(60.0)
    assert by[("recency", 0.3, "f")]["recall"] == pytest.approx(100.0)  # keeps 5, 4, 3
    assert by[("recency", 0.3, "f")]["precision"] == pytest.approx(200 / 3)
    # the first scores keep 10% of the mass where the oracle keeps 90%: a ninth of its share
    got, share = against_oracle([row], [torch.tensor([5.0, 4, 3, 2, 1])], 0.2)
    assert got == pytest.approx(10.0) and share == pytest.approx(100 / 9)


def test_triples_use_low_mass_chunks_of_the_same_document_as_hard_negatives():
    row = dict(query="q", chunk_texts=["aaa", "bbb", "ccc", "ddd", "eee"], candidates=[1, 2, 3, 4],
               mass=[5.0, 0.1, 0.2, 0.0], positives=[1])
    got = triples([row], TrainConfig(hard_negatives=2, overlap_chars=1))
    assert len(got) == 2 and all(t[0] == "q" and t[1] == "abbb" for t in got)
    assert {t[2] for t in got} <= {chunk_view(row["chunk_texts"], i, 1) for i in (2, 3, 4)}


def test_adaptive_selection_between_floor_and_ceiling():
    from flashmemory.indexer.evaluate import Adaptive

    row = dict(chunk_texts=["x"] * 20, candidates=list(range(1, 11)),
               mass=[1.0] + [0.0] * 9, positives=[1])
    scores = torch.linspace(1.0, 0.1, 10)  # candidate 1 scores highest
    assert score_row(row, scores, Adaptive(0.75)).kept == pytest.approx(3 / 20)  # 1.0, .9, .8
    assert score_row(row, scores, Adaptive(0.0)).kept == pytest.approx(4 / 20)  # ceiling 20%
    low = score_row(row, scores, Adaptive(2.0))  # nothing above: the floor keeps 1 chunk
    assert low.kept == pytest.approx(1 / 20) and low.mass_recall == 1.0


def test_quest_scores_rank_the_chunk_whose_key_bounds_match_the_query():
    from flashmemory.decode.step import quest_scores

    k = torch.zeros(1, 10, 4)  # 1 KV head, 10 tokens in chunks of 4 (the last one partial)
    k[0, 5, 2] = 3.0  # chunk 1 holds a key pointing along dim 2
    k[0, 9, 0] = -3.0  # chunk 2 (partial) along -dim 0
    q = torch.tensor([[0.0, 0.0, 2.0, 0.0], [-2.0, 0.0, 0.0, 0.0]])  # 2 query heads share it
    s = quest_scores(q, k, 3, 4)
    assert s.shape == (3,) and s[1] > s[0] and s[2] > s[0]
    assert quest_scores(q[:1], k, 3, 4).argmax() == 1


def test_training_can_rederive_sharper_positives_from_the_mass():
    from flashmemory.indexer.train import positives

    row = dict(query="q", chunk_texts=["a", "b", "c", "d", "e"], candidates=[1, 2, 3, 4],
               mass=[1.0, 6.0, 2.0, 1.0], positives=[1, 2, 3, 4])
    assert positives(row, TrainConfig()) == {1, 2, 3, 4}  # the dump's label
    assert positives(row, TrainConfig(max_positives=1)) == {2}
    assert positives(row, TrainConfig(top_p=0.7)) == {2, 3}
    got = triples([row], TrainConfig(max_positives=1, overlap_chars=0))
    assert {t[1] for t in got} == {"c"}
