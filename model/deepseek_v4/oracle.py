"""What the FULL DeepSeek-V4 model's own lightning indexer looks at, per CSA page: the
``oracle-native`` page selector and the paper's lookahead label (``lookahead_pages``).

Both read the per-step ``IndexerTrace``s of a full decode (``lsa.decode_full``); they are for
evaluation and label dumps, not a deployable mode (they need that run first). Used by tests and
``lsa`` users; the label is what the DS-V4 latent indexer is to be trained on (issue 8).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from flashmemory.indexer.base import SelectionRequest
from flashmemory.model.deepseek_v4.attention import IndexerTrace
from flashmemory.model.deepseek_v4.cache import CSA_PAGE_ENTRIES


def page_pick_counts(traces: Sequence[IndexerTrace], num_pages: int,
                     page_entries: int = CSA_PAGE_ENTRIES) -> torch.Tensor:
    """(num_pages,) fp32: picks the traces' indexers made on each page, summed over steps, CSA
    layers and query rows; picks on pages >= num_pages (e.g. generated text) are ignored."""
    counts = torch.zeros(num_pages)
    for trace in traces:
        for picks in trace.topk.values():
            pages = picks[picks >= 0].cpu() // page_entries
            pages = pages[pages < num_pages]
            counts += torch.bincount(pages, minlength=num_pages)[:num_pages].float()
    return counts


class NativeOracleSelector:
    """Ranks pages by how often the full model's lightning indexer picked entries in them over
    the next ``window`` decode steps (``traces[request][s]`` is step s of ``decode_full``)."""

    name = "oracle-native"

    def __init__(self, traces: Mapping[str, Sequence[IndexerTrace]],
                 page_entries: int = CSA_PAGE_ENTRIES, window: int = 64) -> None:
        self.traces, self.page_entries, self.window = traces, page_entries, window

    def scores(self, req: SelectionRequest) -> torch.Tensor | None:
        steps = self.traces.get(req.request_id)
        if not steps:
            raise ValueError(f"oracle-native has no indexer trace for {req.request_id!r}")
        ahead = steps[req.step:req.step + self.window] or steps[-1:]
        counts = page_pick_counts(ahead, req.num_prompt_chunks, self.page_entries)
        return counts[torch.tensor(req.candidates, dtype=torch.long)]


def lookahead_pages(traces: Sequence[IndexerTrace], start: int = 0, *, window: int = 64,
                    top_p: float = 0.6, min_layers: int = 3,
                    page_entries: int = CSA_PAGE_ENTRIES) -> list[int]:
    """The paper's lookahead label: pages the full model's indexer concentrates on over decode
    steps [start, start + window).

    At each step and CSA layer, take the softmax of the indexer's scores over the visible entries
    (``trace.scores``, last query row; needs ``keep_scores=True``) and its top-p nucleus: the
    fewest entries, highest first (ties to the lower index), whose probability sums to >= top_p.
    A page is positive at that step if the nucleus has an entry on it in >= min_layers CSA layers
    (min_layers clamped to the CSA layers in the trace: the paper's 3 of 21 needs clamping on
    tiny models). The label is the union over the window's steps, sorted.

    traces: per-step traces; window: steps per label (the re-prediction period, 64); top_p in
    (0, 1] (paper: 0.6); min_layers >= 1 (paper: 3); page_entries: CSA entries per page (64).
    """
    if not 0 < top_p <= 1 or min_layers < 1 or window < 1 or start < 0:
        raise ValueError("need 0 < top_p <= 1, min_layers >= 1, window >= 1, start >= 0")
    label: set[int] = set()
    for trace in traces[start:start + window]:
        if trace.topk and not trace.scores:
            raise ValueError("lookahead_pages needs traces recorded with keep_scores=True")
        need = min(min_layers, len(trace.scores))
        votes: dict[int, int] = {}
        for scores in trace.scores.values():
            pages = (_nucleus(scores[-1], top_p) // page_entries).unique()
            for page in pages.tolist():
                votes[page] = votes.get(page, 0) + 1
        label |= {page for page, n in votes.items() if n >= need}
    return sorted(label)


def _nucleus(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """Entry indices of the top-p nucleus of softmax(scores (E,)); empty if nothing is visible."""
    if not torch.isfinite(scores).any():
        return torch.zeros(0, dtype=torch.long)
    probs = scores.float().softmax(-1)
    order = probs.sort(descending=True, stable=True).indices
    cum = probs[order].cumsum(0)
    k = int((cum < top_p - 1e-6).sum()) + 1  # entries before the sum reaches top_p, plus that one
    return order[: min(k, order.numel())]
