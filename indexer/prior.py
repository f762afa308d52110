"""A position prior over candidate chunks, for training the indexer as a product of experts.

On long prompts a backbone's retrieval heads also glance at prose just before the recency tail
that holds nothing the question names (docs/BENCHMARKS.md section 8, run 12): part of the
attention mass follows the distance to the end of the prompt, not the text. The prior is that
part, learned from label rows: for each distance ``d`` from a candidate to the row's last
candidate (the chunk just before the tail), the mean of the candidate's mass relative to an
even spread over the row, shrunk toward 1 where few rows saw that distance. Distances past
``max_distance`` share one entry.

Trained with ``--position-prior``, the dual encoder's softmax over a group of chunks is
``cosine / temperature + log prior(d)``, so the encoder learns what the prior does not explain,
and a serving indexer that carries the prior (``position_prior.json`` in its directory) ranks
candidates by the same sum.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

PRIOR_FILE = "position_prior.json"
PRIOR_VERSION = 1


class PositionPrior:
    """Relative attention mass by distance to the last candidate (``table[d]``, 1.0 = even)."""

    def __init__(self, table: list[float], rows: int = 0) -> None:
        if not table or min(table) <= 0:
            raise ValueError("a position prior needs a non-empty table of positive values")
        self.table = [float(v) for v in table]
        self.rows = rows
        self._log_table = torch.tensor(self.table).log()  # read on every re-prediction

    @property
    def max_distance(self) -> int:
        return len(self.table) - 1

    @classmethod
    def fit(cls, rows: list[dict[str, Any]], max_distance: int = 64,
            shrink: float = 4.0) -> PositionPrior:
        """From label rows (``candidates`` ascending, ``mass`` per candidate): entry ``d`` is
        ``(sum of relative masses at d + shrink) / (rows seen at d + shrink)``."""
        if max_distance < 1 or shrink < 0:
            raise ValueError("max_distance >= 1 and shrink >= 0 are required")
        total = [0.0] * (max_distance + 1)
        count = [0] * (max_distance + 1)
        used = 0
        for r in rows:
            mass = [max(0.0, float(m)) for m in r["mass"]]
            cands = r["candidates"]
            if not cands or sum(mass) <= 0:
                continue
            used += 1
            mean = sum(mass) / len(mass)
            last = cands[-1]
            for c, m in zip(cands, mass, strict=True):
                d = min(last - c, max_distance)
                total[d] += m / mean
                count[d] += 1
        if not used:
            raise ValueError("no label row with candidates and mass to fit a position prior on")
        shrink = max(shrink, 1e-6)
        table = [(t + shrink) / (n + shrink) for t, n in zip(total, count, strict=True)]
        return cls(table, used)

    def log_prior(self, candidates: torch.Tensor | list[int]) -> torch.Tensor:
        """``log table[d]`` of each candidate (ascending chunk ids)."""
        c = torch.as_tensor(candidates, dtype=torch.long)
        if len(c) == 0:
            return torch.zeros(0)
        d = (c[-1] - c).clamp(0, self.max_distance)
        return self._log_table[d]

    def score(self, cosine: torch.Tensor, candidates: torch.Tensor | list[int],
              temperature: float) -> torch.Tensor:
        """The serving score ``cosine / temperature + log prior`` (the logits the encoder was
        trained on), for one request's candidates."""
        return cosine / temperature + self.log_prior(candidates)

    def save(self, directory: Path) -> Path:
        path = directory / PRIOR_FILE
        path.write_text(json.dumps({"version": PRIOR_VERSION, "rows": self.rows,
                                    "table": [round(v, 6) for v in self.table]}, indent=1))
        return path


def load_prior(directory: Path) -> PositionPrior | None:
    """The prior saved in an indexer directory, or None when it has none."""
    path = directory / PRIOR_FILE
    if not path.exists():
        return None
    blob = json.loads(path.read_text())
    if blob.get("version", 0) > PRIOR_VERSION:
        raise ValueError(f"{path}: a position prior of version {blob.get('version')} "
                         f"(this build reads v{PRIOR_VERSION})")
    return PositionPrior(blob["table"], int(blob.get("rows", 0)))
