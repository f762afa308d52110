"""The position-aware score head: its features from known inputs, fitting a position signal the
text score lacks, and the save / load round trip."""

from __future__ import annotations

import pytest
import torch

from flashmemory.indexer.head import FEATURES, HEAD_FILE, ScoreHead, features, fit_head, load_head


def test_features_from_known_inputs() -> None:
    cands = torch.tensor([2, 3, 5])
    f = features(cands, 8, torch.tensor([0.1, 0.5, 0.3]))
    assert f.shape == (3, len(FEATURES))
    col = {name: f[:, i] for i, name in enumerate(FEATURES)}
    assert torch.allclose(col["score_z"], torch.tensor([-1.0, 1.0, 0.0]), atol=1e-4)
    assert col["prev_z"].tolist() == pytest.approx([-3.0, -1.0, -3.0], abs=1e-4)  # 4: no cand
    assert col["next_z"].tolist() == pytest.approx([1.0, -3.0, -3.0], abs=1e-4)
    assert col["position"].tolist() == pytest.approx([2 / 8, 3 / 8, 5 / 8])
    assert col["dist_last_rel"].tolist() == pytest.approx([3 / 8, 2 / 8, 0.0])
    assert col["dist_last_log"].tolist() == pytest.approx(torch.log1p(torch.tensor(
        [3.0, 2.0, 0.0])).tolist())
    assert col["is_first"].tolist() == [1, 0, 0] and col["is_last"].tolist() == [0, 0, 1]
    assert col["score"].tolist() == pytest.approx([0.1, 0.5, 0.3])


def _rows(n: int, seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Rows of 12-40 candidates whose mass sits on the second-to-last one; the text score is
    noise."""
    g = torch.Generator().manual_seed(seed)
    feats, masses = [], []
    for _ in range(n):
        k = int(torch.randint(12, 40, (1,), generator=g))
        cands = torch.arange(1, k + 1)
        mass = torch.full((k,), 0.05)
        mass[-2] = 5.0
        feats.append(features(cands, k + 3, torch.rand(k, generator=g)))
        masses.append(mass)
    return feats, masses


@pytest.mark.parametrize("hidden", [0, 16])
def test_fit_learns_the_position_signal_and_round_trips(tmp_path, hidden: int) -> None:
    feats, masses = _rows(40, 0)
    head, curve = fit_head(feats, masses, hidden, steps=200)
    assert curve[-1] < 0.5 * curve[0]
    test_f, _ = _rows(20, 1)
    with torch.no_grad():
        top = [int(head(f).argmax()) for f in test_f]
    assert top == [len(f) - 2 for f in test_f]  # the noise score alone would rarely do this
    head.save(tmp_path, {"note": "test"})
    again = load_head(tmp_path)
    assert again is not None and again.hidden == hidden
    with torch.no_grad():
        assert torch.equal(again(test_f[0]), head(test_f[0]))
    assert load_head(tmp_path / "elsewhere") is None


def test_a_head_of_another_feature_set_is_refused(tmp_path) -> None:
    ScoreHead(0).save(tmp_path, {})
    blob = torch.load(tmp_path / HEAD_FILE, weights_only=True)
    blob["features"] = blob["features"][:-1]
    torch.save(blob, tmp_path / HEAD_FILE)
    with pytest.raises(ValueError, match="another version or feature set"):
        load_head(tmp_path)


def test_fit_needs_rows() -> None:
    with pytest.raises(ValueError, match="no rows"):
        fit_head([], [])
