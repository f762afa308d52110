"""Probe of the cluster transport's per-pair NCCL group across two GPUs (issue 10, first step):
two processes build ``cluster.transport._Pair`` as a prefill (rank 0, cuda:0) and a decode
(rank 1, cuda:1) worker do, then rank 0 sends payloads of chunk-like sizes; rank 1 checks every
byte and both report latency and GB/s per size (median of repeats, CUDA-synchronized).

Usage on a machine with >= 2 GPUs (no Ray needed): python benchmarks/nccl_pair.py [--repeats 20]
"""

from __future__ import annotations

import argparse
import datetime as dt
import socket
import statistics
import sys
import time

import torch
import torch.multiprocessing as mp

SIZES_MB = (1, 4, 16, 64, 256)  # a SmolLM2 64-token chunk is ~1.4 MB, a Llama-3-8B one ~8 MB


def _side(rank: int, port: int, repeats: int, q: mp.Queue) -> None:
    try:
        sys.path.insert(0, ".")
        import torch.distributed as dist

        from flashmemory.cluster.transport import _Pair

        torch.cuda.set_device(rank)
        if rank == 1:  # the decode side builds the pair and hosts the store
            store = dist.TCPStore("127.0.0.1", port, 2, True, dt.timedelta(seconds=30),
                                  wait_for_workers=False)
            pair = _Pair.build("nccl", store, 1, "prefill", 30)
        else:
            pair = _Pair.join("nccl", "127.0.0.1", port, 0, "decode", 30)
        for mb in SIZES_MB:
            n = mb * 2**20 // 2
            if rank == 0:
                x = (torch.arange(n, device="cuda") % 65521).to(torch.bfloat16)
            else:
                x = torch.empty(n, dtype=torch.bfloat16, device="cuda")
            times = []
            for i in range(repeats + 2):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                w = pair.group.send([x], 1, i) if rank == 0 else pair.group.recv([x], 0, i)
                w.wait()
                torch.cuda.synchronize()
                if i >= 2:  # warm-up: the first ops set up the NCCL connection
                    times.append(time.perf_counter() - t0)
            ok = True
            if rank == 1:
                want = (torch.arange(n, device="cuda") % 65521).to(torch.bfloat16)
                ok = bool(torch.equal(x, want))
            med = statistics.median(times)
            q.put((rank, mb, med, ok))
        q.put((rank, "done", torch.cuda.get_device_name(rank), 0))
    except Exception as e:  # reported by the parent
        q.put((rank, "error", f"{type(e).__name__}: {str(e)[:400]}", 0))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    if torch.cuda.device_count() < 2:
        sys.exit(f"needs 2 GPUs, found {torch.cuda.device_count()}")
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_side, args=(r, port, args.repeats, q)) for r in (1, 0)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(240)
    rows: dict[int, dict[int, tuple[float, bool]]] = {0: {}, 1: {}}
    while not q.empty():
        rank, key, value, ok = q.get()
        if key in ("done", "error"):
            print(f"rank {rank}: {key} {value}")
        else:
            rows[rank][key] = (value, ok)
    print(f"torch {torch.__version__}, NCCL {torch.cuda.nccl.version()}, "
          f"command: python benchmarks/nccl_pair.py --repeats {args.repeats}")
    print("| payload (MiB) | send (ms) | recv (ms) | GB/s (recv side) | bytes equal |")
    print("|---:|---:|---:|---:|---|")
    for mb in SIZES_MB:
        if mb in rows[1] and mb in rows[0]:
            (ts, _), (tr, ok) = rows[0][mb], rows[1][mb]
            print(f"| {mb} | {1e3 * ts:.3f} | {1e3 * tr:.3f} | "
                  f"{mb * 2**20 / tr / 1e9:.1f} | {ok} |")


if __name__ == "__main__":
    main()
