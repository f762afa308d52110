"""The ``flashmemory`` command line: ``generate`` (one prompt) and ``eval`` (NIAH benchmark).

Console script entry point ``flashmemory.cli:main``; errors are one ``flashmemory: error:`` line.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import traceback
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flashmemory.config import (
    ATTENTIONS,
    BACKBONE_MODES,
    MODES,
    EngineConfig,
    LSAConfig,
    SamplingParams,
    mode_variant,
)
from flashmemory.types import RequestOutput

if TYPE_CHECKING:
    from flashmemory.engine import Engine

PROG = "flashmemory"
DEFAULT_MODEL = "smollm2-135m-instruct"
EXIT_RUNTIME, EXIT_USAGE = 1, 2


class UsageError(Exception):
    """A bad argument, found before any model is loaded (exit code 2)."""


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage, so every error is a single line."""

    def error(self, message: str) -> Any:  # type: ignore[override]
        raise UsageError(message)


def _quiet_libraries() -> None:
    """Offline, no progress bars, errors only from transformers / sentence-transformers."""
    for key, value in (("TRANSFORMERS_VERBOSITY", "error"), ("HF_HUB_OFFLINE", "1"),
                       ("TOKENIZERS_PARALLELISM", "false"), ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
                       ("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")):
        os.environ.setdefault(key, value)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    for name in ("transformers", "sentence_transformers", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)


# -- argument types -----------------------------------------------------------------------------
def _csv(value: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {value!r}")
    return items


def _lengths(value: str) -> tuple[int, ...]:
    """'4096,8k' -> (4096, 8192)."""
    out = []
    for item in _csv(value):
        num, k = (item[:-1], 1024) if item.lower().endswith("k") else (item, 1)
        try:
            out.append(int(num) * k)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid length {item!r}") from None
    return tuple(out)


def _modes(value: str) -> tuple[str, ...]:
    """'full,lsa,lsa:budget=0.05' -> the specs, each parsed once to fail early."""
    specs = tuple(_csv(value))
    for spec in specs:
        try:
            mode_variant(spec, LSAConfig())
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return specs


# -- parser -------------------------------------------------------------------------------------
def _common(p: argparse.ArgumentParser, selection: bool = True) -> None:
    """Engine and LSA flags; ``selection=False`` leaves out those that only matter when chunks
    are selected (the label dumps decode with full attention)."""
    g = p.add_argument_group("engine")
    g.add_argument("--model", default=DEFAULT_MODEL,
                   help="alias, HF checkpoint directory or .gguf file (default: %(default)s)")
    if selection:
        g.add_argument("--indexer", default="minilm",
                       help="minilm or a sentence-transformers dir")
    g.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    g.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    g.add_argument("--attention", choices=ATTENTIONS, default="auto",
                   help="decode attention: triton kernel (GPU) or torch (default: auto)")
    g.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                   help="run GPU decode steps eagerly")
    g = p.add_argument_group("LSA")
    g.add_argument("--chunk-size", type=int, default=64)
    g.add_argument("--recent-tokens", type=int, default=128)
    g.add_argument("--sink-chunks", type=int, default=1)
    if selection:
        g.add_argument("--budget", type=float, default=0.1,
                       help="fraction of prompt chunks kept")
        g.add_argument("--budget-tokens", type=int, help="token budget (overrides --budget)")
        g.add_argument("--threshold", type=float,
                       help="adaptive budget: keep chunks scoring >= this, --budget is the "
                            "ceiling")
        g.add_argument("--min-budget", type=float, default=0.0,
                       help="with --threshold: fraction of prompt chunks kept at least "
                            "(the floor)")
        g.add_argument("--repredict-every", type=int, default=64)
    p.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Lookahead Sparse Attention inference.")
    sub = parser.add_subparsers(dest="command", required=True,
                                metavar="{generate,eval,report,serve,bench,indexer,loadtest,dashboards}")
    gen = sub.add_parser("generate", help="answer one prompt")
    src = gen.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt-file", help="file holding the prompt ('-' = stdin)")
    src.add_argument("--prompt", help="the prompt text")
    gen.add_argument("--mode", choices=MODES, default="lsa")
    _common(gen)
    g = gen.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=-1)
    g.add_argument("--seed", type=int)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--raw", action="store_true", help="no chat template")
    gen.add_argument("--json", action="store_true", help="print one JSON object")
    gen.set_defaults(func=_cmd_generate)

    ev = sub.add_parser("eval", help="run a long-context benchmark over LSA modes")
    ev.add_argument("--suite", default="ruler-niah",
                    help="ruler-niah (the project's NIAH), ruler (RULER's 13 tasks), corpus "
                         "(documents of --corpus, up to max --lengths), longbench-v2 or "
                         "longmemeval (the official JSON in --data)")
    ev.add_argument("--data", type=Path,
                    help="suites longbench-v2 / longmemeval: the official data.json / "
                         "longmemeval_{s,m,oracle}.json")
    ev.add_argument("--judge-url", default=None,
                    help="suite longmemeval: OpenAI-compatible judge endpoint, e.g. "
                         "https://api.openai.com/v1 (default: the local fallback judge)")
    ev.add_argument("--judge-model", default="gpt-4o-2024-08-06",
                    help="suite longmemeval: the judge model (default: %(default)s)")
    ev.add_argument("--judge-key-env", default="OPENAI_API_KEY",
                    help="environment variable holding the judge's API key")
    ev.add_argument("--tasks", type=_csv, default=[],
                    help="suite ruler: tasks, e.g. niah_single_1,vt,cwe (default: all 13)")
    ev.add_argument("--haystack", type=Path,
                    help="suite ruler: essay haystack, a text file or a directory of .txt/.html "
                         "(e.g. /usr/share/doc/python3-doc/html; default: procedural prose)")
    ev.add_argument("--squad", type=Path, help="suite ruler: SQuAD JSON for qa_1")
    ev.add_argument("--hotpotqa", type=Path, help="suite ruler: HotpotQA JSON for qa_2")
    ev.add_argument("--corpus", type=Path, help="suite corpus: a corpus Parquet file")
    ev.add_argument("--split", choices=["train", "eval", "all"], default="eval",
                    help="suite corpus: which split (default: eval, the held-out families)")
    ev.add_argument("--lengths", type=_lengths, default=(4096, 8192), help="e.g. 4096,8k")
    ev.add_argument("--modes", type=_modes, default=("full", "lsa", "recency", "random", "oracle"),
                    help=f"modes ({', '.join(MODES)}) or variants MODE:key=value, e.g. "
                         "full,lsa,lsa:budget=0.05,lsa:threshold=0.4:min_budget=0.02,"
                         "lsa:indexer=runs/idx,snapkv,quest (default: %(default)s)")
    ev.add_argument("--samples", type=int, default=5,
                    help="samples per length (ruler: per task); longbench-v2 / longmemeval: "
                         "the first N items, 0 = all")
    ev.add_argument("--concurrency", type=int, default=None,
                    help="samples in flight; with --cluster they spread over the decode "
                         "workers (default: 1, with --cluster the number of decode workers)")
    ev.add_argument("--resume", action="store_true",
                    help="keep the samples already finished in --out and run the rest")
    ev.add_argument("--out", required=True, type=Path, help="output directory")
    ev.add_argument("--overwrite", action="store_true", help="replace existing results in --out")
    ev.add_argument("--max-tokens", type=int, default=None,
                    help="tokens to generate (default 64: a UUID answer needs ~40; suite ruler: "
                         "each task's own count)")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--value-kinds", type=_csv, default=["numbers", "uuids"])
    ev.add_argument("--distractors", type=int, default=3)
    ev.add_argument("--cluster", metavar="ADDRESS", default=None,
                    help="evaluate through a running FlashMemory cluster ('auto' inside a Ray "
                         "job) instead of loading the model here")
    _common(ev)
    ev.set_defaults(func=_cmd_eval)

    rep = sub.add_parser("report", help="one report (paper table, plots) over eval runs")
    rep.add_argument("runs", nargs="+", type=Path, help="output directories of flashmemory eval")
    rep.add_argument("--out", required=True, type=Path, help="report directory")
    rep.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO)")
    rep.add_argument("--debug", action="store_true", help="show tracebacks")
    rep.set_defaults(func=_cmd_report)

    from flashmemory.cluster import serve_cli

    serve_cli.add_parser(sub).set_defaults(func=serve_cli.run)
    from flashmemory.bench import cli as bench_cli

    bench_cli.add_parser(sub, _lengths, _csv)
    from flashmemory.indexer import cli as indexer_cli

    indexer_cli.add_parser(sub, _csv, _common)
    from flashmemory.loadtest import cli as loadtest_cli

    loadtest_cli.add_parser(sub)
    dash = sub.add_parser("dashboards", help="write the Grafana dashboards and their ConfigMap")
    dash.add_argument("--out", type=Path, default=Path("k8s"), help="directory (default k8s)")
    dash.add_argument("--check", action="store_true",
                      help="write nothing; exit 1 if the files under --out differ")
    dash.add_argument("--query", metavar="PROMETHEUS_URL",
                      help="write nothing; print every panel's current values from this server")
    dash.add_argument("--rate-window", default="5m", help="with --query: $__rate_interval")
    dash.add_argument("--range", default="10m", help="with --query: $__range, and the span "
                                                     "of the peak column")
    dash.add_argument("--debug", action="store_true", help="show tracebacks")
    dash.set_defaults(func=_cmd_dashboards)
    return parser


# -- config building (all before the model loads) -----------------------------------------------
def _lsa(args: argparse.Namespace, mode: str, seed: int | None) -> LSAConfig:
    return LSAConfig(mode=mode, chunk_size=args.chunk_size,  # type: ignore[arg-type]
                     budget=args.budget, budget_tokens=args.budget_tokens,
                     threshold=args.threshold, min_budget=args.min_budget,
                     sink_chunks=args.sink_chunks,
                     recent_tokens=args.recent_tokens, repredict_every=args.repredict_every,
                     seed=seed or 0)


def _engine(args: argparse.Namespace, lsa: LSAConfig, configs: list[LSAConfig]) -> EngineConfig:
    """EngineConfig plus the cheap checks: the model resolvable, and what each of the run's
    configs needs (its indexer; on DeepSeek-V4 also its mode and chunk size)."""
    from flashmemory.model.loader import model_type, resolve

    cfg = EngineConfig(model=args.model, dtype=args.dtype, device=args.device,
                       indexer=args.indexer, attention=args.attention,
                       cuda_graphs=args.cuda_graphs, lsa=lsa)
    source = resolve(cfg.model)
    if model_type(source) == "deepseek_v4":
        from flashmemory.dsv4_engine import check_configs

        check_configs(source, configs, cfg.indexer)
        return cfg
    from flashmemory.indexer.neural import resolve_indexer

    for name in dict.fromkeys(c.indexer or cfg.indexer for c in configs if c.mode == "lsa"):
        resolve_indexer(name)
    return cfg


def _read_prompt(args: argparse.Namespace) -> str:
    if args.prompt is not None:
        text = args.prompt
    elif args.prompt_file == "-":
        text = sys.stdin.read()
    else:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise UsageError(f"prompt file {args.prompt_file!r} not found")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read prompt file {args.prompt_file!r}: {exc}") from None
    if not text.strip():
        raise UsageError("the prompt is empty")
    return text


def _load(cfg: EngineConfig) -> Engine:
    """The engine for the model: ``LLM``, or ``DSV4LLM`` for a DeepSeek-V4 checkpoint."""
    from flashmemory.engine import load_engine

    logging.getLogger(__name__).info("loading %s", cfg.model)
    return load_engine(cfg)


# -- generate -----------------------------------------------------------------------------------
def _cmd_generate(args: argparse.Namespace, argv: list[str]) -> int:
    try:
        text = _read_prompt(args)
        sampling = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                                  top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                                  stop=tuple(args.stop))
        lsa = _lsa(args, args.mode, args.seed)
        cfg = _engine(args, lsa, [lsa])
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    llm = _load(cfg)
    run = llm.generate if args.raw else llm.chat
    out = run(text, sampling, lsa)[0]
    if args.json:
        print(json.dumps(generate_json(out, cfg.model)))
    else:
        print(out.text)
        print()
        print(format_stats(out))
    return 0


def generate_json(out: RequestOutput, model: str) -> dict[str, Any]:
    """The ``generate --json`` object: text, finish_reason, mode, usage, timing."""
    stats = asdict(out.stats)
    timing = {k: stats.pop(k) for k in ("ttft", "tpot", "e2e", "prefill_s", "selection_s",
                                        "transfer_s", "admission_s")}
    return {"text": out.text, "finish_reason": out.finish_reason, "mode": out.mode,
            "model": model, "usage": stats, "timing": timing}


def format_stats(out: RequestOutput) -> str:
    st = out.stats
    return "\n".join([
        f"--- {out.mode} | finish: {out.finish_reason}",
        f"tokens      prompt {st.prompt_tokens} ({st.num_prompt_chunks} chunks), "
        f"completion {st.completion_tokens}",
        f"KV resident mean {100 * st.kv_footprint_mean:.1f}%, "
        f"peak {100 * st.kv_footprint_peak:.1f}% of full",
        f"KV moved    {st.kv_bytes_transferred / 2**20:.2f} MiB "
        f"({100 * st.transfer_ratio:.1f}% of prompt KV), "
        f"{st.chunks_selected:.1f} chunks selected x {st.repredictions} re-predictions",
        f"timing      TTFT {st.ttft:.3f} s, TPOT {1000 * st.tpot:.1f} ms, e2e {st.e2e:.3f} s",
        f"split       prefill {st.prefill_s:.3f} s, selection {st.selection_s:.3f} s, "
        f"transfer {st.transfer_s:.3f} s in {st.transfers} transfers "
        f"(admission {st.admission_s:.3f} s)",
    ])


# -- eval ---------------------------------------------------------------------------------------
def _cmd_eval(args: argparse.Namespace, argv: list[str]) -> int:
    from flashmemory.evaluation.ruler import RulerSources
    from flashmemory.evaluation.runner import (
        PARTS_DIR,
        RESULTS_FILE,
        EvalConfig,
        JudgeConfig,
        run_eval,
    )
    try:
        lsa = _lsa(args, "lsa", args.seed)
        judge = JudgeConfig(args.judge_url, args.judge_model, args.judge_key_env)
        ecfg = EvalConfig(out_dir=args.out, suite=args.suite, lengths=args.lengths,
                          modes=args.modes, samples=args.samples, seed=args.seed, lsa=lsa,
                          max_tokens=args.max_tokens, value_kinds=tuple(args.value_kinds),
                          distractors=args.distractors, corpus=args.corpus,
                          split=None if args.split == "all" else args.split,
                          tasks=tuple(args.tasks),
                          ruler=RulerSources(args.haystack, args.squad, args.hotpotqa),
                          data=args.data, judge=judge, concurrency=args.concurrency or 1,
                          resume=args.resume, command=shlex.join([PROG, *argv]))
        variants = ecfg.mode_configs()
        cfg = _engine(args, lsa, variants)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    done = [p for p in (args.out / RESULTS_FILE, args.out / PARTS_DIR) if p.exists()]
    if done and not (args.overwrite or args.resume):
        raise UsageError(f"{done[0]} exists; pass --resume to continue that run or "
                         "--overwrite to replace it")
    if args.cluster:
        from flashmemory.cluster.eval_backend import ClusterBackend

        backbone = [v for v in variants if v.mode in BACKBONE_MODES]
        if backbone:
            raise UsageError(f"--cluster cannot run the {backbone[0].mode} mode (it reads the "
                             "backbone's attention); drop it from --modes")
        backend: Any = ClusterBackend.connect(args.cluster)
        if args.concurrency is None:
            ecfg = replace(ecfg, concurrency=len(backend.client.h.decodes))
    else:
        backend = _load(cfg)
    result = run_eval(backend, ecfg)
    print(result.table)
    print(f"\nresults: {result.results_path}\nsummary: {result.summary_path}")
    return 0


def _cmd_report(args: argparse.Namespace, argv: list[str]) -> int:
    from flashmemory.evaluation import report

    path = report.write_report(args.runs, args.out, command=shlex.join([PROG, *argv]))
    print(path.read_text(encoding="utf-8"), end="")
    return 0


def _cmd_dashboards(args: argparse.Namespace, argv: list[str]) -> int:
    from flashmemory.cluster import dashboards

    if args.query:
        print(dashboards.format_snapshot(dashboards.snapshot(args.query, args.rate_window,
                                                             args.range)), end="")
        return 0
    if args.check:
        stale = [rel for rel, text in dashboards.files().items()
                 if not (args.out / rel).exists() or (args.out / rel).read_text() != text]
        for rel in stale:
            print(f"stale: {args.out / rel}")
        return 1 if stale else 0
    for path in dashboards.write(args.out):
        print(path)
    return 0


# -- entry point --------------------------------------------------------------------------------
def _error(message: object) -> None:
    print(f"{PROG}: error: {' '.join(str(message).split())}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Parse, run, and turn every failure into one stderr line: 2 = usage, 1 = runtime."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = build_parser().parse_args(argv)
    except UsageError as exc:
        _error(exc)
        return EXIT_USAGE
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0
    logging.basicConfig(level=logging.WARNING, format=f"{PROG}: %(levelname)s: %(message)s")
    if getattr(args, "verbose", False):
        logging.getLogger("flashmemory").setLevel(logging.INFO)
    _quiet_libraries()
    try:
        return int(args.func(args, argv))
    except UsageError as exc:
        _error(exc)
        return EXIT_USAGE
    except KeyboardInterrupt:
        _error("interrupted")
        return 130
    except (ValueError, FileNotFoundError) as exc:  # bad input found at run time
        if args.debug:
            traceback.print_exc()
        _error(exc)
        return EXIT_RUNTIME
    except Exception as exc:
        if args.debug:
            traceback.print_exc()
        hint = "" if args.debug else " (run with --debug for the traceback)"
        _error(f"unexpected {type(exc).__name__}: {exc}{hint}")
        return EXIT_RUNTIME


if __name__ == "__main__":
    # run the imported module's main: subcommands raise ``flashmemory.cli.UsageError``, which
    # would be another class than this ``__main__`` module's own
    from flashmemory.cli import main as _main

    sys.exit(_main())
