"""RULER (Hsieh et al., 2024): its 13 tasks generated as its generator defines them, and scored
with its metrics.

Each task is one of five families with the arguments of RULER's task table:
- ``niah`` (8 tasks): keys / values / queries hidden in a haystack of ``noise`` sentences, an
  ``essay``, or other ``needle`` sentences; 128 tokens to generate; string_match_all.
- ``vt`` variable tracking: a chain of 4 hops ``VAR B = VAR A`` in noise, one in-context
  example first; 30 tokens; string_match_all.
- ``cwe`` common words: a numbered word list where 10 words repeat (30x vs 3x; 6x vs 1x below
  4K), one in-context example first; 120 tokens; string_match_all.
- ``fwe`` frequent words: coded 6-letter words drawn from a zeta(2) distribution, the most
  frequent one replaced by dots; 50 tokens; string_match_all.
- ``qa`` (SQuAD, HotpotQA): the gold documents among distractor documents; 32 tokens;
  string_match_part. The datasets are read from the user's files; without them the task is
  skipped with a message (``QaDataMissing``).

The haystack is sized with the model's tokenizer, on the exact rendered prompt (chat template
plus answer prefix), so that the prompt plus the tokens to generate fit the requested length.
Differences from the reference generator (docs/EVALUATION.md): the essay haystack is the
user's text (``haystack=``) or, offline, the project's procedural prose instead of Paul Graham's
essays; sentences are split with a regular expression instead of NLTK's punkt; random draws come
from one generator seeded per (seed, task, sample), so samples do not match RULER's files.
"""

from __future__ import annotations

import itertools
import json
import math
import random
import re
import string
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from flashmemory.evaluation.niah import NiahSample, prose_sentences, render_prompt

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "One of the special magic {type_v} for {key} is: {value}."
DEPTHS = [round(100 * i / 39) for i in range(40)]  # 40 insertion depths, 0..100 %
DOCUMENT = "Document {i}:\n{document}"

# family -> (template with {context} and {query}, answer prefix); RULER's wording
TEMPLATES: dict[str, tuple[str, str]] = {
    "niah": ("Some special magic {type_v} are hidden within the following text. Make sure to "
             "memorize it. I will quiz you about the {type_v} afterwards.\n{context}\nWhat are "
             "all the special magic {type_v} for {query} mentioned in the provided text?",
             " The special magic {type_v} for {query} mentioned in the provided text are"),
    "vt": ("Memorize and track the chain(s) of variable assignment hidden in the following "
           "text.\n\n{context}\nQuestion: Find all variables that are assigned the value {query} "
           "in the text above.",
           " Answer: According to the chain(s) of variable assignment in the text above, {num_v} "
           "variables are assigned the value {query}, they are: "),
    "cwe": ("Below is a numbered list of words. In these words, some appear more often than "
            "others. Memorize the ones that appear most often.\n{context}\nQuestion: What are the "
            "10 most common words in the above list?",
            " Answer: The top 10 words that appear most often in the list are:"),
    "fwe": ("Read the following coded text and track the frequency of each coded word. Find the "
            "three most frequently appeared coded words. {context}\nQuestion: Do not provide any "
            "explanation. Please ignore the dots '....'. What are the three most frequently "
            "appeared words in the above coded text?",
            " Answer: According to the coded text above, the three most frequently appeared words "
            "are:"),
    "qa": ("Answer the question based on the given documents. Only give me the answer and do not "
           "output any other words.\n\nThe following are given documents.\n\n{context}\n\nAnswer "
           "the question based on the given documents. Only give me the answer and do not output "
           "any other words.\n\nQuestion: {query}",
           " Answer:"),
}


@dataclass(frozen=True)
class RulerTask:
    name: str
    family: str  # niah, vt, cwe, fwe, qa
    tokens_to_generate: int
    metric: str  # "all" (string_match_all) or "part" (string_match_part)
    args: dict[str, Any] = field(default_factory=dict)


def _niah(name: str, haystack: str, k: str, v: str, nk: int = 1, nv: int = 1,
          nq: int = 1) -> RulerTask:
    return RulerTask(name, "niah", 128, "all", {"haystack": haystack, "type_k": k, "type_v": v,
                                                 "num_k": nk, "num_v": nv, "num_q": nq})


TASKS: dict[str, RulerTask] = {t.name: t for t in (
    _niah("niah_single_1", "noise", "words", "numbers"),
    _niah("niah_single_2", "essay", "words", "numbers"),
    _niah("niah_single_3", "essay", "words", "uuids"),
    _niah("niah_multikey_1", "essay", "words", "numbers", nk=4),
    _niah("niah_multikey_2", "needle", "words", "numbers"),
    _niah("niah_multikey_3", "needle", "uuids", "uuids"),
    _niah("niah_multivalue", "essay", "words", "numbers", nv=4),
    _niah("niah_multiquery", "essay", "words", "numbers", nq=4),
    RulerTask("vt", "vt", 30, "all", {"num_chains": 1, "num_hops": 4}),
    RulerTask("cwe", "cwe", 120, "all", {"freq_cw": 30, "freq_ucw": 3, "num_cw": 10}),
    RulerTask("fwe", "fwe", 50, "all", {"alpha": 2.0}),
    RulerTask("qa_1", "qa", 32, "part", {"dataset": "squad"}),
    RulerTask("qa_2", "qa", 32, "part", {"dataset": "hotpotqa"}),
)}


class QaDataMissing(ValueError):
    """A QA task was asked for without its dataset file."""


@dataclass(frozen=True)
class RulerSources:
    """User-provided text: an essay haystack (a plain-text file, or a directory of .txt / .html
    files read in name order, e.g. Debian python3-doc's HTML) and the QA datasets' JSON files
    (SQuAD v2 ``dev-v2.0.json`` layout, HotpotQA ``hotpot_dev_distractor_v1.json`` layout)."""

    haystack: Path | None = None
    squad: Path | None = None
    hotpotqa: Path | None = None


# -- scoring (RULER's metrics) --------------------------------------------------------------------
def postprocess(prediction: str) -> str:
    """RULER's clean-up: control characters become newlines; surrounding space is stripped."""
    return re.sub(r"[\x00-\x1f]", "\n", prediction.strip()).strip()


def string_match_all(prediction: str, refs: Sequence[str]) -> float:
    """Fraction of the references found in the prediction (case-insensitive), 0..1."""
    text = prediction.lower()
    return sum(r.lower() in text for r in refs) / len(refs)


def string_match_part(prediction: str, refs: Sequence[str]) -> float:
    """1 if any reference is found in the prediction (case-insensitive), else 0."""
    text = prediction.lower()
    return float(any(r.lower() in text for r in refs))


def score(task: str, prediction: str, refs: Sequence[str]) -> float:
    """One sample's score in 0..1; RULER reports the mean over samples x 100 per task, and the
    mean over tasks."""
    if isinstance(refs, str) or not refs:
        raise ValueError("refs must be a non-empty sequence of strings")
    match = string_match_part if TASKS[task].metric == "part" else string_match_all
    return match(postprocess(prediction), refs)


# -- word lists -----------------------------------------------------------------------------------
@cache
def _wonderwords(name: str) -> tuple[str, ...]:
    from importlib.resources import files

    text = files("wonderwords.assets").joinpath(f"{name}list.txt").read_text(encoding="utf-8")
    return tuple(w.strip() for w in text.splitlines() if w.strip())


@cache
def _sorted_words(name: str) -> tuple[str, ...]:
    return tuple(sorted(set(_wonderwords(name))))


def key_word(rng: random.Random) -> str:
    """A NIAH key: an adjective-noun pair of wonderwords' lists, uniform over all pairs (RULER's
    key space, drawn without listing its ~10M pairs)."""
    return f"{rng.choice(_sorted_words('adjective'))}-{rng.choice(_sorted_words('noun'))}"


def pair_words(count: int) -> list[str]:
    """The first ``count`` adjective-noun pairs in order (extra CWE words past the lists)."""
    pairs = (f"{a}-{n}" for a in _sorted_words("adjective") for n in _sorted_words("noun"))
    return list(itertools.islice(pairs, count))


@cache
def common_words(seed: int) -> tuple[str, ...]:
    """CWE words: wonderwords' nouns, adjectives and verbs, shuffled by the seed."""
    words = sorted({*_wonderwords("noun"), *_wonderwords("adjective"), *_wonderwords("verb")})
    random.Random(seed).shuffle(words)
    return tuple(words)


_PROSE: list[str] = []  # the offline essay: procedural prose from a fixed seed, grown on demand
_PROSE_RNG = random.Random(1234)


def essay_words(count: int, haystack: Path | None) -> list[str]:
    """The first ``count`` words of the essay haystack (repeated when it is shorter)."""
    if haystack is None:
        while len(_PROSE) < count:
            _PROSE.extend(" ".join(prose_sentences(_PROSE_RNG, 200)).split())
        return _PROSE[:count]
    words = _text_words(str(haystack))
    if not words:
        raise ValueError(f"haystack file {haystack} has no text")
    return [words[i % len(words)] for i in range(count)]


@cache
def _text_words(path: str) -> tuple[str, ...]:
    from flashmemory.indexer.corpus import html_to_text

    root = Path(path)
    if root.is_file():
        return tuple(root.read_text(encoding="utf-8").split())
    words: list[str] = []
    for f in sorted(p for p in root.rglob("*") if p.suffix in (".txt", ".html", ".htm")):
        raw = f.read_text(encoding="utf-8", errors="replace")
        words.extend((raw if f.suffix == ".txt" else html_to_text(raw)).split())
    return tuple(words)


def split_sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]


# -- generators: each returns (user message, answer prefix, references) for a haystack size -----
def _random_value(rng: random.Random, kind: str) -> str:
    if kind == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))
    if kind == "words":
        return key_word(rng)
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise ValueError(f"unknown needle type {kind!r}")


def _insert_at_depths(rng: random.Random, sentences: list[str], items: Sequence[str]) -> str:
    """Essay haystacks: items between sentences at depths drawn from DEPTHS."""
    cuts = sorted(int(len(sentences) * d / 100) for d in rng.sample(DEPTHS, len(items)))
    parts, last = [], 0
    for cut, item in zip(cuts, items, strict=True):
        parts.append(" ".join(sentences[last:cut]))
        parts.append(item)
        last = cut
    parts.append(" ".join(sentences[last:]))
    return " ".join(p for p in parts if p)


def _niah_sample(rng: random.Random, a: dict[str, Any], n: int,
                 src: RulerSources) -> tuple[str, str, list[str]]:
    num_k = max(a["num_k"], a["num_q"])
    keys, values, needles = [], [], []
    for _ in range(num_k):
        keys.append(_random_value(rng, a["type_k"]))
        values.append([_random_value(rng, a["type_v"]) for _ in range(a["num_v"])])
        needles += [NEEDLE.format(type_v=a["type_v"], key=keys[-1], value=v)
                    for v in values[-1]]
    rng.shuffle(needles)
    if a["haystack"] == "essay":
        context = _insert_at_depths(rng, split_sentences(" ".join(essay_words(n, src.haystack))),
                                    needles)
    else:
        if a["haystack"] == "noise":
            lines = [NOISE] * n
        else:  # "needle": the haystack is other needles
            lines = [NEEDLE.format(type_v=a["type_v"], key=_random_value(rng, a["type_k"]),
                                   value=_random_value(rng, a["type_v"])) for _ in range(n)]
        for pos, needle in zip(sorted(rng.choices(range(n + 1), k=len(needles)), reverse=True),
                               needles, strict=True):
            lines.insert(pos, needle)
        context = "\n".join(lines)
    picked = rng.sample(range(num_k), a["num_q"])
    queries = [keys[i] for i in picked]
    answers = [v for i in picked for v in values[i]]
    query = queries[0] if len(queries) == 1 else ", ".join(queries[:-1]) + ", and " + queries[-1]
    template, prefix = TEMPLATES["niah"]
    type_v = a["type_v"]
    if a["num_q"] * a["num_v"] == 1:  # RULER's singular wording
        template, prefix = (_singular(t) for t in (template, prefix))
        type_v = type_v[:-1]
    return (template.format(type_v=type_v, context=context, query=query),
            prefix.format(type_v=type_v, query=query), answers)


def _singular(text: str) -> str:
    return (text.replace("Some", "A").replace("are all", "is").replace("are", "is")
            .replace("answers", "answer"))


def _vt_chain(rng: random.Random, hops: int, letters: int,
              value: str) -> tuple[list[str], list[str]]:
    names: list[str] = []
    while len(names) < hops + 1:
        name = "".join(rng.choices(string.ascii_uppercase, k=letters))
        if name not in names:
            names.append(name)
    lines = [f"VAR {names[0]} = {value}"] + [f"VAR {names[j + 1]} = VAR {names[j]} "
                                            for j in range(hops)]
    return names, lines


def _vt_text(rng: random.Random, n: int, hops: int, letters: int,
             value: str) -> tuple[str, str, list[str]]:
    names, chain = _vt_chain(rng, hops, letters, value)
    lines = [NOISE] * n
    for j, pos in enumerate(sorted(rng.choices(range(n + 1), k=len(chain)))):
        lines.insert(pos + j, chain[j])
    context = "\n".join(lines).replace(". \n", ".\n")
    template, prefix = TEMPLATES["vt"]
    return (template.format(context=context, query=value),
            prefix.format(num_v=hops + 1, query=value), names)


def _vt_sample(rng: random.Random, a: dict[str, Any], n: int,
               src: RulerSources) -> tuple[str, str, list[str]]:
    hops = a["num_hops"]
    # the in-context example: a chain of 3-letter names in a short haystack, answered
    icl_q, icl_prefix, icl_names = _vt_text(rng, min(n, 20), hops, 3,
                                            str(rng.randint(10000, 99999)))
    example = f"{icl_q}{icl_prefix} {' '.join(icl_names)}\n"
    question, prefix, names = _vt_text(rng, n, hops, 5, str(rng.randint(10000, 99999)))
    return f"{example}\n{question}", prefix, names


def _cwe_list(rng: random.Random, words: Sequence[str], num_words: int, common: int,
              uncommon: int, num_cw: int) -> tuple[str, list[str]]:
    chosen = rng.sample(list(words), num_words)
    top, rest = chosen[:num_cw], chosen[num_cw:]
    items = top * common + rest * uncommon
    rng.shuffle(items)
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(items)), top


def _cwe_sample(rng: random.Random, a: dict[str, Any], n: int, src: RulerSources,
                length: int = 4096) -> tuple[str, str, list[str]]:
    words = common_words(0)
    if n > len(words):  # more distinct words than the lists hold: add adjective-noun pairs
        words = words + tuple(pair_words(n - len(words)))
    num_cw = a["num_cw"]
    small = length < 4096
    ex_n, ex_c, ex_u = (20, 3, 1) if small else (40, 10, 3)
    template, prefix = TEMPLATES["cwe"]
    ex_ctx, ex_top = _cwe_list(rng, words, ex_n, ex_c, ex_u, num_cw)
    example = (template.format(context=ex_ctx, query="") + prefix + " "
               + " ".join(f"{i + 1}. {w}" for i, w in enumerate(ex_top)))
    common, uncommon = (6, 1) if small else (a["freq_cw"], a["freq_ucw"])
    ctx, top = _cwe_list(rng, words, max(n, num_cw + 1), common, uncommon, num_cw)
    return f"{example}\n{template.format(context=ctx, query='')}", prefix, top


def _zeta(s: float, terms: int = 100_000) -> float:
    """Riemann zeta for s > 1 (partial sum plus the integral tail)."""
    return sum(k**-s for k in range(1, terms)) + terms ** (1 - s) / (s - 1)


def _fwe_sample(rng: random.Random, a: dict[str, Any], n: int, src: RulerSources,
                length: int = 4096) -> tuple[str, str, list[str]]:
    vocab_size = max(10, (length - TASKS["fwe"].tokens_to_generate) // 50)
    vocab: set[str] = set()
    while len(vocab) < vocab_size:
        vocab.add("".join(rng.choices(string.ascii_lowercase, k=6)))
    words = sorted(vocab)
    rng.shuffle(words)
    words[0] = "..."  # the most frequent "word" is noise
    alpha = a["alpha"]
    z = _zeta(alpha)
    text = [w for k, w in enumerate(words, 1) for _ in range(int(n * k**-alpha / z))]
    rng.shuffle(text)
    template, prefix = TEMPLATES["fwe"]
    return template.format(context=" ".join(text), query=""), prefix, words[1:4]


@dataclass(frozen=True)
class _Qa:
    questions: list[dict[str, Any]]  # query, outputs, context (doc ids), more (doc ids)
    docs: list[str]


@cache
def _read_qa(dataset: str, path: str) -> _Qa:
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if dataset == "squad":
        paragraphs = [(p, [other["context"] for other in article["paragraphs"]])
                      for article in data["data"] for p in article["paragraphs"]]
        docs = sorted({p["context"] for p, _ in paragraphs})
        ids = {d: i for i, d in enumerate(docs)}
        qs = [{"query": qa["question"], "outputs": [x["text"] for x in qa["answers"]],
               "context": [ids[p["context"]]],
               "more": [ids[c] for c in same if c != p["context"]]}
              for p, same in paragraphs for qa in p["qas"] if not qa.get("is_impossible")]
    else:  # hotpotqa: title + sentences per supporting / distractor paragraph
        docs = sorted({f"{t}\n{''.join(s)}" for d in data for t, s in d["context"]})
        ids = {d: i for i, d in enumerate(docs)}
        qs = [{"query": d["question"], "outputs": [d["answer"]],
               "context": [ids[f"{t}\n{''.join(s)}"] for t, s in d["context"]], "more": []}
              for d in data]
    if not qs:
        raise ValueError(f"{path} holds no answerable {dataset} questions")
    return _Qa(qs, docs)


def _qa_sample(rng: random.Random, a: dict[str, Any], n: int, src: RulerSources,
               index: int = 0) -> tuple[str, str, list[str]]:
    path = src.squad if a["dataset"] == "squad" else src.hotpotqa
    if path is None:
        raise QaDataMissing(f"{a['dataset']} needs its dataset file (--{a['dataset']} PATH)")
    qa = _read_qa(a["dataset"], str(path))
    q = qa.questions[index % len(qa.questions)]
    gold, more = list(q["context"]), list(dict.fromkeys(q["more"]))
    if n < len(qa.docs):
        if n - len(gold) > len(more):
            others = [i for i in range(len(qa.docs)) if i not in set(gold) | set(more)]
            picked = gold + more + rng.sample(others, max(0, n - len(gold) - len(more)))
        else:
            picked = gold + rng.sample(more, max(0, n - len(gold)))
        docs = [qa.docs[i] for i in picked]
    else:
        docs = [qa.docs[i % len(qa.docs)] for i in range(n)]
    rng.shuffle(docs)
    context = "\n\n".join(DOCUMENT.format(i=i + 1, document=d) for i, d in enumerate(docs))
    template, prefix = TEMPLATES["qa"]
    return template.format(context=context, query=q["query"]), prefix, list(q["outputs"])


# -- sizing ---------------------------------------------------------------------------------------
def generate_ruler(tokenizer: Any, task: str, length: int, num_samples: int, *, seed: int = 42,
                   sources: RulerSources | None = None,
                   use_chat_template: bool = True) -> list[NiahSample]:
    """``num_samples`` samples of ``task`` whose rendered prompt plus the task's tokens to
    generate fit ``length`` tokens, each with the largest haystack that fits."""
    if task not in TASKS:
        raise ValueError(f"unknown RULER task {task!r}; choose from {', '.join(TASKS)}")
    spec, src = TASKS[task], sources or RulerSources()
    budget = length - spec.tokens_to_generate
    out = []
    for index in range(num_samples):

        def make(n: int, index: int = index) -> tuple[str, str, list[str]]:
            rng = random.Random(f"{seed}-{task}-{index}")
            if spec.family == "niah":
                return _niah_sample(rng, spec.args, n, src)
            if spec.family == "vt":
                return _vt_sample(rng, spec.args, n, src)
            if spec.family == "cwe":
                return _cwe_sample(rng, spec.args, n, src, length)
            if spec.family == "fwe":
                return _fwe_sample(rng, spec.args, n, src, length)
            return _qa_sample(rng, spec.args, n, src, index)

        @cache  # the search and the final count read the same sizes
        def tokens(n: int) -> int:
            user, prefix, _ = make(n)
            text = render_prompt(tokenizer, user, prefix, use_chat_template=use_chat_template)
            return len(tokenizer.encode(text, add_special_tokens=not use_chat_template))

        n = _largest_fitting(tokens, budget, _unit_tokens(spec.family))
        user, prefix, answers = make(n)
        num = tokens(n)
        out.append(NiahSample(f"{task}-{length}-{index:03d}", user, prefix, tuple(answers), task,
                              0.0, task, length, num, (0, 0)))
    return out


def _unit_tokens(family: str) -> float:
    """Rough tokens per haystack unit, for the search's first bracket."""
    return {"niah": 8.0, "vt": 25.0, "cwe": 5.0, "fwe": 2.0, "qa": 150.0}[family]


def _largest_fitting(tokens: Callable[[int], int], budget: int, per_unit: float) -> int:
    """The largest haystack size n >= 1 with tokens(n) <= budget (tokens grows with n)."""
    if tokens(1) > budget:
        raise ValueError(f"even the smallest haystack needs {tokens(1)} tokens; the length "
                         f"leaves {budget} for the prompt")
    lo, hi = 1, max(2, math.ceil(budget / per_unit))
    while tokens(hi) <= budget:  # grow the bracket until it overflows
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # tokens(lo) fits, tokens(hi) does not
        mid = (lo + hi) // 2
        if tokens(mid) <= budget:
            lo = mid
        else:
            hi = mid
    return lo
