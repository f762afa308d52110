"""LongMemEval (Wu et al., 2024): loader for the official S / M / oracle files, the reference's
history prompt fitted to a token budget, and pluggable answer judges. Called by
``flashmemory.evaluation.runner`` for suite ``longmemeval``.

Reference: github.com/xiaowu0162/LongMemEval (README.md, src/generation/run_generation.py,
src/evaluation/evaluate_qa.py, src/evaluation/print_qa_metrics.py).

Prompt: the reference's long-context baseline (``full-history-session``, ``json`` history
format, ``direct`` reading): sessions sorted by date, each rendered as ``### Session i`` with its
date and its turns as JSON (``has_answer`` dropped), then the current date and the question.
``TOKENS_TO_GENERATE`` is the reference's 500 for direct reading (it uses 800 for step-by-step).

Fitting: ``length`` bounds the exact rendered prompt plus ``TOKENS_TO_GENERATE``. When the
history is too long, the OLDEST whole sessions are dropped (as the reference's ``topk_context``
session limit keeps the latest); if even the newest session alone does not fit, its text is cut
from the start. This differs from the reference's token safety net, which keeps the first
``max_len - gen_len - 1000`` history tokens (cutting the newest sessions, mid-JSON). Each sample
(``LongMemSample``) records ``sessions_total``, ``sessions_kept`` and ``chars_cut``.

Judging: ``OpenAIJudge`` follows the reference protocol (one yes/no chat completion per answer,
temperature 0, 10 tokens, verdict = reply contains "yes", criteria per question type and for
abstention). Its prompts are OUR wording of those criteria, not the official judge text, so its
scores are not strictly comparable to the paper's GPT-4o numbers. ``LocalJudge`` is a lexical
offline fallback (see its docstring for its limits). Reporting as the reference does (overall,
per question type, abstention) comes from the sample ``tags``.
"""

from __future__ import annotations

import json
import re
import string
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from flashmemory.evaluation.niah import NiahSample, render_prompt

TOKENS_TO_GENERATE = 500  # run_generation.py: gen_length = 500 unless step-by-step (800)

QUESTION_TYPES: tuple[str, ...] = (
    "single-session-user", "single-session-assistant", "single-session-preference",
    "multi-session", "temporal-reasoning", "knowledge-update",
)
ABSTENTION_SUFFIX = "_abs"  # README: a question_id ending in _abs marks an abstention question

# run_generation.py's direct-reading template and session block (benchmark input: verbatim)
PROMPT_TEMPLATE = (
    "I will give you several history chats between you and a user. Please answer the question "
    "based on the relevant chat history.\n\n\nHistory Chats:\n\n{history}\n\nCurrent Date: "
    "{date}\nQuestion: {question}\nAnswer:"
)
SESSION_TEMPLATE = "\n### Session {index}:\nSession Date: {date}\nSession Content:\n{content}\n"

_FIELDS = ("question_id", "question_type", "question", "answer", "question_date",
           "haystack_session_ids", "haystack_dates", "haystack_sessions", "answer_session_ids")

Turn = tuple[str, str]  # (role, content)


@dataclass(frozen=True)
class LongMemItem:
    """One LongMemEval question with its timestamped chat history."""

    question_id: str
    question_type: str
    question: str
    answer: str
    question_date: str
    session_ids: tuple[str, ...]
    dates: tuple[str, ...]
    sessions: tuple[tuple[Turn, ...], ...]
    answer_session_ids: tuple[str, ...]

    @property
    def abstention(self) -> bool:
        return self.question_id.endswith(ABSTENTION_SUFFIX)


@dataclass(frozen=True)
class LongMemSample(NiahSample):
    """A NiahSample that also says how much of the history fit the token budget."""

    sessions_total: int = 0
    sessions_kept: int = 0  # newest sessions present (the oldest of them maybe cut)
    chars_cut: int = 0  # characters cut from the start of the oldest kept session's text


# ---------------------------------------------------------------------------------- loading


def load_longmemeval(path: Path, limit: int | None = None) -> list[LongMemItem]:
    """Read an official LongMemEval file (JSON list; JSON Lines also accepted, as the reference
    does), optionally only its first ``limit`` questions."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"LongMemEval file not found: {path} (download longmemeval_s_cleaned.json, "
            f"longmemeval_m_cleaned.json or longmemeval_oracle.json from "
            f"https://huggingface.co/datasets/xiaowu0162/longmemeval-cleaned)")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    rows = _read_rows(path)
    if limit is not None:
        rows = rows[:limit]
    return [_parse_item(row, path, i) for i, row in enumerate(rows)]


def _read_rows(path: Path) -> list[Any]:
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as whole_error:
        data = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                data.append(json.loads(line))
            except json.JSONDecodeError:
                raise ValueError(f"{path}: not valid JSON ({whole_error}) nor JSON Lines "
                                 f"(line {number})") from whole_error
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of questions, got {type(data).__name__}")
    return data


class _Reader:
    """Typed field access on one raw item; every error names the file, item index and field."""

    def __init__(self, row: Any, path: Path, index: int) -> None:
        self.where = f"{path}: item {index}"
        if not isinstance(row, dict):
            raise ValueError(f"{self.where}: expected an object, got {type(row).__name__}")
        missing = [f for f in _FIELDS if f not in row]
        if missing:
            raise ValueError(f"{self.where}: missing field(s) {', '.join(missing)}")
        self.row = row

    def error(self, field: str, why: str) -> ValueError:
        return ValueError(f"{self.where}: field {field!r} {why}")

    def string(self, field: str, value: Any) -> str:
        if not isinstance(value, str):
            raise self.error(field, f"must be a string, got {type(value).__name__}")
        return value

    def text(self, field: str) -> str:
        return self.string(field, self.row[field])

    def texts(self, field: str) -> tuple[str, ...]:
        value = self.row[field]
        if not isinstance(value, list):
            raise self.error(field, f"must be a list, got {type(value).__name__}")
        return tuple(self.string(f"{field}[{i}]", v) for i, v in enumerate(value))

    def answer(self) -> str:
        value = self.row["answer"]
        # some official answers are bare numbers (counts); judges compare text
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        return self.text("answer")

    def turn(self, field: str, value: Any) -> Turn:
        if not isinstance(value, dict):
            raise self.error(field, f"must be an object, got {type(value).__name__}")
        for key in ("role", "content"):
            if not isinstance(value.get(key), str):
                raise self.error(f"{field}.{key}", "must be a string")
        return value["role"], value["content"]

    def sessions(self) -> tuple[tuple[Turn, ...], ...]:
        field = "haystack_sessions"
        value = self.row[field]
        if not isinstance(value, list) or not value:
            raise self.error(field, "must be a non-empty list of sessions")
        out = []
        for s, session in enumerate(value):
            if not isinstance(session, list):
                raise self.error(f"{field}[{s}]", "must be a list of turns")
            out.append(tuple(self.turn(f"{field}[{s}][{t}]", v) for t, v in enumerate(session)))
        return tuple(out)


def _parse_item(row: Any, path: Path, index: int) -> LongMemItem:
    r = _Reader(row, path, index)
    qtype = r.text("question_type")
    if qtype not in QUESTION_TYPES:
        raise r.error("question_type", f"is {qtype!r}; expected one of {QUESTION_TYPES}")
    ids, dates, sessions = r.texts("haystack_session_ids"), r.texts("haystack_dates"), r.sessions()
    if not len(ids) == len(dates) == len(sessions):
        raise r.error("haystack_sessions", f"has {len(sessions)} sessions but "
                      f"haystack_session_ids has {len(ids)} and haystack_dates {len(dates)}")
    return LongMemItem(
        question_id=r.text("question_id"), question_type=qtype, question=r.text("question"),
        answer=r.answer(), question_date=r.text("question_date"), session_ids=ids, dates=dates,
        sessions=sessions, answer_session_ids=r.texts("answer_session_ids"))


# ---------------------------------------------------------------------------------- prompts


def _session_text(turns: Sequence[Turn]) -> str:
    # the reference's json history format: '\n' + json.dumps(session without has_answer)
    return "\n" + json.dumps([{"role": role, "content": content} for role, content in turns])


def _date_order(item: LongMemItem, indices: Sequence[int]) -> list[int]:
    bad = [i for i in indices if not 0 <= i < len(item.sessions)]
    if bad:
        raise ValueError(f"{item.question_id}: session indices {bad} out of range "
                         f"0..{len(item.sessions) - 1}")
    # the reference sorts by the date string (stable); oracle files are not date-sorted
    return sorted(indices, key=lambda i: item.dates[i])


def _render(item: LongMemItem, order: Sequence[int], cut: int = 0) -> str:
    """The user message with sessions ``order`` (date-sorted); ``cut`` trims the first one."""
    blocks = []
    for n, i in enumerate(order):
        content = _session_text(item.sessions[i])[cut if n == 0 else 0:]
        blocks.append(SESSION_TEMPLATE.format(index=n + 1, date=item.dates[i], content=content))
    return PROMPT_TEMPLATE.format(history="".join(blocks), date=item.question_date,
                                  question=item.question)


def build_history(item: LongMemItem, sessions: Sequence[int] | None = None) -> str:
    """The reference's full prompt (history, current date, question) for the sessions at
    ``sessions`` (indices into ``item.sessions``; default all), shown in date order."""
    indices = range(len(item.sessions)) if sessions is None else sessions
    return _render(item, _date_order(item, list(indices)))


# ---------------------------------------------------------------------------------- fitting


def _count(tokenizer: Any, context: str, use_chat_template: bool) -> int:
    prompt = render_prompt(tokenizer, context, "", use_chat_template=use_chat_template)
    # chat templates render their own special tokens; plain prompts get the tokenizer's BOS etc.
    return len(tokenizer.encode(prompt, add_special_tokens=not use_chat_template))


def _newest_that_fit(measure: Callable[[int], int], estimates: Sequence[int], budget: int) -> int:
    """Most newest-first sessions whose exact prompt fits (``estimates`` newest first)."""
    room, keep = budget - measure(0), 0
    # per-session estimates land one exact count near the answer: S histories are ~115K
    # tokens, so a bisection of full re-encodes per question would be slow
    while keep < len(estimates) and estimates[keep] <= room:
        room -= estimates[keep]
        keep += 1
    while keep > 0 and measure(keep) > budget:
        keep -= 1
    while keep < len(estimates) and measure(keep + 1) <= budget:
        keep += 1
    return keep


def _fewest_chars_cut(fits: Callable[[int], bool], size: int) -> int:
    """Smallest cut of the newest session's text (``fits(size)`` holds, ``fits(0)`` does not)."""
    lo, hi = 0, size
    while hi - lo > 1:  # hi always fits, so the result is safe even if fit is not monotone
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    return hi


def _fit_item(tokenizer: Any, item: LongMemItem, length: int, chat: bool) -> LongMemSample:
    budget = length - TOKENS_TO_GENERATE
    order = _date_order(item, range(len(item.sessions)))
    cache: dict[tuple[int, int], int] = {}

    def measure(keep: int, cut: int = 0) -> int:
        if (keep, cut) not in cache:
            cache[keep, cut] = _count(tokenizer, _render(item, order[len(order) - keep:], cut),
                                      chat)
        return cache[keep, cut]

    keep, cut = len(order), 0
    if measure(keep) > budget:
        estimates = [len(tokenizer.encode(_session_text(item.sessions[i]),
                                          add_special_tokens=False)) for i in reversed(order)]
        keep = _newest_that_fit(measure, estimates, budget)
    if keep == 0:
        keep, size = 1, len(_session_text(item.sessions[order[-1]]))
        if measure(1, size) > budget:
            raise ValueError(
                f"length={length} is too small for {item.question_id}: the prompt without "
                f"history needs {measure(1, size)} tokens plus "
                f"TOKENS_TO_GENERATE={TOKENS_TO_GENERATE}")
        cut = _fewest_chars_cut(lambda c: measure(1, c) <= budget, size)
    return _sample(item, _render(item, order[len(order) - keep:], cut), length,
                   measure(keep, cut), (len(order), keep, cut))


def _sample(item: LongMemItem, context: str, length: int, num_tokens: int,
            kept: tuple[int, int, int]) -> LongMemSample:
    tags = (item.question_type,) + (("abstention",) if item.abstention else ())
    return LongMemSample(
        sample_id=item.question_id, context=context, answer_prefix="", answers=(item.answer,),
        key=item.question_type, depth=0.0, value_kind=item.question_type, length=length,
        num_tokens=num_tokens, needle_char_span=(0, 0), tags=tags, question=item.question,
        sessions_total=kept[0], sessions_kept=kept[1], chars_cut=kept[2])


def make_samples(tokenizer: Any, items: Sequence[LongMemItem], length: int, *,
                 use_chat_template: bool = True) -> list[NiahSample]:
    """One sample per item whose rendered prompt plus TOKENS_TO_GENERATE fits ``length``."""
    if length <= TOKENS_TO_GENERATE:
        raise ValueError(f"length={length} leaves no room for a prompt after "
                         f"TOKENS_TO_GENERATE={TOKENS_TO_GENERATE}")
    if use_chat_template and not getattr(tokenizer, "chat_template", None):
        raise ValueError("tokenizer has no chat template; pass use_chat_template=False")
    return [_fit_item(tokenizer, item, length, use_chat_template) for item in items]


# ---------------------------------------------------------------------------------- judging


class Judge(Protocol):
    name: str

    def __call__(self, sample: NiahSample, prediction: str) -> bool: ...


# Our own wording of evaluate_qa.py's per-type criteria (not the official prompt text).
_GENERAL = ("Reply yes if the response gives the reference answer, says something equivalent, "
            "or works through all the steps that lead to it. Reply no if it is wrong or covers "
            "only part of what the reference answer requires.")
_CRITERIA = {
    "single-session-user": _GENERAL,
    "single-session-assistant": _GENERAL,
    "multi-session": _GENERAL,
    "temporal-reasoning": _GENERAL + (
        " For a count of days, weeks, months or years, accept a response that is off by one "
        "(say 19 days against a reference of 18)."),
    "knowledge-update": (
        "The user's information changed over time and the reference is its latest value. Reply "
        "yes if the response gives that latest value as its answer, even when it also mentions "
        "earlier values; reply no otherwise."),
    "single-session-preference": (
        "The reference is a rubric describing the personalized reply the user would want. Reply "
        "yes if the response recalls and uses the user's personal details correctly; it need "
        "not cover every point of the rubric. Reply no otherwise."),
}
_ABSTAIN = ("The question cannot be answered from the conversation history; the reference "
            "explains why. Reply yes if the response recognizes this, for instance by saying the "
            "information was never given or is incomplete, or that something related was "
            "mentioned but not what was asked. Reply no if it answers as if the facts were known.")
_JUDGE_TEMPLATE = ("You are grading a chat assistant's answer to a question about its earlier "
                   "conversations with a user. {criteria}\n\nQuestion: {question}\n\nReference: "
                   "{answer}\n\nResponse: {response}\n\nIs the response correct? Reply with "
                   "yes or no only.")


def judge_prompt(sample: NiahSample, prediction: str) -> str:
    """The grading prompt for ``prediction``; criteria follow the sample's type / abstention."""
    if sample.key not in _CRITERIA:
        raise ValueError(f"sample {sample.sample_id}: unknown question type {sample.key!r}")
    criteria = _ABSTAIN if "abstention" in sample.tags else _CRITERIA[sample.key]
    return _JUDGE_TEMPLATE.format(criteria=criteria, question=sample.question,
                                  answer=sample.answers[0], response=prediction)


class OpenAIJudge:
    """Yes/no grading by a model behind an OpenAI-compatible ``/chat/completions`` endpoint.

    No retries: an HTTP or network error raises RuntimeError naming the URL (and status)."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None,
                 timeout: float = 60.0) -> None:
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.api_key = api_key
        self.timeout = timeout
        self.name = f"openai:{model}"

    def __call__(self, sample: NiahSample, prediction: str) -> bool:
        return "yes" in self.complete(judge_prompt(sample, prediction)).lower()

    def complete(self, prompt: str) -> str:
        """The judge model's reply to one user message (temperature 0, 10 tokens)."""
        body = json.dumps({"model": self.model, "messages": [{"role": "user", "content": prompt}],
                           "n": 1, "temperature": 0, "max_tokens": 10}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as e:
            detail = e.read()[:300].decode("utf-8", "replace")
            raise RuntimeError(f"judge request to {self.url} failed: HTTP {e.code}: "
                               f"{detail}") from e
        except OSError as e:  # URLError, refused connections and timeouts
            raise RuntimeError(f"judge request to {self.url} failed: {e}") from e
        try:
            return str(json.loads(raw)["choices"][0]["message"]["content"] or "").strip()
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise RuntimeError(f"judge reply from {self.url} is not a chat completion: "
                               f"{raw[:300]!r}") from e


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize(text: str) -> str:
    """SQuAD answer normalization: lowercase, no punctuation, no articles, single spaces."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION)).split())


def token_f1(prediction: str, gold: str) -> float:
    """SQuAD token F1 between normalized texts."""
    pred, ref = normalize(prediction).split(), normalize(gold).split()
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


DECLINE_PHRASES: tuple[str, ...] = (
    "not mentioned", "never mentioned", "did not mention", "didn't mention", "don't know",
    "do not know", "no information", "not enough information", "cannot", "can't",
    "not provided", "unable to",
)
_DECLINES = tuple(normalize(p) for p in DECLINE_PHRASES)


class LocalJudge:
    """Offline lexical fallback for OpenAIJudge.

    Correct when the normalized gold answer occurs in the normalized prediction (on word
    boundaries) or their token F1 is >= 0.5; abstention items are correct when the prediction
    declines (``DECLINE_PHRASES``). Limits: no semantics, so paraphrases and computed answers
    in other words fail; temporal off-by-one is not tolerated; preference rubrics are
    descriptions, so those questions nearly always fail; a knowledge-update answer naming the
    old value next to the new one passes; a verbose prediction lowers F1; an abstention passes
    on any decline phrase, even one inside an otherwise confident answer."""

    name = "local"

    def __call__(self, sample: NiahSample, prediction: str) -> bool:
        pred = normalize(prediction)
        if "abstention" in sample.tags:
            return any(f" {p} " in f" {pred} " for p in _DECLINES)
        gold = normalize(sample.answers[0])
        if gold and f" {gold} " in f" {pred} ":
            return True
        return token_f1(prediction, sample.answers[0]) >= 0.5


def score(judge: Judge, sample: NiahSample, prediction: str) -> float:
    """1.0 when ``judge`` accepts ``prediction`` for ``sample``, else 0.0."""
    return 1.0 if judge(sample, prediction) else 0.0
