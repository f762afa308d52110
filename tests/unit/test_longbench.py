"""LongBench-v2: loader on a tiny data.json in the official layout (and each bad input), the
official 0-shot prompt, middle truncation, budget fitting with the real SmolLM2 tokenizer, and
answer extraction / scoring against hand-written responses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flashmemory.evaluation.longbench import (
    GROUPS,
    TOKENS_TO_GENERATE,
    LongBenchItem,
    build_prompt,
    extract_answer,
    load_longbench_v2,
    make_samples,
    score,
    truncate_middle,
)
from tests.helpers import write_longbench


@pytest.fixture(scope="module")
def tok():
    from flashmemory.model.loader import load_tokenizer, resolve

    return load_tokenizer(resolve("smollm2-135m-instruct"))


@pytest.fixture
def items(tmp_path) -> list[LongBenchItem]:
    return load_longbench_v2(write_longbench(tmp_path / "data.json"))


def _rendered_tokens(tok, s, chat: bool) -> int:
    from flashmemory.evaluation.niah import render_prompt

    text = render_prompt(tok, s.context, s.answer_prefix, use_chat_template=chat)
    return len(tok.encode(text, add_special_tokens=not chat))


class _WordTokenizer:
    """One token per space-separated word, so truncation can be checked by hand."""

    def __init__(self) -> None:
        self.vocab: list[str] = []

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        assert add_special_tokens is False
        ids = []
        for word in text.split(" "):
            if word not in self.vocab:
                self.vocab.append(word)
            ids.append(self.vocab.index(word))
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return " ".join(self.vocab[i] for i in ids)


def test_constants_match_reference():
    assert TOKENS_TO_GENERATE == 128
    assert GROUPS == ("easy", "hard", "short", "medium", "long")


# -- loader ---------------------------------------------------------------------------------------
def test_loader_round_trip(items, tmp_path):
    assert [i.id for i in items] == ["lb0", "lb1", "lb2", "lb3"]
    first = items[0]
    assert first == LongBenchItem(
        id="lb0", domain="Single-Document QA", sub_domain="Academic", difficulty="easy",
        length="short", question=" Which choice is right for lb0? ",
        choices=("alpha lb0", "beta lb0", "gamma lb0", "delta lb0"), answer="A",
        context="Oswin built the mill in 1820.")
    assert [(i.difficulty, i.length, i.answer) for i in items] == [
        ("easy", "short", "A"), ("hard", "medium", "B"), ("hard", "long", "C"),
        ("easy", "long", "D")]
    assert load_longbench_v2(tmp_path / "data.json", limit=2) == items[:2]
    assert load_longbench_v2(tmp_path / "data.json", limit=0) == []


def test_loader_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.json"):
        load_longbench_v2(tmp_path / "nope.json")


def _rows(tmp_path: Path) -> list[dict]:
    return json.loads(write_longbench(tmp_path / "data.json").read_text())


@pytest.mark.parametrize(("edit", "match"), [
    (lambda rows: rows[1].pop("choice_C"), r"item 1 lacks field 'choice_C'"),
    (lambda rows: rows[2].update(answer="E"), r"item 2: field 'answer' is 'E'"),
    (lambda rows: rows[0].update(answer="a"), r"item 0: field 'answer' is 'a'"),
    (lambda rows: rows[3].update(difficulty="medium"), r"item 3: field 'difficulty'"),
    (lambda rows: rows[1].update(length="huge"), r"item 1: field 'length' is 'huge'"),
    (lambda rows: rows[0].update(question=None), r"item 0: field 'question' is not a string"),
    (lambda rows: rows.__setitem__(2, ["not", "a", "dict"]), r"item 2 is a list"),
])
def test_loader_bad_items(tmp_path, edit, match):
    rows = _rows(tmp_path)
    edit(rows)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(rows))
    with pytest.raises(ValueError, match=match) as err:
        load_longbench_v2(path)
    assert "bad.json" in str(err.value)


def test_loader_not_a_list(tmp_path):
    path = tmp_path / "obj.json"
    path.write_text(json.dumps({"data": []}))
    with pytest.raises(ValueError, match=r"obj.json: expected a JSON list"):
        load_longbench_v2(path)
    path.write_text("[{")
    with pytest.raises(ValueError, match=r"obj.json is not valid JSON"):
        load_longbench_v2(path)


# -- prompt and truncation ------------------------------------------------------------------------
def test_prompt_is_official_0shot(items):
    prompt = build_prompt(items[3])
    assert prompt == (
        "Please read the following text and answer the question below.\n\n<text>\n"
        "def f():\n    return 42\n</text>\n\n"
        "What is the correct answer to this question: Which choice is right for lb3?\n"
        "Choices:\n(A) alpha lb3\n(B) beta lb3\n(C) gamma lb3\n(D) delta lb3\n\n"
        'Format your response as follows: "The correct answer is (insert answer here)".')
    for item in items:
        prompt = build_prompt(item)
        assert item.question.strip() in prompt and item.context.strip() in prompt
        assert all(f"({x}) {c}" in prompt for x, c in zip("ABCD", item.choices, strict=True))
        assert prompt.endswith('"The correct answer is (insert answer here)".')


def test_truncate_middle_by_hand():
    tok = _WordTokenizer()
    text = " ".join(f"w{i}" for i in range(10))
    assert truncate_middle(tok, text, 10) is text  # fits: the text itself, not a re-decode
    assert truncate_middle(tok, text, 4) == "w0 w1 w8 w9"
    # odd budget: pred.py's ids[-max_len//2:] gives the tail the extra token
    assert truncate_middle(tok, text, 5) == "w0 w1 w7 w8 w9"
    assert truncate_middle(tok, text, 1) == "w9"
    assert truncate_middle(tok, text, 0) == ""
    with pytest.raises(ValueError):
        truncate_middle(tok, text, -1)


def test_truncate_middle_real_tokenizer(tok, items):
    prompt = build_prompt(items[2])
    cut = truncate_middle(tok, prompt, 200)
    assert cut.startswith("Please read the following text") and "HEADMARK" in cut
    assert cut.endswith('"The correct answer is (insert answer here)".')
    assert "(C) gamma lb2" in cut and "TAILMARK" in cut and "MIDDLEMARK" not in cut
    assert abs(len(tok.encode(cut, add_special_tokens=False)) - 200) <= 2


# -- make_samples ---------------------------------------------------------------------------------
@pytest.mark.parametrize("chat", [True, False])
@pytest.mark.parametrize("length", [512, 1024, 4096])
def test_make_samples_fits_budget(tok, items, length, chat):
    samples = make_samples(tok, items, length, use_chat_template=chat)
    assert len(samples) == len(items)
    for item, s in zip(items, samples, strict=True):
        assert s.num_tokens == _rendered_tokens(tok, s, chat)
        assert s.num_tokens + TOKENS_TO_GENERATE <= length
        assert (s.sample_id, s.answers, s.key, s.value_kind, s.tags, s.question) == (
            item.id, (item.answer,), item.domain, item.sub_domain,
            (item.difficulty, item.length), item.question)
        assert (s.answer_prefix, s.depth, s.length, s.needle_char_span) == ("", 0.0, length, (0, 0))
        if item.id != "lb2":  # short enough: the official prompt untouched
            assert s.context == build_prompt(item)
    long = samples[2]
    assert long.context != build_prompt(items[2])
    assert "HEADMARK" in long.context and "TAILMARK" in long.context
    assert "(C) gamma lb2" in long.context
    assert "MIDDLEMARK" not in long.context
    # the cut uses the budget, up to a few tokens of decode/re-encode drift
    assert long.num_tokens >= length - TOKENS_TO_GENERATE - 4


def test_make_samples_too_small(tok, items):
    with pytest.raises(ValueError, match="no room"):
        make_samples(tok, items, TOKENS_TO_GENERATE + 10)


# -- extraction and scoring -----------------------------------------------------------------------
@pytest.mark.parametrize(("response", "letter"), [
    ("The correct answer is (B)", "B"),
    ("After reading, The correct answer is (D).", "D"),
    ("The correct answer is C because of the second document.", "C"),
    ("**The correct answer is (A)**", "A"),
    ("The correct answer is **(C)**", "C"),
    ("The correct answer is (A). Wait, the correct answer is (B).", "A"),
    ("The correct answer is (B) or The correct answer is (C)", "B"),
    # the bare form is tried only when no parenthesised answer exists anywhere
    ("The correct answer is A. No: The correct answer is (D)", "D"),
    ("the correct answer is (B)", None),
    ("The correct answer is (E)", None),
    ("The correct answer is (b)", None),
    ("I think it is B.", None),
    ("", None),
])
def test_extract_answer(response, letter):
    assert extract_answer(response) == letter


def test_score():
    assert score("The correct answer is (B)", ("B",)) == 1.0
    assert score("The correct answer is (B)", ("A",)) == 0.0
    assert score("**The correct answer is C**", ["C"]) == 1.0
    assert score("no idea", ("A",)) == 0.0
    outcomes = [score(r, (a,)) for r, a in [("The correct answer is (A)", "A"),
                                             ("The correct answer is (B)", "C"),
                                             ("The correct answer is D", "D"),
                                             ("nothing", "B")]]
    assert sum(outcomes) / len(outcomes) == 0.5
    with pytest.raises(ValueError):
        score("The correct answer is (A)", "A")
    with pytest.raises(ValueError):
        score("The correct answer is (A)", ())
