"""The DeepSeek-V4 latent memory indexer (model/deepseek_v4/latent_{indexer,dump,train}.py): label
dump from a full decode, backbone-free training, checkpoints, the selection rule, and decoding
with it in ``LSADecoder``. Tiny random config (tests.helpers.TINY_DSV4: CSA layers 1 and 3),
CPU, fp32, 8-entry pages (32 tokens).

The tiny model's indexer heads are sharpened (``sharpen_dsv4_indexer``: same top-k, same
outputs) so that the lookahead label (top-p 0.6 in >= 3 -> 2 CSA layers over 64 steps) picks
some pages, not all. Prompts of 384 / 448 / 512 tokens give 12 / 14 / 16 closed pages.
"""

from __future__ import annotations

import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from flashmemory.indexer.base import SelectionRequest, pick
from flashmemory.model.deepseek_v4 import (
    DSV4LSAConfig,
    DumpMeta,
    LatentConfig,
    LatentDumpConfig,
    LatentSelectConfig,
    LatentSelector,
    LatentTower,
    LatentTrainConfig,
    LSADecoder,
    PageStore,
    Window,
    choose_pages,
    decode_full,
    decode_lsa,
    dump_latent,
    dump_loss,
    evaluate_latent,
    load_latent,
    lookahead_pages,
    prefill_request,
    read_dump,
    train_latent,
    write_request,
)
from flashmemory.model.deepseek_v4.latent_train import new_tower, window_logits
from tests.helpers import TINY_DSV4, sharpen_dsv4_indexer, tiny_dsv4

CSA_LAYERS = (1, 3)
E = 8  # entries per page
STEPS = 70  # windows start at steps 0 and 64
LENGTHS = {"p0": 384, "p1": 448, "p2": 512}
DUMP = LatentDumpConfig(steps=STEPS, page_entries=E)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def dumped(tmp_path_factory):
    """(model, prompts, dump dir, ids dumped by a first call on p0-p1, then by one on all)."""
    model = tiny_dsv4(tmp_path_factory.mktemp("dsv4-latent"))
    sharpen_dsv4_indexer(model, 300.0)
    gen = torch.Generator().manual_seed(3)
    prompts = {r: torch.randint(0, TINY_DSV4["vocab_size"], (n,), generator=gen)
               for r, n in LENGTHS.items()}
    out = tmp_path_factory.mktemp("latent-dump")
    first = dump_latent(model, {r: prompts[r] for r in ("p0", "p1")}, out, DUMP)
    second = dump_latent(model, prompts, out, DUMP)
    return model, prompts, out, first, second


@pytest.fixture(scope="module")
def trained(dumped, tmp_path_factory):
    """(tower trained on the dump, its meta, checkpoint dir)."""
    out = tmp_path_factory.mktemp("latent-ckpt")
    cfg = LatentTrainConfig(epochs=20, inner=64, learning_rate=1e-2, batch_windows=2)
    tower, meta = train_latent(dumped[2], out, cfg)
    return tower, meta, out


def _full_decode_with_inputs(model, ids):
    """Reference: prefill + full decode, recording the CSA attention inputs with our own hooks."""
    seen: list[dict[int, torch.Tensor]] = []

    def hook(i):
        def record(_m, args):
            if i == CSA_LAYERS[0]:
                seen.append({})
            seen[-1][i] = args[0][-1].clone()
        return record

    handles = [model.layers[i].attn.register_forward_pre_hook(hook(i)) for i in CSA_LAYERS]
    try:
        store = PageStore(model.config, model.dtype, E)
        prefilled = prefill_request(model, "ref", ids, store)
        run = decode_full(model, prefilled, STEPS, keep_scores=True)
    finally:
        for h in handles:
            h.remove()
    return store, run, seen  # seen[s]: inputs of forward s (0: the prefill)


def test_dump_schema_labels_and_resume(dumped):
    model, prompts, out, first, second = dumped
    assert (first, second) == (["p0", "p1"], ["p2"])  # the rerun skipped p0 and p1
    assert dump_latent(model, prompts, out, DUMP) == []
    assert sorted(f.name for f in out.iterdir()) == [
        *(f"keys-{i:05d}.parquet" for i in range(3)),
        *(f"windows-{i:05d}.parquet" for i in range(3))]
    with pytest.raises(ValueError, match="other settings"):
        dump_latent(model, prompts, out, LatentDumpConfig(steps=STEPS, page_entries=E, top_p=.5))
    windows, keys = pq.read_table(out / "windows-00000.parquet"), pq.read_table(
        out / "keys-00000.parquet")
    assert windows.schema.remove_metadata() == pa.schema([
        ("request", pa.string()), ("step", pa.int32()), ("horizon", pa.int32()),
        ("hidden", pa.list_(pa.float32())), ("pages", pa.list_(pa.int32())),
        ("label", pa.list_(pa.int32()))])
    assert keys.schema.remove_metadata() == pa.schema([
        ("request", pa.string()), ("page", pa.int32()), ("keys", pa.list_(pa.float16()))])
    meta = json.loads(windows.schema.metadata[b"flashmemory"])
    assert meta == {"layers": [1, 3], "hidden_size": 64, "index_dim": 16, "page_entries": E,
                    "window": 64, "top_p": 0.6, "min_layers": 3,
                    "format": "flashmemory-latent-dump", "version": 1}
    dump = read_dump(out)
    assert [(w.request, w.step, w.horizon) for w in dump.windows] == [
        (r, s, h) for r in LENGTHS for s, h in ((0, 64), (64, 6))]
    for w in dump.windows:
        n = LENGTHS[w.request] // 4 // E
        assert w.pages == list(range(n)) and set(w.label) <= set(w.pages)
        assert w.hidden.shape == (2, 64) and dump.keys[w.request].shape == (n, 2, E, 16)
    sizes = [len(w.label) / len(w.pages) for w in dump.windows]
    assert any(0 < f < 1 for f in sizes), sizes  # labels are selective, not all or nothing
    # p0 against an independent full decode: keys, tower inputs and labels
    store, run, seen = _full_decode_with_inputs(model, prompts["p0"])
    stored = store.index_keys("ref")[:12].to(torch.float16)  # (P, Lc, E, Di), layers 1 and 3
    assert torch.equal(dump.keys["p0"], stored)
    for w in dump.windows[:2]:
        assert torch.equal(w.hidden, torch.stack([seen[w.step][i] for i in CSA_LAYERS]))
        label = lookahead_pages(run.traces, w.step, window=64, page_entries=E)
        assert w.label == [p for p in label if p < 12]


def test_training_lowers_the_loss(dumped, trained):
    _, _, out, _, _ = dumped
    tower, meta, ckpt = trained
    dump = read_dump(out)
    cfg = LatentTrainConfig(epochs=20, inner=64, learning_rate=1e-2, batch_windows=2)
    before, after = dump_loss(new_tower(dump, cfg), dump), dump_loss(tower, dump)
    assert after < 0.75 * before, (before, after)  # every (window, page), no sampling
    curve = meta["loss_curve"]
    assert len(curve) == 20 and curve[-1] < 0.75 * curve[0]
    assert (meta["format"], meta["version"], meta["data"]) == (
        "flashmemory-latent-indexer", 1, str(out))
    assert meta["config"]["layers"] == [1, 3] and meta["train"]["loss"] == "bce"
    assert (meta["requests"], meta["windows"]) == (3, 6)
    focal_cfg = LatentTrainConfig(epochs=5, inner=64, learning_rate=1e-2, loss="focal")
    _, focal = train_latent(out, ckpt.parent / "focal", focal_cfg)
    assert focal["loss_curve"][-1] < focal["loss_curve"][0]


def test_save_load_round_trip(dumped, trained, tmp_path):
    _, _, out, _, _ = dumped
    tower, _, ckpt = trained
    loaded = load_latent(ckpt)
    assert loaded.cfg == tower.cfg
    dump = read_dump(out)
    for w in dump.windows:
        assert torch.equal(window_logits(loaded, dump, w), window_logits(tower, dump, w))
    with pytest.raises(ValueError, match="no latent indexer checkpoint"):
        load_latent(tmp_path)
    (tmp_path / "flashmemory_indexer.json").write_text(json.dumps(
        {"format": "flashmemory-indexer", "version": 1}))  # the text indexer's checkpoint
    with pytest.raises(ValueError, match="not a flashmemory-latent-indexer"):
        load_latent(tmp_path)
    meta = json.loads((ckpt / "flashmemory_indexer.json").read_text())
    (tmp_path / "flashmemory_indexer.json").write_text(json.dumps({**meta, "version": 2}))
    with pytest.raises(ValueError, match="v<=1"):
        load_latent(tmp_path)
    (tmp_path / "flashmemory_indexer.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"no latent_tower\.safetensors"):
        load_latent(tmp_path)


def _toy_dump(path, requests: int, seed: int) -> None:
    """Synthetic dump: 48 pages of 2 layers x 4 entries of 16-d keys; 8 fixed unit directions
    u; each window's hidden state is A u + noise, for a direction u of its own, and 6 pages
    carry an entry ~ 6 u. Label: pages with some entry k . u > 4 (the planted ones, rarely one
    more). An untrained tower's top 6 pages hold ~6/48 of the label."""
    fixed = torch.Generator().manual_seed(9)
    a = torch.randn(32, 16, generator=fixed)
    dirs = torch.nn.functional.normalize(torch.randn(8, 16, generator=fixed), dim=-1)
    g = torch.Generator().manual_seed(seed)
    meta = DumpMeta((1, 3), 32, 16, 4, 64, 0.6, 3)
    for r in range(requests):
        keys = torch.randn(48, 2, 4, 16, generator=g)  # (P, L, E, Di)
        order = torch.randperm(8, generator=g)  # window s uses direction order[s]
        for s in range(8):
            pages = torch.randperm(48, generator=g)[:6]
            layer, entry = torch.randint(0, 2, (6,), generator=g), torch.randint(0, 4, (6,),
                                                                                 generator=g)
            keys[pages, layer, entry] = 6 * dirs[order[s]] + 0.5 * torch.randn(6, 16, generator=g)
        windows = []
        for s in range(8):
            u = dirs[order[s]]
            hidden = (a @ u).expand(2, 32) + 0.3 * torch.randn(2, 32, generator=g)
            label = ((keys @ u).amax(dim=(1, 2)) > 4).nonzero().flatten().tolist()
            windows.append(Window(f"t{seed}-{r}", 64 * s, 64, hidden, list(range(48)), label))
        write_request(path, r, meta, keys, windows)


def test_toy_trained_tower_beats_untrained(tmp_path):
    """Labels a known function of keys and hidden state; train on 8 requests, evaluate on 4
    unseen ones (new keys, new noise): recall of the label at the selector's pages."""
    _toy_dump(tmp_path / "train", 8, seed=1)
    _toy_dump(tmp_path / "test", 4, seed=2)
    test = read_dump(tmp_path / "test")
    assert sum(len(w.label) for w in test.windows) / len(test.windows) == pytest.approx(6, abs=.3)
    cfg = LatentTrainConfig(epochs=10, inner=64, learning_rate=1e-2, batch_windows=4)
    tower, _ = train_latent(tmp_path / "train", tmp_path / "ckpt", cfg)
    top6 = LatentSelectConfig(threshold=0.0, kmax=6)
    untrained = evaluate_latent(new_tower(test, cfg), test, top6)
    mine = evaluate_latent(tower, test, top6)
    assert untrained.resident_fraction == mine.resident_fraction == 6 / 48
    assert mine.recall >= 0.9 and untrained.recall <= 0.35, (mine, untrained)
    adaptive = evaluate_latent(tower, tmp_path / "test", LatentSelectConfig())  # p > 0.5
    assert adaptive.recall >= 0.9 and adaptive.resident_fraction <= 0.2, adaptive
    everything = evaluate_latent(tower, test, LatentSelectConfig(threshold=0.0))
    assert (everything.recall, everything.resident_fraction) == (1.0, 1.0)


def test_choose_pages_threshold_cap_floor():
    """Hand-set probabilities; sigmoid > threshold, at most min(k, kmax), floor, ties."""
    probs = torch.tensor([0.9, 0.2, 0.7, 0.6, 0.51, 0.4, 0.95, 0.5])
    logits = torch.logit(probs)

    def kept(k: int, **kw) -> list[int]:
        return choose_pages(logits, k, LatentSelectConfig(**kw)).nonzero().flatten().tolist()

    assert kept(8) == [0, 2, 3, 4, 6]  # > 0.5 (0.5 itself is out)
    assert kept(8, kmax=3) == kept(3) == [0, 2, 6]  # the 3 densest
    assert kept(2, kmax=3) == [0, 6]  # the decoder's budget caps too
    assert kept(8, threshold=0.8) == [0, 6]
    assert kept(8, threshold=0.8, min_pages=4) == [0, 2, 3, 6]  # floor: top 4 anyway
    assert kept(3, threshold=0.8, min_pages=5) == [0, 2, 6]  # the cap beats the floor
    assert kept(8, threshold=1.0) == [] and kept(8, threshold=1.0, min_pages=1) == [6]
    assert kept(5, threshold=0.0) == [0, 2, 3, 4, 6] and kept(8, threshold=0.0) == list(range(8))
    ties = choose_pages(torch.zeros(4), 2, LatentSelectConfig(threshold=0.0))
    assert ties.tolist() == [True, True, False, False]  # ties to the lower page
    assert not choose_pages(torch.zeros(0), 3, LatentSelectConfig()).numel()


def test_plugged_into_lsa_decoder(dumped, trained):
    """(a) Every page kept (threshold 0, budget 1): LSA decoding equals full decoding over 70
    steps (re-prediction at 64), and the hidden state the selector sees at each re-prediction is
    the dump's. (b) The trained tower under a budget: the pages it adds at each re-prediction
    are exactly ``choose_pages`` on its logits, and ``pick`` keeps exactly those."""
    model, prompts, out, _, _ = dumped
    tower, _, _ = trained
    dump = read_dump(out)
    store = PageStore(model.config, model.dtype, E)
    prefilled = prefill_request(model, "p0", prompts["p0"], store)
    full = decode_full(model, prefilled, STEPS)
    every = _Recording(tower, store, LatentSelectConfig(threshold=0.0))
    dec = LSADecoder(model, store, prefilled, every, DSV4LSAConfig(budget=1.0, page_entries=E))
    run = decode_lsa(dec, STEPS)
    assert (run.logits - full.logits).abs().max().item() <= 1e-6 and run.tokens == full.tokens
    assert [r.resident for r in run.stats.reselections] == [tuple(range(12))] * 2
    assert run.stats.mean_resident_fraction == 1.0
    for hidden, w in zip(every.seen, dump.windows[:2], strict=True):
        torch.testing.assert_close(hidden.float(), w.hidden, atol=1e-5, rtol=0)
    # (b) budget 0.5 of 12 pages (k = 6), sink + 2 tail pages fixed, floor 1
    select = LatentSelectConfig(threshold=0.5, min_pages=1)
    sel = LatentSelector(tower, store, select)
    cfg = DSV4LSAConfig(budget=0.5, recent_pages=2, page_entries=E)
    dec = LSADecoder(model, store, prefilled, sel, cfg)
    run = decode_lsa(dec, STEPS)
    cands = list(range(1, 10))
    for rec in run.stats.reselections:
        assert 1 <= rec.selected <= 6
    first = run.stats.reselections[0]
    logits = tower(dump.windows[0].hidden, dump.keys["p0"][cands].float())
    want = [p for p, k in zip(cands, choose_pages(logits, 6, select).tolist(), strict=True) if k]
    assert first.resident == tuple(sorted({0, 10, 11, *want}))
    assert min(run.stats.resident_fraction) < 1.0
    req = SelectionRequest("p0", 12, cands, 6, 0, "")
    sel.observe("p0", prefilled.hidden)
    assert pick(sel.scores(req), req, None) == want


class _Recording(LatentSelector):
    """A latent selector that also keeps every hidden state the decoder hands it."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.seen: list[torch.Tensor] = []

    def observe(self, request, hidden) -> None:
        self.seen.append(torch.stack([hidden[i] for i in CSA_LAYERS]))
        super().observe(request, hidden)


def test_errors(dumped, trained, tmp_path):
    model, prompts, out, _, _ = dumped
    tower, _, _ = trained
    store = PageStore(model.config, model.dtype, E)
    prefill_request(model, "p0", prompts["p0"][:64], store)
    sel = LatentSelector(tower, store)
    with pytest.raises(ValueError, match="no hidden state for 'p0'"):
        sel.logits("p0", [0])
    with pytest.raises(ValueError, match="no hidden state for layers"):
        sel.observe("p0", {1: torch.zeros(64)})
    other = LatentTower(LatentConfig((2,), 64, 16))
    with pytest.raises(ValueError, match="not CSA layers"):
        LatentSelector(other, store)
    with pytest.raises(ValueError, match="CSA layers of the model"):
        dump_latent(model, prompts, tmp_path / "x", LatentDumpConfig(layers=(0,)))
    with pytest.raises(FileNotFoundError, match="no latent dump"):
        read_dump(tmp_path)
    with pytest.raises(ValueError, match="exactly one request"):
        write_request(tmp_path, 0, DumpMeta((1,), 4, 2, 1, 64, .6, 3), torch.zeros(1, 1, 1, 2),
                      [])
    meta = DumpMeta((1,), 4, 2, 1, 64, .6, 3)
    empty = [Window("z", 0, 64, torch.zeros(1, 4), [0], [])]
    write_request(tmp_path / "nolabel", 0, meta, torch.zeros(1, 1, 1, 2), empty)
    with pytest.raises(ValueError, match="no window with a non-empty label"):
        train_latent(tmp_path / "nolabel", tmp_path / "ck")
    for bad, match in ((lambda: LatentConfig((3, 1), 64, 16), "ascending"),
                       (lambda: LatentConfig((1,), 64, 16, pooling="mean"), "pooling"),
                       (lambda: LatentSelectConfig(threshold=1.5), "threshold"),
                       (lambda: LatentSelectConfig(min_pages=-1), "min_pages"),
                       (lambda: LatentTrainConfig(loss="mse"), "loss"),
                       (lambda: LatentTrainConfig(negatives=0), "negatives"),
                       (lambda: LatentDumpConfig(top_p=0.0), "top_p")):
        with pytest.raises(ValueError, match=match):
            bad()
    assert math.isfinite(dump_loss(tower, read_dump(out), "focal"))
