"""Retrieval-head label mass: recorded per head, heads chosen on evidence, read back as labels."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from flashmemory.decode.step import AttentionRecorder
from flashmemory.engine import Trace
from flashmemory.indexer import corpus
from flashmemory.indexer import retrieval_heads as heads
from flashmemory.indexer.labels import DumpConfig, label_rows
from flashmemory.indexer.train import read_labels
from flashmemory.types import RequestOutput


def test_recorder_keeps_every_heads_mass_per_layer_when_asked():
    rec = AttentionRecorder(num_layers=2, keep_heads=True)
    rec.add("r", torch.tensor([0, 1, 2]), torch.tensor([[0.6, 0.4, 0.0], [0.2, 0.2, 0.6]]))
    rec.add("r", torch.tensor([0, 1, 2, 3]),
            torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.5, 0.5]]))
    rec.end_step()
    (step,) = rec.head_steps["r"]
    assert step.shape == (2, 2, 4)  # layers, heads, chunks seen
    assert step[0].flatten().tolist() == pytest.approx([0.6, 0.4, 0, 0, 0.2, 0.2, 0.6, 0])
    assert step[1, 1].tolist() == [0.0, 0.0, 0.5, 0.5]
    off = AttentionRecorder(num_layers=1)
    off.add("r", torch.tensor([0]), torch.tensor([[1.0]]))
    off.end_step()
    assert off.head_steps == {}  # not kept unless asked


def _trace(per_head_steps: list[torch.Tensor]) -> Trace:
    peak = [m.amax((0, 1)) for m in per_head_steps]
    mean = [m.mean((0, 1)) for m in per_head_steps]
    out = RequestOutput("r", "", list(range(len(peak))), "length", "full", None)
    texts = ["sink", "code 123456 here", "filler", "more filler", "tail text", "end"]
    return Trace(out, peak, texts, {}, mean, per_head_steps)


def _steps(evidence_head: int, n_steps: int) -> list[torch.Tensor]:
    """1 layer x 3 heads over 6 chunks: ``evidence_head`` reads chunk 1, head 0 reads chunk 3
    hard (the peak and the mean both follow it), the rest spread."""
    out = []
    for _ in range(n_steps):
        m = torch.full((1, 3, 6), 0.05)
        m[0, 0, 3] = 0.75
        m[0, evidence_head] = torch.tensor([0.1, 0.6, 0.05, 0.05, 0.1, 0.1])
        out.append(m)
    return out


def test_label_rows_write_per_head_mass_and_window_steps():
    cfg = DumpConfig(window=2, chunk_size=4, sink_chunks=1, recent_tokens=4, top_p=0.45)
    doc = corpus.Document("d", "retrieve", "train", "ctx", "q?", "123456")
    rows = label_rows(doc, _trace(_steps(2, 3)), 24, "base", lambda ids: "", cfg)
    assert [r["window_steps"] for r in rows] == [2, 1]
    r = rows[0]
    assert r["candidates"] == [1, 2, 3, 4] and r["num_layers"] == 1 and r["num_heads"] == 3
    m = heads.head_matrix(r)
    assert m.shape == (3, 4)
    assert m[2].tolist() == pytest.approx([1.2, 0.1, 0.1, 0.2])  # two steps summed
    assert m[0, 2] == pytest.approx(1.5) and r["positives"] == [3]  # the peak follows head 0


def _dump(tmp_path, evidence_head: int = 2):
    cfg = DumpConfig(window=4, chunk_size=4, sink_chunks=1, recent_tokens=4, top_p=0.45)
    rows = []
    for i, (fam, split) in enumerate([("retrieve", "train"), ("vartrack", "train"),
                                      ("text", "train"), ("multihop", "eval")]):
        answer = "" if fam == "text" else "x; 123456"  # "x" is too short to locate
        doc = corpus.Document(f"d{i}", fam, split, "ctx", "q?", answer)
        rows += label_rows(doc, _trace(_steps(evidence_head, 4)), 24, "base", lambda ids: "",
                           cfg)
    path = tmp_path / "labels"
    path.mkdir()
    pq.write_table(pa.Table.from_pylist(rows), path / "part-00000.parquet")
    return path


def test_heads_chosen_on_training_evidence_then_read_as_the_label(tmp_path):
    path = _dump(tmp_path)
    assert heads.evidence(read_labels(path)[0]) == [0]  # candidate 0 is chunk 1, the code
    with pytest.raises(FileNotFoundError, match="flashmemory indexer heads"):
        read_labels(path, mass="retrieval")
    info = heads.choose(path, top=1, top_p=0.5)
    assert info["heads"] == [2] and info["layer_head"] == [[0, 2]]
    assert info["rows"] == 2 and info["families"] == ["retrieve", "vartrack"]  # "": no vote
    # lift: 0.6 of head 2's attention on 1 of 6 chunks, 3.6x an even spread; head 0: 0.3x
    assert info["scores"][2] == pytest.approx(3.6) and info["scores"][0] == pytest.approx(0.3)
    assert json.loads(heads.heads_path(path).read_text())["heads"] == [2]
    peak = read_labels(path, "eval")
    ret = read_labels(path, "eval", mass="retrieval")
    assert peak[0]["positives"] == [3]  # where attention goes hardest
    assert ret[0]["positives"] == [1]  # where the retrieval head reads: the evidence
    assert ret[0]["mass"] == pytest.approx([2.4, 0.2, 0.2, 0.4])


def test_evidence_spans_chunk_boundaries_and_skips_short_parts():
    row = dict(answer="965943; ab; q12", chunk_texts=["q12", "is 96", "5943.", "x", "q1", "2"],
               candidates=[1, 2, 3, 4, 5])
    # the code runs over chunks 1-2 (a tokenizer cuts digits anywhere); "q12" in the sink
    # chunk 0 is not a candidate, and again over chunks 4-5; "ab" is too short to look for
    assert heads.evidence(row) == [0, 1, 3, 4]
    assert heads.evidence(dict(row, answer="")) == []


def test_heads_refuse_dumps_without_per_head_mass_or_answers(tmp_path):
    row = dict(doc_id="d", window=0, family="retrieve", split="train", candidates=[1],
               chunk_texts=["a", "b"], mass=[1.0], positives=[1], answer="bbb",
               window_steps=1, num_heads=None, mass_heads=None)
    pq.write_table(pa.Table.from_pylist([row]), tmp_path / "old.parquet")
    with pytest.raises(ValueError, match="no training row"):
        heads.choose(tmp_path / "old.parquet", top=1)  # "bbb" is in no chunk
    row["chunk_texts"] = ["a", "bbb"]
    pq.write_table(pa.Table.from_pylist([row]), tmp_path / "old.parquet")
    with pytest.raises(ValueError, match="dump it again"):
        heads.choose(tmp_path / "old.parquet", top=1)
    path = _dump(tmp_path)
    with pytest.raises(ValueError, match="3 heads"):
        heads.choose(path, top=4)


def test_heads_cli_writes_the_file_and_evaluate_reads_it(tmp_path, capsys):
    from flashmemory.cli import main

    path = _dump(tmp_path)
    out = tmp_path / "h.json"
    assert main(["indexer", "heads", "--labels", str(path), "--top", "2", "--out", str(out)]) == 0
    assert "layer   0 head   2  evidence lift" in capsys.readouterr().out
    assert json.loads(out.read_text())["heads"][0] == 2
    assert main(["indexer", "heads", "--labels", str(path), "--top", "0"]) != 0
    assert "--top" in capsys.readouterr().err
