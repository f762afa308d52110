"""DeepSeek-V4 through the user-facing paths (flashmemory/dsv4_engine.py, engine.load_engine, the
CLI): a tiny random DS-V4 checkpoint (tests.helpers.TINY_DSV4: CSA layers 1 and 3, 4:1) with
SmolLM2's vocabulary and tokenizer (chat template included), CPU, fp32, production pages of 64
entries (256 tokens). An untrained latent tower, saved as a checkpoint, serves mode lsa.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from flashmemory.cli import main
from flashmemory.config import EngineConfig, LSAConfig, SamplingParams, mode_variant
from flashmemory.dsv4_engine import DSV4LLM
from flashmemory.engine import load_engine
from flashmemory.model.deepseek_v4 import LatentConfig, LatentTower, save_latent
from flashmemory.model.loader import load_tokenizer, resolve
from tests.helpers import save_tiny_dsv4

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py

STEPS = 12
TEXT = " ".join(f"Shelf {i} holds the {['red', 'blue', 'green'][i % 3]} box number {i * 7}."
                for i in range(90))  # ~1.4K tokens: 5 closed pages and a partial one


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A tiny DS-V4 checkpoint directory holding SmolLM2's tokenizer and its EOS id."""
    out = tmp_path_factory.mktemp("dsv4-ckpt")
    tok = load_tokenizer(resolve("smollm2-135m-instruct"))
    save_tiny_dsv4(out, vocab_size=len(tok), eos_token_id=tok.eos_token_id,
                   bos_token_id=tok.bos_token_id)
    tok.save_pretrained(out)
    assert json.loads((out / "config.json").read_text())["model_type"] == "deepseek_v4"
    return out


@pytest.fixture(scope="module")
def latent(tmp_path_factory) -> Path:
    """An untrained latent tower over CSA layers 1 and 3, saved as a checkpoint."""
    torch.manual_seed(0)
    tower = LatentTower(LatentConfig(layers=(1, 3), hidden_size=64, index_dim=16, inner=32))
    out = tmp_path_factory.mktemp("latent")
    save_latent(tower, out, {})
    return out


@pytest.fixture(scope="module")
def llm(ckpt, latent) -> DSV4LLM:
    engine = load_engine(EngineConfig(model=str(ckpt), indexer=str(latent)))
    assert isinstance(engine, DSV4LLM) and engine.tokenizer.chat_template
    return engine


def _plain_greedy(model, ids: list[int], steps: int) -> list[int]:
    """Greedy decoding with the bare model and one full cache: no pages, no store."""
    cache = model.new_cache()
    logits = model.logits(model(torch.tensor(ids), torch.arange(len(ids)), cache))[-1]
    out = []
    for _ in range(steps):
        out.append(int(logits.argmax()))
        pos = torch.tensor([cache.length])
        logits = model.logits(model(torch.tensor(out[-1:]), pos, cache))[0]
    return out


def test_run_modes_stats_and_agreement(llm):
    """(a) One prefill, every mode: full equals the bare model's greedy decode; with budget 1
    every selecting mode (random, oracle, lsa at threshold 0) and a tail covering every page
    decode the same tokens; recency and lsa at the default budget hold fewer entries."""
    prompt = llm.tokenize(TEXT, chat=True)
    n = len(prompt.token_ids)
    pages = math.ceil(n // 4 / 64)
    assert 1300 < n < 1536 and pages == 6
    base = LSAConfig(mode="full")
    specs = ["full", "recency", "lsa", "random:budget=1.0", "oracle:budget=1.0",
             "lsa:budget=1.0:threshold=0.0", "recency:recent_tokens=4096"]
    configs = [mode_variant(s, base) for s in specs]
    configs[1] = LSAConfig(mode="recency", chunk_size=256)  # the page's own size is accepted
    sampling = SamplingParams(max_tokens=STEPS, ignore_eos=True)
    outs = dict(zip(specs, llm.run_modes(prompt, sampling, configs), strict=True))
    full = outs["full"]
    assert full.token_ids == _plain_greedy(llm.model, prompt.token_ids, STEPS)
    assert full.text == llm.tokenizer.decode(full.token_ids, skip_special_tokens=True)
    for spec in specs[3:]:
        assert outs[spec].token_ids == full.token_ids, spec
    for spec, out in outs.items():
        st = out.stats
        assert out.finish_reason == "length" and out.mode == spec.split(":")[0]
        assert (st.prompt_tokens, st.completion_tokens, st.num_prompt_chunks) == (n, STEPS, pages)
        assert st.repredictions == 1  # step 0 only: 11 steps < repredict_every
        assert 0 < st.kv_footprint_mean <= st.kv_footprint_peak <= 1.0
        assert st.kv_bytes_transferred > 0 and 0 < st.transfer_ratio <= 1.0
        assert 0 < st.ttft <= st.e2e and st.tpot > 0
        assert 0 < st.prefill_s < st.ttft and st.admission_s > 0
        assert st.admission_s == pytest.approx(st.selection_s + st.transfer_s)  # one selection
    for spec in ("full", *specs[3:]):
        assert outs[spec].stats.kv_footprint_mean == 1.0 and outs[spec].stats.transfer_ratio == 1.0
    assert outs["oracle:budget=1.0"].stats.chunks_selected == 3  # 1-3; sink 0, tail 4, partial 5
    rec = outs["recency"].stats  # sink, one tail page, the partial page of 6; decode's entries
    assert rec.chunks_selected == 0 and rec.transfer_ratio == 3 / 6
    assert rec.kv_footprint_peak < 0.6
    assert outs["lsa"].stats.chunks_selected <= 1  # ceil(0.1 * 5 closed pages), threshold 0.5
    assert outs["lsa"].stats.kv_footprint_peak < 1.0


def test_text_indexer_on_pages(llm):
    """Mode lsa with the text indexer (MiniLM) on DS-V4: each page's text is embedded and ranked
    against the lookahead query; at budget 1 decoding equals full; a threshold above any cosine
    keeps none of the candidates; the embeddings are forgotten after the request."""
    from flashmemory.dsv4_engine import page_texts

    prompt = llm.tokenize(TEXT, chat=True)
    texts = page_texts(prompt, llm.page_tokens, 6)
    assert len(texts) == 6 and all(texts) and "".join(texts) == prompt.text
    base = LSAConfig(mode="full", indexer="minilm")
    specs = ["full", "lsa", "lsa:budget=1.0", "lsa:budget=1.0:threshold=2.0"]
    configs = [mode_variant(s, base) for s in specs]
    sampling = SamplingParams(max_tokens=6, ignore_eos=True)
    outs = dict(zip(specs, llm.run_modes(prompt, sampling, configs), strict=True))
    assert outs["lsa:budget=1.0"].token_ids == outs["full"].token_ids
    assert outs["lsa:budget=1.0"].stats.chunks_selected == 3  # pages 1-3 (sink 0, tail 4, 5)
    assert outs["lsa"].stats.chunks_selected == 1  # ceil(0.1 x 5 closed pages)
    assert outs["lsa"].stats.kv_footprint_peak < 1.0
    assert outs["lsa:budget=1.0:threshold=2.0"].stats.chunks_selected == 0
    assert not llm.indexer_for("minilm")._chunks  # every request forgotten


def test_generate_chat_sampling_and_stops(llm):
    """``generate`` / ``chat`` through the Llama loop's rules: a stop string cuts the text,
    EOS stops (unless ignored), seeded sampling repeats."""
    full = LSAConfig(mode="full")
    ref = llm.generate(TEXT[:400], SamplingParams(max_tokens=8, ignore_eos=True), full)[0]
    assert len(ref.token_ids) == 8 and len(ref.text) >= 4
    stop = ref.text[len(ref.text) // 2:][:2]
    cut = llm.generate(TEXT[:400], SamplingParams(max_tokens=8, stop=(stop,), ignore_eos=True),
                       full)[0]
    assert cut.finish_reason == "stop" and cut.text == ref.text[:ref.text.find(stop)]
    eos, llm.eos_ids = llm.eos_ids, {ref.token_ids[0]}
    try:
        assert llm.generate(TEXT[:400], SamplingParams(max_tokens=8), full)[0].token_ids == []
    finally:
        llm.eos_ids = eos
    hot = SamplingParams(max_tokens=6, temperature=0.9, top_p=0.9, top_k=50, seed=3)
    a, b = (llm.chat([{"role": "user", "content": TEXT[:300]}], hot, full)[0] for _ in range(2))
    assert a.token_ids == b.token_ids and len(a.token_ids) == 6


@pytest.mark.parametrize(("lsa", "match"), [
    (LSAConfig(mode="lsa", indexer="/no/such/indexer"), "needs a latent indexer checkpoint"),
    (LSAConfig(mode="full", chunk_size=128), "chunk_size 128: DeepSeek-V4 keeps whole CSA pages"),
    (LSAConfig(mode="snapkv"), "not available for DeepSeek-V4"),
    (LSAConfig(mode="oracle", threshold=0.3), "applies to the latent indexer"),
])
def test_clear_errors(llm, lsa, match):
    """(d) refused before any work, with the reason."""
    prompt = llm.tokenize("hello", chat=True)
    with pytest.raises(ValueError, match=match):
        llm.run_modes(prompt, SamplingParams(max_tokens=2), [LSAConfig(mode="full"), lsa])


def test_eval_cli(ckpt, tmp_path, capsys):
    """(b) ``flashmemory eval`` on the checkpoint directory: one row per mode, footprints."""
    out = tmp_path / "run"
    assert main(["eval", "--suite", "ruler-niah", "--model", str(ckpt), "--lengths", "2048",
                 "--samples", "1", "--modes", "full,recency", "--max-tokens", "4",
                 "--out", str(out)]) == 0
    assert "results:" in capsys.readouterr().out
    rows = {r["mode"]: r for r in pq.read_table(out / "results.parquet").to_pylist()}
    assert set(rows) == {"full", "recency"}
    for r in rows.values():
        assert r["length"] == 2048 and 1500 < r["prompt_tokens"] < 2048
        assert 1 <= r["completion_tokens"] <= 4 and r["score"] in (0.0, 1.0)
    assert rows["full"]["kv_footprint_mean"] == 1.0 and rows["full"]["transfer_ratio"] == 1.0
    assert 0 < rows["recency"]["kv_footprint_mean"] < 0.5
    assert 0 < rows["recency"]["transfer_ratio"] < 0.5


def test_generate_cli(ckpt, latent, tmp_path, capsys):
    """(c) ``flashmemory generate --json`` in mode lsa with the latent checkpoint; (d) the CLI
    refuses lsa without one, and a chunk size that is not the page, before loading."""
    prompt = tmp_path / "q.txt"
    prompt.write_text(TEXT)
    assert main(["generate", "--model", str(ckpt), "--prompt-file", str(prompt),
                 "--max-tokens", "4", "--json", "--indexer", str(latent)]) == 0
    got = json.loads(capsys.readouterr().out)
    usage = got["usage"]
    assert got["mode"] == "lsa" and got["model"] == str(ckpt)
    assert usage["num_prompt_chunks"] == 6 and 1 <= usage["completion_tokens"] <= 4
    assert 0 < usage["kv_footprint_mean"] < 1.0 and got["timing"]["ttft"] > 0
    assert main(["generate", "--model", str(ckpt), "--prompt", "hi", "--indexer",
                 str(tmp_path / "nope")]) == 2
    assert "needs a latent indexer checkpoint" in capsys.readouterr().err
    assert main(["generate", "--model", str(ckpt), "--prompt", "hi", "--indexer", str(latent),
                 "--threshold", "1.5"]) == 2
    assert "threshold must be in [0, 1]" in capsys.readouterr().err
    assert main(["eval", "--model", str(ckpt), "--modes", "full", "--chunk-size", "100",
                 "--out", str(tmp_path / "x")]) == 2
    assert "chunk_size 100" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_latent_indexer_cli_dump_train_evaluate_and_serve(ckpt, tmp_path, capsys):
    """`flashmemory indexer latent-dump | latent-train | latent-evaluate` on the tiny DS-V4; the
    trained checkpoint then serves mode lsa through `flashmemory generate`."""
    from flashmemory.indexer import corpus

    docs = list(corpus.synthetic(["retrieve"], 2, 5000, seed=5))
    corpus.write_corpus(docs, tmp_path / "c.parquet")
    dump, tower, res = tmp_path / "dump", tmp_path / "tower", tmp_path / "res.json"
    argv = ["indexer", "latent-dump", "--model", str(ckpt), "--corpus", str(tmp_path / "c.parquet"),
            "--out", str(dump), "--steps", "8", "--window", "4", "--min-layers", "1"]
    assert main(argv) == 0
    assert "dumped 2 documents" in capsys.readouterr().out
    assert main(argv) == 0  # resumable: both documents are already there
    assert "dumped 0 documents" in capsys.readouterr().out
    assert main(["indexer", "latent-train", "--dump", str(dump), "--out", str(tower),
                 "--epochs", "2", "--inner", "16"]) == 0
    meta = json.loads(capsys.readouterr().out)
    assert meta["requests"] == 2 and meta["windows"] == 4 and len(meta["loss_curve"]) == 2
    assert main(["indexer", "latent-evaluate", "--dump", str(dump), "--indexers", str(tower),
                 "--json", str(res)]) == 0
    assert "| indexer | budget | windows | recall | resident_pct |" in capsys.readouterr().out
    rows = json.loads(res.read_text())
    assert [r["budget"] for r in rows] == [0.05, 0.1, 0.2]
    # ~1.2K-token prompts: 4 closed pages, so every budget up to 25% allows KMAX = 1 page
    assert all(0 <= r["recall"] <= 100 and 0 <= r["resident_pct"] <= 25 for r in rows)
    prompt = tmp_path / "p.txt"
    prompt.write_text(TEXT)
    assert main(["generate", "--model", str(ckpt), "--prompt-file", str(prompt),
                 "--max-tokens", "4", "--json", "--indexer", str(tower)]) == 0
    assert json.loads(capsys.readouterr().out)["mode"] == "lsa"
    # the text indexer's checkpoints and Llama models are refused with a message
    assert main(["indexer", "latent-dump", "--model", "smollm2-135m-instruct", "--corpus",
                 str(tmp_path / "c.parquet"), "--out", str(tmp_path / "d2")]) == 2
    assert "needs a DeepSeek-V4 checkpoint" in capsys.readouterr().err


def test_cluster_checks_a_deepseek_v4_config_before_starting_anything(ckpt):
    """`flashmemory serve` and start_workers run the DS-V4 checks (check_backbone) before any
    actor starts: a chunk size that is not a page, an indexer that does not load."""
    from flashmemory.cluster.config import ClusterConfig
    from flashmemory.cluster.launch import check_backbone

    assert check_backbone(ClusterConfig(engine=EngineConfig(model=str(ckpt))))
    assert not check_backbone(ClusterConfig())  # the default (SmolLM2): the Llama workers
    with pytest.raises(ValueError, match="whole CSA pages"):
        check_backbone(ClusterConfig(engine=EngineConfig(
            model=str(ckpt), lsa=LSAConfig(chunk_size=128))))
    with pytest.raises(ValueError, match="needs a latent indexer checkpoint"):
        check_backbone(ClusterConfig(engine=EngineConfig(model=str(ckpt), indexer="/nowhere")))
