"""The position prior (indexer.prior) and how training carries it: fitted from known rows,
saved and loaded, shipped in kl examples and added to the student's logits."""

from __future__ import annotations

import json
import math

import pytest
import torch

from flashmemory.indexer.prior import PRIOR_FILE, PositionPrior, load_prior
from flashmemory.indexer.train import MassKLLoss, TrainConfig, mass_groups


def _row(cands: list[int], mass: list[float]) -> dict:
    texts = [f"chunk {i} text." for i in range(max(cands) + 3)]
    return dict(doc_id="d", window=0, query="q", chunk_texts=texts, candidates=cands, mass=mass)


def test_fit_averages_relative_mass_by_distance_and_shrinks_to_even():
    rows = [_row([1, 2, 3, 4], [0.0, 0.0, 3.0, 1.0]),  # mean 1: relative 0, 0, 3, 1
            _row([5, 6], [1.0, 1.0]),  # mean 1: relative 1, 1
            _row([1, 2], [0.0, 0.0])]  # no mass: not counted
    prior = PositionPrior.fit(rows, max_distance=2, shrink=1.0)
    assert prior.rows == 2 and prior.max_distance == 2
    # distance 0: relative 1 and 1 -> (2 + 1) / (2 + 1); distance 1: 3 and 1 -> (4 + 1) / 3;
    # distance >= 2 (chunks 1 and 2 of the first row): 0 and 0 -> 1 / 3
    assert prior.table == pytest.approx([1.0, 5 / 3, 1 / 3])
    lp = prior.log_prior([10, 20, 21, 22])  # distances 12 (capped to 2), 2, 1, 0
    assert lp.tolist() == pytest.approx([math.log(1 / 3), math.log(1 / 3), math.log(5 / 3), 0.0])
    assert prior.log_prior([]).numel() == 0
    with pytest.raises(ValueError, match="no label row"):
        PositionPrior.fit([rows[2]])
    with pytest.raises(ValueError, match="max_distance"):
        PositionPrior.fit(rows, max_distance=0)


def test_prior_round_trips_and_refuses_a_newer_version(tmp_path):
    prior = PositionPrior([0.5, 2.0, 1.0], rows=7)
    prior.save(tmp_path)
    back = load_prior(tmp_path)
    assert back.table == prior.table and back.rows == 7
    assert load_prior(tmp_path / "missing") is None
    blob = json.loads((tmp_path / PRIOR_FILE).read_text())
    (tmp_path / PRIOR_FILE).write_text(json.dumps({**blob, "version": 99}))
    with pytest.raises(ValueError, match="version 99"):
        load_prior(tmp_path)
    with pytest.raises(ValueError, match="positive"):
        PositionPrior([1.0, 0.0])


def test_kl_examples_carry_each_chunks_log_prior_after_the_masses():
    row = _row([1, 2, 3, 4, 5, 6], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    prior = PositionPrior([2.0, 1.0, 0.5])
    cfg = TrainConfig(loss="kl", group=3, overlap_chars=0, position_prior=True)
    plain = mass_groups([row], cfg)
    shifted = mass_groups([row], cfg, prior)
    assert len(shifted) == len(plain) == 2
    for a, b in zip(plain, shifted, strict=True):
        assert b["label"][:3] == a["label"]  # the same shuffle, the same masses
        for j in range(3):
            c = int(b[f"chunk_{j}"].split()[1])  # "chunk {i} text."
            d = min(6 - c, 2)
            assert b["label"][3 + j] == pytest.approx(math.log(prior.table[d]))
    with pytest.raises(ValueError, match="kl"):
        TrainConfig(loss="mnrl", position_prior=True)


class _Fixed(torch.nn.Module):
    """Stands in for a sentence-transformers model: features are already embeddings."""

    def forward(self, features: dict) -> dict:
        return {"sentence_embedding": features["emb"]}


def test_kl_loss_adds_the_offsets_to_the_logits():
    torch.manual_seed(0)
    q, docs = torch.randn(2, 4), torch.randn(3, 2, 4)
    mass = torch.tensor([[1.0, 0.0, 3.0], [0.5, 0.5, 0.0]])
    offset = torch.tensor([[0.0, -1.0, 2.0], [1.0, 0.0, -3.0]])
    loss = MassKLLoss(_Fixed(), temperature=0.1)
    feats = [{"emb": q}] + [{"emb": d} for d in docs]
    got = loss(feats, torch.cat([mass, offset], -1))
    cos = torch.einsum("kbe,be->bk", torch.nn.functional.normalize(docs, dim=-1),
                       torch.nn.functional.normalize(q, dim=-1))
    want = torch.nn.functional.kl_div(torch.log_softmax(cos / 0.1 + offset, -1),
                                      mass / mass.sum(-1, keepdim=True), reduction="batchmean")
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    assert loss(feats, mass).item() != pytest.approx(got.item())  # without offsets: different
