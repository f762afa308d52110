"""Reports of evaluation rows: Markdown tables (per length x mode, per task, per tag, and the
paper's benchmark x mode layout with the KV footprint in brackets) and matplotlib plots
(accuracy vs footprint per task, footprint vs context length). Written by
``flashmemory.evaluation.runner`` after a run and by ``flashmemory report`` over several runs.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flashmemory.evaluation.runner import EvalConfig

Rows = Sequence[dict[str, Any]]
_COLUMNS = ("length", "mode", "n", "accuracy (%)", "Δ vs full", "KV mean (%)", "KV peak (%)",
            "transfer (%)", "TTFT (s)", "TPOT (ms)")
# tags in the order the benchmarks report them
_TAG_ORDER = ("easy", "hard", "short", "medium", "long", "abstention")


def _mean(rows: Rows, key: str) -> float:
    return sum(float(r[key]) for r in rows) / len(rows)


def _modes(rows: Rows) -> list[str]:
    return list(dict.fromkeys(r["mode"] for r in rows))


def summarize(rows: Rows) -> list[dict[str, Any]]:
    """One aggregate per (length, mode), in first-seen order; plus 'all' when several lengths."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((str(r["length"]), r["mode"]), []).append(r)
    if len({r["length"] for r in rows}) > 1:
        for r in rows:
            groups.setdefault(("all", r["mode"]), []).append(r)
    aggs = [{"length": length, "mode": mode, "n": len(g), "accuracy": 100 * _mean(g, "score"),
             "kv_mean": 100 * _mean(g, "kv_footprint_mean"),
             "kv_peak": 100 * _mean(g, "kv_footprint_peak"),
             "transfer": 100 * _mean(g, "transfer_ratio"),
             "ttft": _mean(g, "ttft"), "tpot": 1000 * _mean(g, "tpot")}
            for (length, mode), g in groups.items()]
    full = {a["length"]: a["accuracy"] for a in aggs if a["mode"] == "full"}
    for a in aggs:
        a["delta"] = a["accuracy"] - full[a["length"]] if a["length"] in full else None
    return aggs


def format_table(aggs: Sequence[dict[str, Any]]) -> str:
    """Markdown table of ``summarize`` output; the Δ column only when full was run."""
    with_delta = any(a["delta"] is not None for a in aggs)
    cols = [c for c in _COLUMNS if with_delta or c != "Δ vs full"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---:" for _ in cols) + "|"]
    for a in aggs:
        cells = [a["length"], a["mode"], str(a["n"]), f"{a['accuracy']:.1f}"]
        if with_delta:
            cells.append("—" if a["delta"] is None or a["mode"] == "full"
                         else f"{a['delta']:+.1f}")
        cells += [f"{a['kv_mean']:.1f}", f"{a['kv_peak']:.1f}", f"{a['transfer']:.1f}",
                  f"{a['ttft']:.2f}", f"{a['tpot']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def task_table(rows: Rows) -> str:
    """RULER's view: accuracy (mean score x 100) per (length, task) and mode, plus each length's
    average over tasks (RULER's headline number)."""
    modes = _modes(rows)
    cells: dict[tuple[str, str], dict[str, list[float]]] = {}
    for r in rows:
        cells.setdefault((str(r["length"]), r["task"]), {}).setdefault(r["mode"], []).append(
            float(r["score"]))
    lines = ["| length | task | n | " + " | ".join(modes) + " |",
             "|---:|---|---:|" + "|".join("---:" for _ in modes) + "|"]
    per_length: dict[str, dict[str, list[float]]] = {}
    for (length, task), by_mode in cells.items():
        accs = {m: 100 * sum(v) / len(v) for m, v in by_mode.items()}
        for m, a in accs.items():
            per_length.setdefault(length, {}).setdefault(m, []).append(a)
        n = len(next(iter(by_mode.values())))
        lines.append(f"| {length} | {task} | {n} | "
                     + " | ".join(f"{accs[m]:.1f}" if m in accs else "—" for m in modes) + " |")
    for length, by_mode in per_length.items():
        lines.append(f"| {length} | **average** | {len(next(iter(by_mode.values())))} tasks | "
                     + " | ".join(f"**{sum(by_mode[m]) / len(by_mode[m]):.1f}**"
                                  if m in by_mode else "—" for m in modes) + " |")
    return "\n".join(lines)


def tag_table(rows: Rows) -> str:
    """Accuracy per (length, group) and mode, groups being 'overall' and every sample tag
    (LongBench-v2: easy/hard/short/medium/long; LongMemEval: question types, abstention)."""
    modes = _modes(rows)
    tags = {t for r in rows for t in (r.get("tags") or [])}
    order = [t for t in _TAG_ORDER if t in tags] + sorted(tags - set(_TAG_ORDER))
    lines = ["| length | group | n | " + " | ".join(modes) + " |",
             "|---:|---|---:|" + "|".join("---:" for _ in modes) + "|"]
    for length in dict.fromkeys(r["length"] for r in rows):
        at = [r for r in rows if r["length"] == length]
        for group in ["overall", *order]:
            sel = [r for r in at if group == "overall" or group in (r.get("tags") or [])]
            if not sel:
                continue
            accs = {m: [float(r["score"]) for r in sel if r["mode"] == m] for m in modes}
            n = max(len(v) for v in accs.values())
            lines.append(f"| {length} | {group} | {n} | " + " | ".join(
                f"{100 * sum(v) / len(v):.1f}" if v else "—" for v in accs.values()) + " |")
    return "\n".join(lines)


def paper_table(rows: Rows) -> str:
    """The paper's layout: one row per benchmark (suite @ length), one column per mode, each
    cell 'accuracy (mean KV footprint %)'. RULER's accuracy is its average over tasks."""
    modes = _modes(rows)
    lines = ["| benchmark | " + " | ".join(modes) + " |",
             "|---|" + "|".join("---:" for _ in modes) + "|"]
    keys = dict.fromkeys((r["suite"], r["length"]) for r in rows)
    for suite, length in keys:
        sel = [r for r in rows if r["suite"] == suite and r["length"] == length]
        cells = []
        for m in modes:
            g = [r for r in sel if r["mode"] == m]
            cells.append(f"{accuracy(g, suite):.1f} ({100 * _mean(g, 'kv_footprint_mean'):.1f}%)"
                         if g else "—")
        lines.append(f"| {suite} @ {_k(length)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def accuracy(rows: Rows, suite: str) -> float:
    """A benchmark's headline accuracy: RULER averages its tasks, the others their samples."""
    if suite != "ruler":
        return 100 * _mean(rows, "score")
    tasks: dict[str, list[float]] = {}
    for r in rows:
        tasks.setdefault(r["task"], []).append(float(r["score"]))
    return 100 * sum(sum(v) / len(v) for v in tasks.values()) / len(tasks)


def _k(length: int) -> str:
    return f"{length // 1024}K" if length % 1024 == 0 else str(length)


def write_summary(rows: Rows, cfg: EvalConfig, path: Path, *, model: str) -> str:
    """Write summary.md (tables, command, config, date); returns the Markdown tables."""
    table = format_table(summarize(rows))
    if cfg.suite == "ruler":
        table += "\n\nPer task (RULER: string_match_all, qa string_match_part; × 100):\n\n"
        table += task_table(rows)
    if any(r.get("tags") for r in rows):
        table += "\n\nPer group (accuracy, %):\n\n" + tag_table(rows)
    table += "\n\nPaper layout (accuracy, mean KV footprint in brackets):\n\n" + paper_table(rows)
    config = {k: v for k, v in asdict(cfg).items() if k not in ("command", "out_dir")}
    lines = [
        f"# {cfg.suite} — {model}", "", table, "",
        "Accuracy: mean score × 100 (string_match_all; RULER's qa tasks: string_match_part; "
        "LongBench-v2: the extracted letter; LongMemEval: the judge's verdict). "
        "KV: resident / full KV over decode steps. "
        "Transfer: bytes moved store → pool / bytes of all prompt chunks. "
        "TTFT/TPOT are measured inside one shared prefill and one batched decode of all modes.",
        "", f"- date: {datetime.now(UTC).isoformat(timespec='seconds')}", f"- model: `{model}`",
    ]
    if cfg.command:
        lines.append(f"- command: `{cfg.command}`")
    lines += [f"- config: `{json.dumps(config, default=str)}`", ""]
    path.write_text("\n".join(lines), encoding="utf-8")
    return table


def plot(rows: Rows, out_dir: Path) -> list[Path]:
    """PNG plots under ``out_dir``: accuracy vs mean KV footprint per task (one point per mode),
    and mean KV footprint vs context length per mode. Returns the files written."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on servers
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    modes, written = _modes(rows), []
    tasks = list(dict.fromkeys(r["task"] or r["suite"] for r in rows))
    cols = min(4, len(tasks))
    nrows = -(-len(tasks) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3.2 * nrows), squeeze=False)
    for ax, task in zip(axes.flat, tasks, strict=False):
        at = [r for r in rows if (r["task"] or r["suite"]) == task]
        for name, labels in _series(at).items():  # budget variants of a selector: one line
            pts = sorted((100 * _mean(g, "kv_footprint_mean"), 100 * _mean(g, "score"))
                         for m in labels if (g := [r for r in at if r["mode"] == m]))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        ax.set(title=task, xlabel="mean KV footprint (%)", ylabel="accuracy (%)", ylim=(-5, 105))
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize="small")
    fig.tight_layout()
    written.append(_save(fig, out_dir / "accuracy_vs_footprint.png"))
    fig, ax = plt.subplots(figsize=(5, 3.5))
    lengths = sorted({r["length"] for r in rows})
    for m in modes:
        pts = [(n, 100 * _mean(g, "kv_footprint_mean")) for n in lengths
               if (g := [r for r in rows if r["length"] == n and r["mode"] == m])]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
    ax.set(xscale="log", xlabel="context length (tokens)", ylabel="mean KV footprint (%)")
    ax.legend(fontsize="small")
    fig.tight_layout()
    written.append(_save(fig, out_dir / "footprint_vs_length.png"))
    return written


def _series(rows: Rows) -> dict[str, list[str]]:
    """Mode labels grouped by selector (method, indexer, fixed or threshold budget), so that
    the budget variants of one selector draw one accuracy-vs-footprint curve."""
    out: dict[str, list[str]] = {}
    for r in rows:
        name = r.get("method") or r["mode"]
        if r.get("indexer"):
            name += f" [{Path(r['indexer']).name}]"
        if r.get("threshold") is not None:
            name += " (threshold)"
        labels = out.setdefault(name, [])
        if r["mode"] not in labels:
            labels.append(r["mode"])
    return out


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(runs: Sequence[Path], out_dir: Path, *, command: str = "") -> Path:
    """``flashmemory report``: the paper table and plots over the results of several runs (e.g.
    RULER at 4K and 8K, LongBench-v2, LongMemEval) in ``out_dir/report.md``."""
    import pyarrow.parquet as pq

    rows: list[dict[str, Any]] = []
    for run in runs:
        path = Path(run) / "results.parquet"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no results (is {run} a flashmemory eval --out?)")
        rows.extend(pq.read_table(path).to_pylist())
    if not rows:
        raise ValueError("the runs hold no rows")
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = plot(rows, out_dir)
    lines = ["# FlashMemory evaluation report", "",
             "Accuracy (%), mean KV footprint in brackets:", "", paper_table(rows), "",
             "Every benchmark and mode:", "", format_table(summarize(rows)), ""]
    lines += [f"![{p.stem}]({p.name})" for p in plots]
    lines += ["", f"- date: {datetime.now(UTC).isoformat(timespec='seconds')}",
              "- runs: " + ", ".join(f"`{r}`" for r in runs)]
    if command:
        lines.append(f"- command: `{command}`")
    path = out_dir / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
