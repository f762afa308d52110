"""Serve a random-weight model of a real shape on GPUs and measure TTFT / TPOT of long prompts
through the HTTP API, streaming. Layouts: ``shared`` (prefill and decode workers share one GPU,
IPC transport) and ``split`` (prefill on one GPU, decode on another, NCCL chunk transfers; needs
2 GPUs). With both, the greedy full-KV answers of the two layouts are compared token for token.

Usage: python benchmarks/serve_gpu.py --tokenizer DIR [--shape smollm2] [--lengths 8192,32768]
       [--modes full,random,lsa] [--indexer DIR] [--layouts shared,split]
Prints Markdown tables: TTFT as the client sees it, with the request's split (the prefill
worker's seconds; the first working set's selection + transfer, which the second token waits
for; all selections; all transfers, their count, mean latency and GB/s). Mode ``lsa`` uses
``--indexer`` (a sentence-transformers directory; default: the packaged MiniLM). Every row checks
that the bytes moved are whole chunks and equal the transfer ratio times the prompt's KV. Random
weights: timings are real, answers are not.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import time
from pathlib import Path

import torch

SHAPES = {  # HF LlamaConfig fields
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                    vocab_size=49152, rope_theta=100000.0, tie_word_embeddings=True),
}


def make_checkpoint(shape: str, tokenizer: Path, out: Path, max_len: int) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=max_len, bos_token_id=1,
                      eos_token_id=2)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(out)
    for f in tokenizer.iterdir():
        shutil.copy(f, out / f.name)
    return out


def stream_one(url: str, model: str, prompt: str, mode: str, budget: float,
               max_tokens: int) -> dict:
    import httpx

    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "lsa_mode": mode, "kv_budget": budget}
    t0 = time.perf_counter()
    first, n, usage, text = None, 0, {}, []
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"])
            first = first or time.perf_counter()
            n += 1
            text.extend(c.get("text", "") for c in chunk.get("choices", []))
            usage = chunk.get("usage") or usage
    end = time.perf_counter()
    steps = max(usage.get("completion_tokens", n) - 1, 1)
    return {"ttft": first - t0, "tpot": (end - first) / steps,
            "footprint": usage.get("kv_footprint_mean"), "transfer": usage.get("transfer_ratio"),
            "tokens": usage.get("prompt_tokens"), "text": "".join(text),
            **{k: usage.get(k, 0.0) for k in ("prefill_s", "selection_s", "transfer_s",
                                             "admission_s", "kv_bytes_transferred",
                                             "transfers")}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokenizer", type=Path, required=True)
    ap.add_argument("--shape", default="smollm2", choices=sorted(SHAPES))
    ap.add_argument("--lengths", default="8192,32768")
    ap.add_argument("--modes", default="full,random")
    ap.add_argument("--budget", type=float, default=0.1)
    ap.add_argument("--indexer", default="minilm", help="mode lsa's encoder")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--layouts", default="shared", help="shared and/or split (2 GPUs)")
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    lengths = [int(x) for x in args.lengths.split(",")]
    ckpt = make_checkpoint(args.shape, args.tokenizer, Path("/tmp/fm-ckpt"),
                           max(lengths) + 2 * args.max_tokens)
    answers = {layout: run_layout(layout, ckpt, lengths, args)
               for layout in args.layouts.split(",")}
    if len(answers) > 1:
        a, b = answers.values()
        for key in a:
            if key[1] == "full":
                print(f"{key[0]} tokens, full KV: {' / '.join(answers)} answers equal: "
                      f"{a[key] == b[key]}")


def run_layout(layout: str, ckpt: Path, lengths: list[int],
               args: argparse.Namespace) -> dict[tuple[int, str], str]:
    """Serve ``ckpt`` in one layout, print its table; returns the answers per (length, mode)."""
    import ray
    from ray import serve

    from flashmemory.cluster.serve_app import build

    split = layout == "split"
    ray.init(num_gpus=2 if split else 1, logging_level="WARNING")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build({"served_model_name": "m", "num_gpus_per_worker": 1 if split else 0.5,
                     "num_cpus_per_worker": 1, "torch_threads": 4,
                     "engine": {"model": str(ckpt), "device": "cuda", "dtype": "bfloat16",
                                "indexer": args.indexer},
                     "lsa": {"budget": args.budget}}), name="fm", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    answers = {}
    words = ["alpha", "beta", "gamma", "delta", "river", "stone", "cloud", "lamp",
             "paper", "window", "garden"]
    print(f"{torch.cuda.get_device_name()} | layout {layout} | shape {args.shape} bf16 random "
          f"weights | budget {args.budget} | {args.max_tokens} tokens generated")
    print("| prompt tokens | mode | TTFT (s) | prefill (s) | admission: selection + transfer (s) "
          "| selection total (s) | transfers | transfer total (s) | ms per transfer | GB/s "
          "| KV moved (MB) | TPOT (ms) | KV footprint | transfer ratio |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    cfg = json.loads((ckpt / "config.json").read_text())
    token_bytes = 2 * 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * cfg["head_dim"]
    for n in lengths:
        prompt = " ".join(words[(i * 7) % len(words)] for i in range(n - 64))
        for mode in args.modes.split(","):
            stream_one(url, "m", prompt[:2000], mode, args.budget, 4)  # warm-up
            r = stream_one(url, "m", prompt, mode, args.budget, args.max_tokens)
            answers[(r["tokens"], mode)] = r["text"]
            moved, n = r["kv_bytes_transferred"], max(r["transfers"], 1)
            check_bytes(moved, r["transfer"], r["tokens"], token_bytes)
            print(f"| {r['tokens']} | {mode} | {r['ttft']:.3f} | {r['prefill_s']:.3f} | "
                  f"{r['admission_s']:.3f} | {r['selection_s']:.3f} | {r['transfers']} | "
                  f"{r['transfer_s']:.3f} | {1000 * r['transfer_s'] / n:.2f} | "
                  f"{moved / max(r['transfer_s'], 1e-9) / 1e9:.1f} | {moved / 1e6:.1f} | "
                  f"{1000 * r['tpot']:.2f} | {r['footprint']:.3f} | {r['transfer']:.3f} |",
                  flush=True)
    serve.shutdown()
    ray.shutdown()
    return answers


def check_bytes(moved: int, ratio: float, tokens: int, token_bytes: int,
                chunk: int = 64) -> None:
    """The bytes a request moved are whole chunks and its transfer ratio's share of the
    prompt's chunk KV (the last chunk is padded to a whole page)."""
    page = chunk * token_bytes
    full = -(-tokens // chunk) * page
    if moved % page or abs(moved - ratio * full) > page / 2:
        raise SystemExit(f"bytes moved {moved} are not the selected chunks' bytes "
                         f"({ratio:.4f} x {full})")


if __name__ == "__main__":
    main()
