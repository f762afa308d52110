"""The indexer pipeline end to end on CPU: a label dump with SmolLM2 (resumable), and training
MiniLM on a toy task that the zero-shot model gets wrong, with a save / load round trip."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from flashmemory.indexer import corpus
from flashmemory.indexer import retrieval_heads as heads
from flashmemory.indexer.evaluate import evaluate, neural_scorer
from flashmemory.indexer.head import fit_from_labels
from flashmemory.indexer.labels import DumpConfig, done_doc_ids, dump
from flashmemory.indexer.train import TrainConfig, read_labels, read_meta, train


def test_dump_writes_labels_and_resumes(tmp_path):
    from flashmemory import LLM

    docs = list(corpus.synthetic(["retrieve", "multihop"], 1, 1400, seed=5))  # code mid-text
    llm = LLM("smollm2-135m-instruct")
    cfg = DumpConfig(steps=6, window=4, chunk_size=32, recent_tokens=32, flush_every=1)
    out = tmp_path / "labels"
    assert dump(llm, docs[:1], out, cfg, progress=False) == 2  # windows [0, 4) and [4, 6)
    assert dump(llm, docs, out, cfg, progress=False) == 2  # only the second document is new
    assert done_doc_ids(out) == {d.doc_id for d in docs}
    rows = read_labels(out)
    assert len(rows) == 4 and {r["split"] for r in rows} == {"train", "eval"}
    for r in rows:
        assert len(r["mass"]) == len(r["candidates"]) and set(r["positives"]) <= set(
            r["candidates"])
        assert 0 not in r["candidates"]  # the sink is always resident, never a label
        assert sum(r["mass"]) > 0 and r["positives"]
        assert len(r["quest"]) == len(r["candidates"])  # recorded at each window's first step
        # the mean over layers and heads: a share of each step's attention, summed over <= 4
        # steps, so below the window's length; its positives come from it
        assert len(r["mass_mean"]) == len(r["candidates"])
        assert 0 < sum(r["mass_mean"]) < 4 and set(r["positives_mean"]) <= set(r["candidates"])
    assert rows[1]["query"].startswith(rows[0]["query"])  # window 1 adds the generated text
    mean = read_labels(out, mass="mean")
    assert [r["mass"] for r in mean] == [r["mass_mean"] for r in rows]
    # every (layer, query head)'s own mass: per step a share of that head's attention, so a
    # head's mass on the candidates sums to at most the window's steps; their mean is mass_mean
    cfg_model = llm.model.config
    for r in rows:
        assert r["num_layers"] == cfg_model.num_layers and 1 <= r["window_steps"] <= 4
        per = torch.tensor(r["mass_heads"]).view(r["num_heads"], len(r["candidates"]))
        assert float(per.sum(1).max()) <= r["window_steps"] + 1e-4
        assert per.mean(0).tolist() == pytest.approx(r["mass_mean"], abs=1e-5)
    # retrieval heads: the retrieve document's code is in a candidate chunk; the multihop
    # (eval) row is scored with the heads the training row chose
    info = heads.choose(out, top=4)
    assert info["rows"] >= 1 and len(info["heads"]) == 4
    ret = read_labels(out, "eval", mass="retrieval")
    assert all(len(r["mass"]) == len(r["candidates"]) and r["positives"] for r in ret)


def _toy_rows(n: int, seed: int) -> list[dict]:
    """The positive chunk shares no words with the query; distractors repeat the query's words."""
    rng = random.Random(seed)
    animals = ["falcon", "heron", "otter", "lynx", "badger", "marten", "ibis", "stoat"]
    rows = []
    for i in range(n):
        texts = [f"Preface number {i}."]
        for j in range(8):
            texts.append(f"Ledger line {j}: where is the launch code kept? Nobody recalls the "
                         f"launch code, said clerk {rng.randint(1, 99)}.")
        pos = rng.randint(1, 8)
        texts[pos] = (f"Ledger line {pos}: the {rng.choice(animals)} with the brass ring rests "
                      f"beside crate {rng.randint(10, 99)}.")
        rows.append(dict(doc_id=f"toy-{seed}-{i}", family="toy", split="train", window=0,
                         step_start=0, query="Where is the launch code kept?",
                         chunk_texts=texts, candidates=list(range(1, 9)),
                         mass=[5.0 if c == pos else 0.1 for c in range(1, 9)], positives=[pos],
                         answer="", output=""))
    return rows


def test_training_fixes_what_zero_shot_gets_wrong_and_round_trips(tmp_path):
    pq.write_table(pa.Table.from_pylist(_toy_rows(48, 0)), tmp_path / "toy.parquet")
    held_out = _toy_rows(12, 1)
    zero = evaluate(held_out, {"minilm": neural_scorer("minilm")}, (0.125,))
    zero_recall = next(r["recall"] for r in zero if r["family"] == "all")
    assert zero_recall < 50  # the lexical distractors win zero-shot
    out = tmp_path / "trained"
    meta = train(tmp_path / "toy.parquet", out,
                 TrainConfig(epochs=3, batch_size=8, learning_rate=1e-4, logging_steps=5,
                             overlap_chars=0), device="cpu")
    assert meta["loss_curve"][-1] < meta["loss_curve"][0]
    assert read_meta(out)["threshold"] == pytest.approx(meta["threshold"])
    trained = evaluate(held_out, {"trained": neural_scorer(str(out))}, (0.125,))
    trained_recall = next(r["recall"] for r in trained if r["family"] == "all")
    assert trained_recall >= zero_recall + 40, (zero_recall, trained_recall)


def _train_kl(tmp_path, rows: list[dict], out: str, **cfg) -> tuple[Path, dict]:
    """Write ``rows`` as a label file and train a kl indexer on them (CPU, groups of 8)."""
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / f"{out}.parquet")
    cfg = dict(batch_size=8, overlap_chars=0, loss="kl", group=8) | cfg
    meta = train(tmp_path / f"{out}.parquet", tmp_path / out, TrainConfig(**cfg), device="cpu")
    return tmp_path / out, meta


def test_listwise_mass_distillation_learns_the_toy_task(tmp_path):
    held_out = _toy_rows(12, 1)
    out, meta = _train_kl(tmp_path, _toy_rows(48, 0), "trained-kl", epochs=3,
                          learning_rate=1e-4, logging_steps=5)
    assert meta["config"]["loss"] == "kl" and meta["examples"] == 44  # 48 - 4 calibration rows
    assert meta["loss_curve"][-1] < meta["loss_curve"][0]
    res = evaluate(held_out, {"kl": neural_scorer(str(out))}, (0.125,))
    assert next(r["recall"] for r in res if r["family"] == "all") >= 80


def test_mass_groups_cover_each_row_and_keep_their_masses(caplog):
    from flashmemory.indexer.train import mass_groups

    rows = _toy_rows(2, 0)
    rows[1]["candidates"], rows[1]["mass"] = rows[1]["candidates"][:5], rows[1]["mass"][:5]
    rows.append({**rows[0], "mass": [0.0] * 8})  # no mass: no example
    ex = mass_groups(rows, TrainConfig(group=3, overlap_chars=0))
    assert len(ex) == 3 + 2  # 8 candidates -> 3 groups (last topped up), 5 -> 2
    for e in ex:
        assert len(e["label"]) == 3 and sum(e["label"]) > 0
        assert len({e[f"chunk_{j}"] for j in range(3)}) == 3  # no chunk twice in a group
    twice = mass_groups(rows, TrainConfig(group=3, overlap_chars=0, groupings=2))
    assert len(twice) == 2 * len(ex)  # a second, independent shuffle of every row
    with caplog.at_level(logging.WARNING, logger="flashmemory.indexer.train"):
        wide = mass_groups(rows, TrainConfig(group=6, overlap_chars=0))
    assert len(wide) == 2  # the 5-candidate row is skipped, and said so
    assert "1 of 3 training rows have fewer than --group 6 candidates" in caplog.text
    with pytest.raises(ValueError, match="loss"):
        TrainConfig(loss="hinge")


def _position_rows(n: int, seed: int) -> list[dict]:
    """The attention mass sits on the second-to-last candidate; the texts say nothing of it."""
    rng = random.Random(seed)
    words = ["amber", "basalt", "cedar", "delta", "ember", "fjord", "garnet", "harbor"]
    rows = []
    for i in range(n):
        k = rng.randint(10, 16)
        texts = [" ".join(rng.choice(words) for _ in range(12)) + "." for _ in range(k + 2)]
        cands = list(range(1, k + 1))
        rows.append(dict(doc_id=f"pos-{seed}-{i}", family="pos", split="train", window=0,
                         step_start=0, query="Which harbor was named first?", chunk_texts=texts,
                         candidates=cands, mass=[5.0 if c == k - 1 else 0.1 for c in cands],
                         positives=[k - 1], answer="", output=""))
    return rows


def test_fit_head_adds_what_the_text_score_lacks_and_serves_through_it(tmp_path):
    from flashmemory.indexer.neural import NeuralIndexer

    pq.write_table(pa.Table.from_pylist(_position_rows(40, 0)), tmp_path / "pos.parquet")
    held_out = _position_rows(12, 1)
    out = tmp_path / "with-head"
    meta = fit_from_labels(tmp_path / "pos.parquet", "minilm", out, steps=200)
    assert meta["head"]["fit_rows"] == 36 and meta["head"]["calibration_rows"] == 4
    assert meta["head"]["loss_curve"][-1] < meta["head"]["loss_curve"][0]
    idx = NeuralIndexer(str(out))
    assert idx.head is not None and idx.threshold == pytest.approx(meta["threshold"])
    res = evaluate(held_out, {"minilm": neural_scorer("minilm"), "head": neural_scorer(str(out))},
                   (0.05,))
    recall = {r["selector"]: r["recall"] for r in res if r["family"] == "all"}
    assert recall["minilm"] < 40 and recall["head"] == 100, recall
    with pytest.raises(ValueError, match="not empty"):
        fit_from_labels(tmp_path / "pos.parquet", "minilm", out)


def test_position_prior_trains_in_and_serves_with_the_encoder(tmp_path):
    from flashmemory.indexer.neural import NeuralIndexer

    held_out = _position_rows(12, 1)
    out, meta = _train_kl(tmp_path, _position_rows(40, 0), "with-prior", epochs=1,
                          learning_rate=1e-5, logging_steps=2, position_prior=True)
    assert meta["position_prior"]["rows"] == 36  # the 4 calibration rows are not fitted on
    idx = NeuralIndexer(str(out))
    assert idx.prior is not None and idx.head is None
    # the mass sits one chunk before the last candidate: the prior's largest entry
    assert max(range(len(idx.prior.table)), key=idx.prior.table.__getitem__) == 1
    row = held_out[0]
    idx.add_request("r", row["chunk_texts"])
    served = idx.candidate_scores("r", row["query"], row["candidates"], len(row["chunk_texts"]))
    text = idx.candidate_scores("r", row["query"], row["candidates"], len(row["chunk_texts"]),
                                head=False)
    assert torch.allclose(served, text / 0.05 + idx.prior.log_prior(row["candidates"]))
    res = evaluate(held_out, {"minilm": neural_scorer("minilm"), "prior": neural_scorer(str(out))},
                   (0.05,))
    recall = {r["selector"]: r["recall"] for r in res if r["family"] == "all"}
    assert recall["minilm"] < 40 and recall["prior"] == 100, recall
    with pytest.raises(ValueError, match="position prior"):  # fit-head would shadow it
        fit_from_labels(tmp_path / "with-prior.parquet", str(out), tmp_path / "head-on-prior")
