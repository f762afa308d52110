"""Shared test helpers: tiny random HF checkpoints, a dense reference path through our model, a
free port, and tiny QA files in the SQuAD / HotpotQA layouts."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import torch

from flashmemory.decode.chunk_pool import ChunkPool
from flashmemory.decode.step import decode_step
from flashmemory.model.llama import CausalLM
from flashmemory.prefill.chunk_store import ChunkStore
from flashmemory.prefill.runner import prefill

TINY = dict(vocab_size=257, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            max_position_embeddings=512, tie_word_embeddings=False)


def save_tiny(kind: str, path: Path, **extra: object) -> Path:
    """Save a tiny random transformers model of ``kind`` to ``path``; return the directory."""
    import transformers as tf

    cls = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
           "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
           "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM),
           "mistral": (tf.MistralConfig, tf.MistralForCausalLM)}[kind]
    torch.manual_seed(0)
    cfg = cls[0](**{**TINY, **extra})
    model = cls[1](cfg).eval()
    model.save_pretrained(path)
    return path


def store_and_pool(model: CausalLM, chunk_size: int) -> tuple[ChunkStore, ChunkPool]:
    c = model.config
    store = ChunkStore(c.num_layers, c.num_kv_heads, c.head_dim, chunk_size, model.dtype)
    return store, ChunkPool(store.shape, model.dtype, initial_pages=2)


def full_decode_logits(model: CausalLM, ids: list[int], num_prompt: int,
                       chunk_size: int) -> torch.Tensor:
    """Prefill ids[:num_prompt], then teacher-force the rest with every chunk resident.

    Returns (len(ids) - num_prompt + 1, vocab) logits: prefill's last, then each decode step's.
    """
    store, pool = store_and_pool(model, chunk_size)
    offsets = [(i, i + 1) for i in range(num_prompt)]
    res = prefill(model, store, "r", ids[:num_prompt], offsets, "x" * num_prompt)
    pool.open("r", num_prompt)
    n = len(res.metas)
    pool.load("r", list(range(n)), store.read("r", list(range(n))))
    out = [res.logits]
    for tok in ids[num_prompt:]:
        out.append(decode_step(model, pool, [("r", tok)])[0])
    return torch.stack(out)


def free_port() -> int:
    """A free TCP port on the loopback interface (for Serve, Prometheus, Ray's metrics)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_squad(path: Path) -> Path:
    """SQuAD v2 layout: data[].paragraphs[].{context, qas[].{question, answers[].text,
    is_impossible}}."""
    articles = []
    for a in range(3):
        paragraphs = [{"context": f"Article {a} paragraph {p}: the river Avon{a}{p} flows past "
                                  f"the mill of Oswin{a}{p}.",
                       "qas": [{"question": f"Whose mill does the Avon{a}{p} pass?",
                                "answers": [{"text": f"Oswin{a}{p}"}], "is_impossible": False},
                               {"question": "Unanswerable?", "answers": [],
                                "is_impossible": True}]}
                      for p in range(4)]
        articles.append({"title": f"A{a}", "paragraphs": paragraphs})
    path.write_text(json.dumps({"version": "v2.0", "data": articles}))
    return path


def write_hotpotqa(path: Path) -> Path:
    """HotpotQA layout: [{question, answer, context: [[title, [sentences]]]}]."""
    rows = [{"_id": str(i), "question": f"Where was Person{i} born?", "answer": f"Town{i}",
             "context": [[f"Person{i}", [f"Person{i} is a painter. ", f"Born in Town{i}."]],
                         [f"Other{i}", [f"Other{i} is a river."]]]} for i in range(6)]
    path.write_text(json.dumps(rows))
    return path


def write_longbench(path: Path) -> Path:
    """LongBench-v2 data.json layout: [{_id, domain, sub_domain, difficulty, length, question,
    choice_A..choice_D, answer, context}]; item lb2's context (~8K tokens) must be truncated."""
    filler = "The river flows past the old mill near the village. " * 400
    specs = [("lb0", "easy", "short", "A", "Single-Document QA", "Academic",
              "Oswin built the mill in 1820."),
             ("lb1", "hard", "medium", "B", "Multi-Document QA", "Legal",
              "Doc 1: the contract was signed.\nDoc 2: it was never paid."),
             ("lb2", "hard", "long", "C", "Long In-context Learning", "Many-shot learning",
              f"HEADMARK opens the text. {filler}MIDDLEMARK sits here. {filler}"
              "TAILMARK closes the text."),
             ("lb3", "easy", "long", "D", "Code Repository Understanding", "Code repo QA",
              "  def f():\n    return 42\n  ")]
    rows = [{"_id": i, "domain": dom, "sub_domain": sub, "difficulty": diff, "length": ln,
             "question": f" Which choice is right for {i}? ", "choice_A": f"alpha {i}",
             "choice_B": f"beta {i}", "choice_C": f"gamma {i}", "choice_D": f"delta {i}",
             "answer": ans, "context": ctx}
            for i, diff, ln, ans, dom, sub, ctx in specs]
    path.write_text(json.dumps(rows))
    return path


def write_longmemeval(path: Path) -> Path:
    """LongMemEval layout: [{question_id, question_type, question, answer, question_date,
    haystack_session_ids, haystack_dates, haystack_sessions: [[{role, content, has_answer?}]],
    answer_session_ids}]. Question 0 has 6 sessions with the evidence in the 5th; question 1
    lists its sessions out of date order (as the oracle file does); question 4 is `_abs`."""
    specs = [  # id, type, question, answer, sessions, evidence index, evidence, shuffled
        ("lme-user-0", "single-session-user", "Which city did I move to?", "Paris", 6, 4,
         "By the way, I finally moved to Paris last month.", False),
        ("lme-temp-1", "temporal-reasoning", "How many days passed between my trip to Rome "
         "and the concert?", 18, 3, 1, "I just got back from my trip to Rome.", True),
        ("lme-ku-2", "knowledge-update", "What car do I drive now?", "a red Toyota Corolla", 3,
         2, "I sold my old Honda and now drive a red Toyota Corolla.", False),
        ("lme-multi-3", "multi-session", "How many bikes do I own?", 3, 2, 0,
         "I bought a third bike, so now I own 3 bikes.", False),
        ("lme-user-4_abs", "single-session-user", "What is my cat's name?",
         "You did not mention having a cat; you mentioned a dog named Rex.", 2, 1,
         "My dog Rex loves the park.", False),
    ]
    rows = []
    for qid, qtype, question, answer, n, ev, evidence, shuffled in specs:
        sessions, dates = [], [f"2023/05/{10 + 2 * k:02d} (Wed) 1{k}:30" for k in range(n)]
        for k in range(n):
            user = (f"Session {k} of {qid}: I spent the day sorting old photos and planning "
                    f"meals for the week, topic number {k}. ")
            turns = [{"role": "user", "content": user + (evidence if k == ev else "")},
                     {"role": "assistant", "content": "That sounds lovely! " * 8 + f"({k})"}]
            if k == ev:
                turns[0]["has_answer"] = True
            sessions.append(turns)
        order = [n - 1, *range(n - 1)] if shuffled else list(range(n))
        rows.append({"question_id": qid, "question_type": qtype, "question": question,
                     "answer": answer, "question_date": "2023/06/01 (Thu) 09:00",
                     "haystack_session_ids": [f"{qid}-s{k}" for k in order],
                     "haystack_dates": [dates[k] for k in order],
                     "haystack_sessions": [sessions[k] for k in order],
                     "answer_session_ids": [f"{qid}-s{ev}"]})
    path.write_text(json.dumps(rows))
    return path


# --- DeepSeek-V4: tiny random checkpoints and the quantized formats the reference declares ---

TINY_DSV4 = dict(
    vocab_size=128, hidden_size=64, moe_intermediate_size=32, num_hidden_layers=4,
    num_attention_heads=4, head_dim=32, q_lora_rank=48, partial_rotary_factor=0.25,
    layer_types=["sliding_attention", "compressed_sparse_attention",
                 "heavily_compressed_attention", "compressed_sparse_attention"],
    mlp_layer_types=["hash_moe", "hash_moe", "moe", "moe"],
    compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 32},
    n_routed_experts=4, num_experts_per_tok=2, hc_mult=4, sliding_window=32, o_groups=2,
    o_lora_rank=16, index_n_heads=8, index_head_dim=16, index_topk=8,
    num_nextn_predict_layers=0, max_position_embeddings=4096,
    rope_parameters={"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 64,
                     "beta_fast": 32, "beta_slow": 1})


def save_tiny_dsv4(path: Path, **extra: object):
    """Save a tiny random transformers DeepseekV4ForCausalLM (fp32) to ``path``; return it.

    Parameters the HF init leaves at constants (norm weights, sinks, position biases, mHC
    bias/scale, router correction bias, the all-zero hash table) are randomised, so a mix-up of
    any of them shows in the logits.
    """
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    torch.manual_seed(0)
    model = DeepseekV4ForCausalLM(DeepseekV4Config(**{**TINY_DSV4, **extra})).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif p.dim() == 1 or "position_bias" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            elif "hc" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
        cfg = model.config
        for name, b in model.named_buffers():
            if name.endswith("tid2eid"):
                rows = [torch.randperm(cfg.n_routed_experts, generator=g)[:cfg.num_experts_per_tok]
                        for _ in range(b.shape[0])]
                b.copy_(torch.stack(rows))
            elif name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
    model.save_pretrained(path)
    return model


def quantize_fp8_blocks(w: torch.Tensor, block: tuple[int, int],
                        ue8m0: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """w (R, C) -> float8_e4m3fn weight and its inverse scales (ceil(R/bm), ceil(C/bn)): fp32,
    or powers of two as float8_e8m0fnu when ``ue8m0`` (DeepSeek-V4-Flash's format)."""
    bm, bn = block
    rows, cols = w.shape
    sr, sc = -(-rows // bm), -(-cols // bn)
    padded = torch.zeros(sr * bm, sc * bn)
    padded[:rows, :cols] = w
    amax = padded.view(sr, bm, sc, bn).abs().amax(dim=(1, 3)).clamp(min=1e-12)
    inv = amax / torch.finfo(torch.float8_e4m3fn).max
    if ue8m0:
        inv = torch.exp2(torch.ceil(torch.log2(inv)))
    full = inv.repeat_interleave(bm, 0).repeat_interleave(bn, 1)[:rows, :cols]
    q = (w / full).clamp(-448, 448).to(torch.float8_e4m3fn)
    return q, inv.to(torch.float8_e8m0fnu) if ue8m0 else inv


_FP4_GRID = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def quantize_fp4_rows(w: torch.Tensor, group: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """w (R, C) -> e2m1 codes packed two per int8 byte (low nibble first) (R, C/2) and
    power-of-two scales (R, C/group) as float8_e8m0fnu."""
    rows, cols = w.shape
    amax = w.view(rows, cols // group, group).abs().amax(-1).clamp(min=1e-12)
    scale = torch.exp2(torch.ceil(torch.log2(amax / 6.0)))
    v = w / scale.repeat_interleave(group, 1)
    code = (v.abs()[..., None] - _FP4_GRID).abs().argmin(-1) + 8 * (v < 0).long()
    code = code.view(rows, cols // 2, 2)
    packed = (code[..., 0] | (code[..., 1] << 4)).to(torch.uint8).view(torch.int8)
    return packed, scale.to(torch.float8_e8m0fnu)


def tiny_dsv4(path: Path, **extra: object):
    """Our DeepSeek-V4 model (fp32) on the tiny random checkpoint ``save_tiny_dsv4`` writes."""
    from flashmemory.model.deepseek_v4 import load_deepseek_v4

    save_tiny_dsv4(path, **extra)
    return load_deepseek_v4(path)


def sharpen_dsv4_indexer(model, factor: float) -> None:
    """Scale every CSA layer's lightning-indexer head weights by ``factor`` > 0: the indexer's
    scores scale by it, so its top-k (and the model's outputs) stay the same while its softmax
    sharpens. Random tiny weights give a nearly uniform softmax, where the lookahead label's
    top-p nucleus spans every page; sharpened, the label picks some pages only."""
    with torch.no_grad():
        for block in model.layers:
            if block.attn.indexer is not None:
                block.attn.indexer.weights_proj.weight.mul_(factor)


def save_byte_tokenizer(path: Path) -> Path:
    """A byte-level tokenizer of 257 ids (256 bytes, then ``<eos>``) saved to ``path``: what a
    tiny random checkpoint needs to serve text prompts. Returns ``path``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")
    assert fast.eos_token_id == 256 and len(fast) == 257
    fast.save_pretrained(path)
    return path


def save_tiny_servable(path: Path, **extra: object) -> Path:
    """A tiny random Llama (kernel-sized heads: 64) with the byte tokenizer: a checkpoint the
    engine and the cluster load by path, on CPU or GPU."""
    shape = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                 max_position_embeddings=8192, eos_token_id=256, bos_token_id=None)
    save_tiny("llama", path, **{**shape, **extra})
    return save_byte_tokenizer(path)


def save_tiny_indexer(path: Path) -> Path:
    """A tiny random BERT dual encoder (mean pooling) on the byte tokenizer, saved as a
    sentence-transformers directory: mode ``lsa`` without the packaged MiniLM."""
    from sentence_transformers import SentenceTransformer, models
    from transformers import BertConfig, BertModel

    enc = path / "encoder"
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=257, hidden_size=64, num_hidden_layers=2,
                         num_attention_heads=2, intermediate_size=128,
                         max_position_embeddings=512)).save_pretrained(enc)
    save_byte_tokenizer(enc)
    body = models.Transformer(str(enc), max_seq_length=256)
    SentenceTransformer(modules=[body, models.Pooling(64, "mean")], device="cpu").save(str(path))
    return path


def worker_stats(client: Any) -> dict[str, list[dict]]:
    """``stats()`` of a running cluster's decode and prefill workers."""
    import ray

    h = client.h
    return {"decode": ray.get([d.stats.remote() for d in h.decodes]),
            "prefill": ray.get([p.stats.remote() for p in h.prefills])}


def wait_workers_idle(client: Any, timeout: float = 30.0) -> tuple[bool, dict]:
    """Wait until no worker holds a page, a table, a stored request or a staged payload;
    returns (idle, the last stats)."""
    import time

    deadline = time.time() + timeout
    while True:
        s = worker_stats(client)
        idle = (all(d["pages_in_use"] == 0 and d["tables"] == 0 for d in s["decode"])
                and all(p["requests"] == 0 and p["staged"] == 0 for p in s["prefill"]))
        if idle or time.time() > deadline:
            return idle, s
        time.sleep(0.2)
