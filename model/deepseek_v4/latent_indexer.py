"""The paper's latent memory indexer for DeepSeek-V4: a small query tower over the backbone's
hidden states that scores CSA pages against their frozen native lightning-indexer keys, and the
``LatentSelector`` that plugs it into ``lsa.LSADecoder``.

Trained by ``latent_train.train_latent`` from a ``latent_dump`` (never from the backbone); loaded
with ``load_latent``; used by ``LSADecoder`` (via ``lsa.HiddenStateSelector``) and evaluation.

Scoring. For each chosen CSA layer l, the tower maps the layer's attention input h_l (hidden,)
(``lsa.HiddenTap``: what the native indexer reads, at the last token processed) to one query
q_l (Di,) in the space of that layer's index keys: q_l = W_l silu(U rmsnorm(h_l)) (U shared over
layers, W_l per layer). A page's logit is
    logit(page) = max_{l, e} q_l . k_{l,e} / sqrt(Di) + b
over its entries e and the chosen layers (``pooling="max"``), or the smooth max
logsumexp_{l, e} (``pooling="logsumexp"``); b is a learned bias; P(needed in the next window) =
sigmoid(logit). The default is max: it is the label's own logic (a page is needed when one of
its entries is in the native indexer's nucleus), and it trains faster: logsumexp only nears the
max once the queries grow large, and on the unit test's toy task it needed about twice the
epochs for the same recall. The keys are read from the ``PageStore`` and never recomputed; only
the tower (U, W, norm, b) is trained.

Selection (every ``repredict_every`` = 64 decode steps): keep the candidate pages with
sigmoid > ``threshold`` (0.5), at most KMAX = min(the decoder's budget k, ``kmax``) of them, the
highest-scoring first, and at least ``min_pages`` (the floor) whatever their scores; the decoder
adds the sink page, the recency tail and the pages decode writes.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from flashmemory.indexer.base import SelectionRequest
from flashmemory.indexer.train import META_FILE
from flashmemory.model.deepseek_v4.layers import RMSNorm
from flashmemory.model.deepseek_v4.pages import PageStore

FORMAT = "flashmemory-latent-indexer"
FORMAT_VERSION = 1
WEIGHTS_FILE = "latent_tower.safetensors"
POOLINGS = ("max", "logsumexp")


@dataclass(frozen=True)
class LatentConfig:
    """Shape of a query tower. ``layers`` are backbone layer indices of CSA layers, ascending."""

    layers: tuple[int, ...]
    hidden_size: int  # the backbone's hidden size (the tower's input)
    index_dim: int  # Di, the lightning-indexer key width (the tower's output per layer)
    inner: int = 256  # width of the shared hidden layer
    pooling: Literal["max", "logsumexp"] = "max"
    eps: float = 1e-6

    def __post_init__(self) -> None:
        if not self.layers or list(self.layers) != sorted(set(self.layers)):
            raise ValueError(f"layers must be non-empty, ascending, distinct: {self.layers}")
        if min(self.hidden_size, self.index_dim, self.inner) < 1:
            raise ValueError("hidden_size, index_dim and inner must be >= 1")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")


class LatentTower(nn.Module):
    """hidden states (..., L, hidden) -> queries (..., L, Di); queries x keys -> page logits."""

    def __init__(self, cfg: LatentConfig) -> None:
        super().__init__()
        self.cfg = cfg
        n = len(cfg.layers)
        self.norm = RMSNorm(cfg.hidden_size, cfg.eps)
        self.up = nn.Linear(cfg.hidden_size, cfg.inner)
        self.out = nn.Parameter(torch.randn(n, cfg.inner, cfg.index_dim) * cfg.inner**-0.5)
        self.bias = nn.Parameter(torch.zeros(()))

    def queries(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (..., L, hidden) -> (..., L, Di) fp32."""
        z = F.silu(self.up(self.norm(hidden.float())))  # (..., L, inner)
        return (z.unsqueeze(-2) @ self.out).squeeze(-2)  # (..., L, 1, inner) @ (L, inner, Di)

    def page_logits(self, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """queries (..., L, Di), keys (..., L, E, Di) (batch dims broadcast) -> logits (...)."""
        s = keys.float() @ queries.unsqueeze(-1)  # (..., L, E, 1)
        s = s.flatten(-3) * self.cfg.index_dim**-0.5  # (..., L * E)
        pooled = s.logsumexp(-1) if self.cfg.pooling == "logsumexp" else s.amax(-1)
        return pooled + self.bias

    def forward(self, hidden: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """hidden (L, hidden) of one query token, keys (P, L, E, Di) -> page logits (P,)."""
        return self.page_logits(self.queries(hidden), keys)


@dataclass(frozen=True)
class LatentSelectConfig:
    """The selection rule on the tower's probabilities (see the module docstring)."""

    threshold: float = 0.5  # keep pages with sigmoid(logit) > threshold (0: every page)
    kmax: int | None = None  # absolute page cap; the decoder's budget k caps as well
    min_pages: int = 0  # floor: the top pages kept whatever their probability

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")
        if (self.kmax is not None and self.kmax < 0) or self.min_pages < 0:
            raise ValueError("kmax and min_pages must be >= 0")


def choose_pages(logits: torch.Tensor, k: int, cfg: LatentSelectConfig) -> torch.Tensor:
    """Which of C candidates to keep: logits (C,) -> bool (C,). At most min(k, cfg.kmax) of
    them, by descending logit (ties to the lower index); those above the threshold, and the
    first ``cfg.min_pages`` whatever their logit."""
    c = logits.shape[0]
    cap = min(k, c if cfg.kmax is None else cfg.kmax)
    order = logits.float().sort(descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank[order] = torch.arange(c, device=order.device)
    t = cfg.threshold
    if 0 < t < 1:
        above = logits.float() > math.log(t / (1 - t))  # sigmoid(x) > t, without saturation
    else:  # 0: every page passes; 1: none does
        above = torch.full((c,), t == 0, dtype=torch.bool, device=logits.device)
    return (rank < cap) & (above | (rank < cfg.min_pages))


class LatentSelector:
    """``lsa.HiddenStateSelector`` over a ``PageStore``: scores the candidate pages of a request
    with the tower on the last hidden states ``observe``d for it and its stored index keys.
    ``scores`` returns the logits of the pages ``choose_pages`` keeps and -inf for the others,
    so ``indexer.base.pick`` keeps exactly those."""

    name = "latent"

    def __init__(self, tower: LatentTower, store: PageStore,
                 cfg: LatentSelectConfig | None = None) -> None:
        missing = [i for i in tower.cfg.layers if i not in store.layers]
        if missing:
            raise ValueError(f"tower layers {missing} are not CSA layers of the store "
                             f"({store.layers})")
        self.tower, self.store = tower.eval(), store
        self.cfg = cfg or LatentSelectConfig()
        self._columns = [store.layers.index(i) for i in tower.cfg.layers]
        self._hidden: dict[str, torch.Tensor] = {}  # request -> (L, hidden)

    def observe(self, request: str, hidden: Mapping[int, torch.Tensor]) -> None:
        missing = [i for i in self.tower.cfg.layers if i not in hidden]
        if missing:
            raise ValueError(f"no hidden state for layers {missing} of request {request!r}")
        self._hidden[request] = torch.stack([hidden[i] for i in self.tower.cfg.layers])

    def forget(self, request: str) -> None:
        self._hidden.pop(request, None)

    @torch.no_grad()
    def logits(self, request: str, pages: list[int]) -> torch.Tensor:
        """(len(pages),) fp32 page logits at the last observed hidden state of ``request``."""
        if request not in self._hidden:
            raise ValueError(f"latent selector has no hidden state for {request!r}: the decoder "
                             "calls observe before each re-prediction")
        device = self.tower.bias.device
        idx = torch.tensor(pages, dtype=torch.long)
        keys = self.store.index_keys(request).index_select(0, idx)[:, self._columns]
        return self.tower(self._hidden[request].to(device), keys.to(device)).cpu()

    def scores(self, req: SelectionRequest) -> torch.Tensor | None:
        logits = self.logits(req.request_id, req.candidates)
        keep = choose_pages(logits, req.k, self.cfg)
        return logits.masked_fill(~keep, float("-inf"))


def save_latent(tower: LatentTower, out_dir: Path, extra: Mapping[str, Any]) -> dict:
    """Write the tower (safetensors) and its meta JSON (format, version, config + ``extra``)."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in tower.state_dict().items()}
    save_file(state, str(out_dir / WEIGHTS_FILE))
    meta = {"format": FORMAT, "version": FORMAT_VERSION,
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "config": asdict(tower.cfg), **extra}
    text = json.dumps(meta, indent=1)
    (out_dir / META_FILE).write_text(text)
    return json.loads(text)  # as read back (tuples become lists)


def read_latent_meta(path: Path) -> dict:
    """A latent checkpoint's meta; ValueError if ``path`` is not one this version reads."""
    f = Path(path) / META_FILE
    if not f.is_file():
        raise ValueError(f"no latent indexer checkpoint at {path}: {META_FILE} is missing")
    meta = json.loads(f.read_text())
    if meta.get("format") != FORMAT or not 1 <= meta.get("version", 0) <= FORMAT_VERSION:
        raise ValueError(f"{f}: not a {FORMAT} v<={FORMAT_VERSION} checkpoint "
                         f"(format {meta.get('format')!r}, version {meta.get('version')!r})")
    return meta


def load_latent(path: Path, device: str | torch.device = "cpu") -> LatentTower:
    """The tower saved at ``path`` (eval mode); ValueError for a missing or foreign checkpoint."""
    from safetensors.torch import load_file

    meta = read_latent_meta(path)
    weights = Path(path) / WEIGHTS_FILE
    if not weights.is_file():
        raise ValueError(f"latent indexer checkpoint {path} has no {WEIGHTS_FILE}")
    cfg = dict(meta["config"])
    tower = LatentTower(LatentConfig(**{**cfg, "layers": tuple(cfg["layers"])}))
    tower.load_state_dict(load_file(str(weights)))
    return tower.to(device).eval()
