"""RULER's tasks: generators (sizing with the real SmolLM2 tokenizer, answers present, RULER's
wording), QA loaders on tiny files in the official layouts, and the scorers against
hand-computed values."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

from flashmemory.evaluation.ruler import (
    NOISE,
    TASKS,
    QaDataMissing,
    RulerSources,
    generate_ruler,
    postprocess,
    score,
    string_match_all,
    string_match_part,
)
from tests.helpers import write_hotpotqa, write_squad

SYNTHETIC = [t for t in TASKS if not t.startswith("qa")]


@pytest.fixture(scope="module")
def tok():
    from flashmemory.model.loader import load_tokenizer, resolve

    return load_tokenizer(resolve("smollm2-135m-instruct"))


def _rendered_tokens(tok, s) -> int:
    from flashmemory.evaluation.niah import render_prompt

    text = render_prompt(tok, s.context, s.answer_prefix, use_chat_template=True)
    return len(tok.encode(text, add_special_tokens=False))


# -- scorers: hand-computed ---------------------------------------------------------------------
def test_string_match_all_and_part_by_hand() -> None:
    pred = "The numbers are 123, 456 and 7890."
    assert string_match_all(pred, ["123", "456", "789"]) == pytest.approx(1.0)  # "789" in 7890
    assert string_match_all(pred, ["123", "999", "888"]) == pytest.approx(1 / 3)
    assert string_match_all("ALPHA beta", ["alpha", "Beta"]) == 1.0  # case-insensitive
    assert string_match_part(pred, ["999", "456"]) == 1.0
    assert string_match_part(pred, ["999", "888"]) == 0.0
    # task metrics: qa takes the best reference, the others the fraction found
    assert score("qa_1", "Paris, France", ["Lyon", "paris"]) == 1.0
    assert score("vt", "AAA BBB", ["AAA", "BBB", "CCC", "DDD"]) == 0.5
    assert score("niah_multivalue", "1 2 3", ["1", "2", "3", "4"]) == 0.75
    # RULER's task score = mean over samples x 100: (0.5 + 1 + 0) / 3 x 100 = 50
    samples = [("AAA", ["AAA", "BBB"]), ("AAA BBB", ["AAA", "BBB"]), ("", ["AAA", "BBB"])]
    assert 100 * sum(score("vt", p, r) for p, r in samples) / 3 == pytest.approx(50.0)
    with pytest.raises(ValueError):
        score("vt", "x", [])


def test_postprocess_turns_control_characters_into_newlines() -> None:
    assert postprocess("  42\x00\x07abc \t") == "42\n\nabc"


# -- generators -----------------------------------------------------------------------------------
@pytest.mark.parametrize("task", SYNTHETIC)
def test_each_synthetic_task_fits_its_length_and_holds_its_answers(tok, task: str) -> None:
    length = 2048
    (s,) = generate_ruler(tok, task, length, 1, seed=3)
    spec = TASKS[task]
    budget = length - spec.tokens_to_generate
    assert s.num_tokens == _rendered_tokens(tok, s) <= budget
    assert s.num_tokens > 0.9 * budget, (s.num_tokens, budget)  # the haystack fills the room
    assert s.key == task and s.answers
    ctx = s.context
    if spec.family == "niah":
        assert all(f"is: {a}." in ctx for a in s.answers)
    elif spec.family == "vt":
        question = ctx[ctx.index("Memorize and track", 10):]  # after the in-context example
        value = re.search(r"assigned the value (\d+)", s.answer_prefix).group(1)
        assert f"VAR {s.answers[0]} = {value}" in question
        for a, b in zip(s.answers, s.answers[1:], strict=False):
            assert f"VAR {b} = VAR {a}" in question
        assert "5 variables" in s.answer_prefix
    elif spec.family == "cwe":
        listing = ctx[ctx.rindex("Below is a numbered list"):]
        counts = Counter(re.findall(r"\d+\. (\S+)", listing))
        assert len(s.answers) == 10
        assert {counts[a] for a in s.answers} == {6}  # below 4K: 6 vs 1 repeats
        assert max(c for w, c in counts.items() if w not in s.answers) == 1
    else:  # fwe: the three most frequent coded words after the dots
        text = ctx[ctx.index("coded words. ") + 13: ctx.index("\nQuestion:")]
        counts = Counter(text.split())
        top = [w for w, _ in counts.most_common(4) if w != "..."][:3]
        assert counts["..."] == max(counts.values())
        assert list(s.answers) == top


def test_niah_wording_follows_ruler(tok) -> None:
    (single,) = generate_ruler(tok, "niah_single_1", 1024, 1)
    assert single.context.startswith("A special magic number is hidden within the following")
    assert single.answer_prefix.startswith(" The special magic number for ")
    assert single.answer_prefix.endswith("mentioned in the provided text is")
    assert NOISE in single.context
    (multi,) = generate_ruler(tok, "niah_multiquery", 1024, 1)
    assert multi.context.startswith("Some special magic numbers are hidden")
    assert multi.answer_prefix.count(",") == 3 and ", and " in multi.answer_prefix
    assert len(multi.answers) == 4
    (mk3,) = generate_ruler(tok, "niah_multikey_3", 1024, 1)
    uuid = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
    assert re.fullmatch(uuid, mk3.answers[0])
    assert len(re.findall("One of the special magic uuid", mk3.context)) > 5  # needle haystack


def test_samples_are_seeded(tok) -> None:
    a = generate_ruler(tok, "niah_single_2", 1024, 2, seed=7)
    b = generate_ruler(tok, "niah_single_2", 1024, 2, seed=7)
    c = generate_ruler(tok, "niah_single_2", 1024, 2, seed=8)
    assert [s.context for s in a] == [s.context for s in b]
    assert a[0].context != a[1].context and a[0].context != c[0].context


def test_essay_haystack_comes_from_the_users_text(tok, tmp_path: Path) -> None:
    essay = tmp_path / "essay.txt"
    essay.write_text("Lighthouses guide ships at night. Keepers trim the wicks. " * 50)
    (s,) = generate_ruler(tok, "niah_single_2", 1024, 1, sources=RulerSources(haystack=essay))
    assert "Keepers trim the wicks." in s.context


def test_essay_haystack_from_a_directory_of_html_and_text(tok, tmp_path: Path) -> None:
    """A natural-text haystack built offline: pages of a documentation tree, tags stripped."""
    docs = tmp_path / "html"
    (docs / "lib").mkdir(parents=True)
    (docs / "a.html").write_text("<html><script>var x;</script><p>Tuples are immutable "
                                 "sequences.</p></html>" * 40)
    (docs / "lib" / "b.txt").write_text("Dictionaries map keys to values. " * 40)
    (s,) = generate_ruler(tok, "niah_single_2", 1024, 1, sources=RulerSources(haystack=docs))
    assert "Tuples are immutable sequences." in s.context and "<p>" not in s.context
    assert "var x" not in s.context and "Dictionaries map keys to values." in s.context


def test_unknown_task_and_too_small_length(tok) -> None:
    with pytest.raises(ValueError, match="unknown RULER task"):
        generate_ruler(tok, "niah_single_9", 1024, 1)
    with pytest.raises(ValueError, match="smallest haystack"):
        generate_ruler(tok, "cwe", 200, 1)


# -- QA on files in the official layouts --------------------------------------------------------
def test_qa_tasks_read_the_official_layouts(tok, tmp_path: Path) -> None:
    src = RulerSources(squad=write_squad(tmp_path / "squad.json"),
                       hotpotqa=write_hotpotqa(tmp_path / "hotpot.json"))
    squad = generate_ruler(tok, "qa_1", 1024, 2, sources=src)
    for s in squad:
        assert "Unanswerable" not in s.context  # impossible questions are not asked
        (ref,) = s.answers
        assert f"the mill of {ref}." in s.context  # the gold paragraph is in the documents
        assert s.context.startswith("Answer the question based on the given documents.")
        assert "Document 1:\n" in s.context and s.answer_prefix == " Answer:"
    hotpot = generate_ruler(tok, "qa_2", 1024, 1, sources=src)[0]
    assert "Born in Town0." in hotpot.context and hotpot.answers == ("Town0",)
    with pytest.raises(QaDataMissing, match="squad"):
        generate_ruler(tok, "qa_1", 1024, 1)


def test_cwe_from_4k_repeats_common_words_30_times_and_others_3(tok) -> None:
    (s,) = generate_ruler(tok, "cwe", 4096, 1)
    listing = s.context[s.context.rindex("Below is a numbered list"):]
    counts = Counter(re.findall(r"\d+\. (\S+)", listing))
    assert {counts[a] for a in s.answers} == {30}
    assert {c for w, c in counts.items() if w not in s.answers} == {3}
    example = s.context[:s.context.rindex("Below is a numbered list")]
    assert example.count("Answer: The top 10 words") == 1  # one answered in-context example
