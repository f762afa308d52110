"""One Parquet label file with a chosen mass aggregation in ``mass`` / ``positives``, for a GPU
call (issue 5, run 10).

Reads one or more label dumps with ``read_labels(..., mass=...)`` (``--mass retrieval`` needs a
``retrieval_heads.json`` in each dump: ``flashmemory indexer heads``, or a copy of another dump's
to score it with the same heads), writes their rows as ``OUT/part-00000.parquet`` with that
aggregation in place of the peak, and leaves out the per-head and mean columns. A training or
evaluation run then reads it with the default ``--mass peak``, and the file is a few MB instead
of a few tens (the per-head masses are most of a dump).

Usage: python benchmarks/indexer_label_export.py --out DIR --mass retrieval DUMP [DUMP ...]
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from flashmemory.indexer.train import MASSES, read_labels

DROPPED = ("mass_heads", "mass_mean", "positives_mean")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dumps", type=Path, nargs="+")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--mass", choices=MASSES, default="retrieval")
    args = ap.parse_args()
    rows = [r for d in args.dumps for r in read_labels(d, mass=args.mass)]
    kept = [{k: v for k, v in r.items() if k not in DROPPED} for r in rows]
    args.out.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(kept), args.out / "part-00000.parquet")
    counts = Counter((r["split"], r["family"]) for r in kept)
    print(f"{args.out}: {len(kept)} rows, mass={args.mass}:",
          ", ".join(f"{s}/{f} {n}" for (s, f), n in sorted(counts.items())))


if __name__ == "__main__":
    main()
