"""RULER-style needle-in-a-haystack (NIAH) task generator and scorer.

Builds seeded, tokenizer-fitted prompts of procedural prose with hidden key/value needles.
"""

from __future__ import annotations

import random
import uuid
from bisect import bisect_right
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

VALUE_KINDS: tuple[str, ...] = ("numbers", "uuids")
_SINGULAR = MappingProxyType({"numbers": "number", "uuids": "uuid"})

_INSTRUCTION = (
    "Some special magic {kind} are hidden within the following text. "
    "Make sure to memorize it. I will quiz you about the {kind} afterwards."
)
_NEEDLE = "One of the special magic {kind} for {key} is: {value}."
_QUESTION = "What is the special magic {singular} for {key} mentioned in the provided text?"
_ANSWER_PREFIX = "The special magic {singular} for {key} mentioned in the provided text is"

_LEXICON_TEXT = """
keyadj: fair|calm|brave|quiet|eager|gentle|hollow|bright|tidy|vivid|humble|rapid|silent|sturdy|
    loyal|witty|clever|fierce|proud|shiny|early|fancy|giant|jolly|lively|modern|narrow|plain|
    rural|sharp|solid|spare|sweet|tender|vast|warm|wise|young|zesty|bold
keynoun: attitude|harbor|lantern|meadow|pioneer|quarter|ribbon|saddle|theory|umbrella|valley|
    whistle|anchor|blanket|canyon|diamond|engine|feather|garden|horizon|island|journey|kettle|
    ledger|mirror|needle|orchard|pepper|quarry|rocket|signal|thunder|voyage|window|compass|
    beacon|cabinet|fortune|galaxy|station
subj: the baker|my neighbor|the old farmer|a young teacher|the mayor|our guide|the librarian|
    a traveling musician|the committee|her brother|the fisherman|a quiet student|the shopkeeper|
    the captain|the gardener|an engineer|the nurse|the painter|his grandmother|Marta|Jonas|Elena|
    Tobias|Priya|Samuel|Ingrid|Omar|the postman|a retired sailor|the carpenter|the innkeeper
vpast: repaired|carried|painted|found|sold|borrowed|cleaned|described|measured|photographed|
    ordered|returned|wrapped|counted|moved|inspected|polished|delivered|admired|rearranged
vpres: repairs|carries|paints|checks|sells|borrows|cleans|describes|measures|photographs|orders|
    returns|wraps|counts|moves|inspects|polishes|delivers|admires|rearranges
obj: the wooden fence|a basket of apples|an old map|the broken radio|a stack of letters|
    the blue bicycle|several jars of honey|the kitchen table|a pair of boots|the garden gate|
    a heavy trunk|the new curtains|a box of tools|the village clock|a small boat|a loaf of bread|
    the faded photograph|two crates of oranges|the iron kettle|a bundle of firewood|
    the church bell|a wool blanket|the rusty wheelbarrow|a set of keys
place: near the river|behind the station|in the market square|at the edge of town|by the harbor|
    on the hill above the farm|inside the old mill|along the coast road|in the back garden|
    outside the library|across the valley|beside the bakery|at the train depot|
    under the stone bridge|in the north field|on the main street|next to the school
time: early in the morning|last autumn|on Tuesday afternoon|after the storm|before sunrise|
    during the festival|late that evening|in the spring|a few weeks later|
    on the first day of winter|every Sunday|around noon|the following day|at the end of the summer
adv: carefully|slowly|quietly|happily|patiently|quickly|reluctantly|proudly|eagerly|cheerfully|
    cautiously|silently
reason: because the weather was turning|so that nothing would be lost|since the road was closed|
    to please the neighbors|before the guests arrived|in case the rain came back|
    as the old custom required|because nobody else had time|after a long discussion
wadj: a cold|a bright|a windy|a quiet|a foggy|a warm|a rainy|a long
tnoun: morning|afternoon|evening|day|night|week
source: the local paper|the town records|an old letter|the shop owner|a neighbor|
    the evening radio|the village notice board|a visiting historian
freq: every week|twice a month|almost every day|once a year|whenever it rained|on most weekends|
    every other morning
obs: the streets were nearly empty|the bells rang twice|the air smelled of fresh bread|
    the river was higher than usual|the lights in the square stayed on|
    the market was unusually busy|the wind carried the sound of music|the shops closed early|
    the fields were covered in frost|the harbor was full of boats|
    a dog barked somewhere down the lane
building: bakery|old mill|footbridge|post office|school|chapel|boathouse|greenhouse|inn
state: closed|empty|under repair|painted green|quiet|busy|locked|half finished
duration: three years|most of the summer|several weeks|as long as anyone could remember|
    nearly a decade|the whole winter|a few days
opinion: worth the trouble|older than it looked|a gift from a friend|the best in the region|
    not for sale|perfectly ordinary|a little too heavy
activity: talking about the harvest|arguing about the weather|fixing the roof|
    looking for a lost key|sorting old books|waiting for the bus|planning the autumn fair
span: the whole afternoon|an hour|most of the evening|a few minutes|half the morning
"""


def _parse_lexicon(text: str) -> Mapping[str, tuple[str, ...]]:
    """Parse `slot: a|b|c` lines (indented lines continue the previous slot) into word lists."""
    joined: dict[str, str] = {}
    name = ""
    for line in text.strip().splitlines():
        words = line
        if not line.startswith(" "):
            name, _, words = line.partition(":")
        joined[name] = joined.get(name, "") + words.strip()
    return MappingProxyType({k: tuple(v.split("|")) for k, v in joined.items()})


_LEXICON = _parse_lexicon(_LEXICON_TEXT)

_TEMPLATES: tuple[str, ...] = (
    "{time}, {subj} {vpast} {obj} {place}.",
    "{subj} {adv} {vpast} {obj} {reason}.",
    "It was {wadj} {tnoun} when {subj} {vpast} {obj} {place}.",
    "According to {source}, {subj} {vpres} {obj} {freq}.",
    "{subj} {vpast} {obj}, and {subj2} {vpast2} {obj2} {place}.",
    "{time}, {obs}.",
    "While {subj} {vpast} {obj}, {obs}.",
    "{subj} noticed that {obs}.",
    "Nobody was surprised when {subj} {vpast} {obj} {place}.",
    "The {building} {place} had been {state} for {duration}.",
    "Later, {subj} {vpast} {obj} {reason}.",
    "When asked about {obj}, {subj} said it was {opinion}.",
    "{subj} and {subj2} spent {span} {activity} {place}.",
    "{subj} {vpres} {obj} {freq}, usually {place}.",
)


@dataclass(frozen=True)
class NiahSample:
    """One NIAH prompt; `context` is the user message, `answer_prefix` goes after the header."""

    sample_id: str
    context: str
    answer_prefix: str
    answers: tuple[str, ...]
    key: str
    depth: float
    value_kind: str
    length: int
    num_tokens: int
    needle_char_span: tuple[int, int]
    tags: tuple[str, ...] = ()  # groups the summary reports accuracy by (e.g. easy, long)
    question: str = ""  # the question alone, for suites whose scorer reads it (a judge)


@dataclass(frozen=True)
class _Needle:
    depth: float
    text: str
    is_target: bool


class _Slots(dict[str, Any]):
    """Lazily draws template slot values; a slot named `x2` never repeats slot `x`."""

    def __init__(self, rng: random.Random) -> None:
        super().__init__()
        self._rng = rng

    def __missing__(self, name: str) -> Any:
        base = name.removesuffix("2")
        value = self._rng.choice(_LEXICON[base])
        while base != name and value == self.get(base):
            value = self._rng.choice(_LEXICON[base])
        self[name] = value
        return value


def prose_sentences(rng: random.Random, count: int) -> list[str]:
    """``count`` seeded filler sentences (the haystack prose), without token accounting."""
    out = []
    for _ in range(count):
        text = rng.choice(_TEMPLATES).format_map(_Slots(rng))
        out.append(text[0].upper() + text[1:])
    return out


class _Filler:
    """Seeded, lazily extended stream of prose sentences with per-sentence token estimates."""

    def __init__(self, rng: random.Random, tokenizer: Any) -> None:
        self._rng = rng
        self._tokenizer = tokenizer
        self.sentences: list[str] = []
        self.para_start: list[bool] = []
        self.cum: list[int] = [0]  # cum[k] = estimated tokens of the first k sentences

    def sentence(self) -> str:
        return prose_sentences(self._rng, 1)[0]

    def _add_paragraph(self) -> None:
        for i in range(self._rng.randint(3, 8)):
            text = self.sentence()
            self.sentences.append(text)
            self.para_start.append(i == 0)
            cost = len(self._tokenizer.encode(" " + text, add_special_tokens=False))
            self.cum.append(self.cum[-1] + cost)

    def ensure(self, count: int) -> None:
        while len(self.sentences) < count:
            self._add_paragraph()

    def ensure_tokens(self, tokens: float) -> None:
        while self.cum[-1] < tokens:
            self._add_paragraph()

    def count_within(self, tokens: float) -> int:
        """Largest sentence count whose estimated token total is <= `tokens`."""
        self.ensure_tokens(tokens)
        return max(0, bisect_right(self.cum, tokens) - 1)


def _boundary(cum: Sequence[int], count: int, depth: float) -> int:
    """Sentence boundary (0..count) whose cumulative token position is closest to `depth`."""
    goal = depth * cum[count]
    k = bisect_right(cum, goal, 0, count + 1)
    if k > count or (k > 0 and goal - cum[k - 1] <= cum[k] - goal):
        return k - 1
    return k


def _assemble(filler: _Filler, count: int, needles: Sequence[_Needle]) -> tuple[str, int, int]:
    """Haystack of `count` sentences with needles; returns (text, target_start, target_end)."""
    slots: dict[int, list[_Needle]] = {}
    for needle in sorted(needles, key=lambda n: n.depth):
        slots.setdefault(_boundary(filler.cum, count, needle.depth), []).append(needle)
    parts: list[str] = []
    pos, span = 0, (0, 0)
    for k in range(count + 1):
        items = [(n.text, " ", n.is_target) for n in slots.get(k, [])]
        if k < count:
            items.append((filler.sentences[k], "\n\n" if filler.para_start[k] else " ", False))
        for text, sep, is_target in items:
            if parts:
                parts.append(sep)
                pos += len(sep)
            if is_target:
                span = (pos, pos + len(text))
            parts.append(text)
            pos += len(text)
    return "".join(parts), span[0], span[1]


def render_prompt(
    tokenizer: Any, context: str, answer_prefix: str, *, use_chat_template: bool = True
) -> str:
    """Exact prompt text whose token count is reported as `NiahSample.num_tokens`."""
    if not use_chat_template:
        return f"{context}\n{answer_prefix}"
    head = tokenizer.apply_chat_template(
        [{"role": "user", "content": context}], add_generation_prompt=True, tokenize=False
    )
    return f"{head}{answer_prefix}"


def _count_tokens(tokenizer: Any, prompt: str, use_chat_template: bool) -> int:
    # Chat templates render their own special tokens; plain prompts get the tokenizer's BOS etc.
    return len(tokenizer.encode(prompt, add_special_tokens=not use_chat_template))


def _fit(measure: Callable[[int], int], filler: _Filler, budget: int, base: int) -> int:
    """Largest filler sentence count whose exact prompt length fits `budget` (measure(0) fits)."""
    count = filler.count_within(budget - base)
    tokens = measure(count)
    if count > 0 and tokens > base:  # rescale the per-sentence estimate with one exact reading
        ratio = (tokens - base) / filler.cum[count]
        count = filler.count_within((budget - base) / ratio)
        tokens = measure(count)
    step = 1
    lo, hi = (count, None) if tokens <= budget else (None, count)
    while lo is None or hi is None:  # gallop outward until the answer is bracketed
        probe = (hi - step) if lo is None else (lo + step)
        if probe <= 0:
            lo = 0
            continue
        filler.ensure(probe)
        if measure(probe) <= budget:
            lo = probe
        else:
            hi = probe
        step *= 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if measure(mid) <= budget else (lo, mid)
    return lo


def _make_value(rng: random.Random, kind: str) -> str:
    if kind == "numbers":
        return str(rng.randint(1_000_000, 9_999_999))
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _make_needles(
    rng: random.Random, kind: str, depth: float, num_distractors: int
) -> tuple[list[_Needle], str, str]:
    """Target needle at `depth` plus distractors at other depths; returns (needles, key, value)."""
    pairs = rng.sample(
        [(a, n) for a in _LEXICON["keyadj"] for n in _LEXICON["keynoun"]], num_distractors + 1
    )
    keys = [f"{a}-{n}" for a, n in pairs]
    values: list[str] = []
    while len(values) < len(keys):
        value = _make_value(rng, kind)
        if value not in values:
            values.append(value)
    needles = [_Needle(depth, _NEEDLE.format(kind=kind, key=keys[0], value=values[0]), True)]
    for key, value in zip(keys[1:], values[1:], strict=True):
        other = rng.random()
        for _ in range(100):
            if abs(other - depth) >= 0.05:
                break
            other = rng.random()
        needles.append(_Needle(other, _NEEDLE.format(kind=kind, key=key, value=value), False))
    return needles, keys[0], values[0]


@dataclass(frozen=True)
class _Spec:
    length: int
    num_distractors: int
    tokens_to_generate: int
    use_chat_template: bool


def _validate(tokenizer: Any, spec: _Spec, num_samples: int, value_kinds: tuple[str, ...]) -> None:
    if spec.length < 1:
        raise ValueError(f"length must be a positive token count, got {spec.length}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    unknown = [k for k in value_kinds if k not in VALUE_KINDS]
    if unknown or not value_kinds:
        raise ValueError(f"unknown value kind(s) {unknown}; expected some of {VALUE_KINDS}")
    max_keys = len(_LEXICON["keyadj"]) * len(_LEXICON["keynoun"])
    if not 0 <= spec.num_distractors < max_keys:
        raise ValueError(f"num_distractors must be in [0, {max_keys}), got {spec.num_distractors}")
    if spec.tokens_to_generate < 0:
        raise ValueError(f"tokens_to_generate must be >= 0, got {spec.tokens_to_generate}")
    if spec.use_chat_template and not getattr(tokenizer, "chat_template", None):
        raise ValueError("tokenizer has no chat template; pass use_chat_template=False")


def _make_sample(
    tokenizer: Any, spec: _Spec, rng: random.Random, *, kind: str, depth: float, sample_id: str
) -> NiahSample:
    needles, key, value = _make_needles(rng, kind, depth, spec.num_distractors)
    singular = _SINGULAR[kind]
    head = _INSTRUCTION.format(kind=kind) + "\n\n"
    tail = "\n\n" + _QUESTION.format(singular=singular, key=key)
    answer_prefix = _ANSWER_PREFIX.format(singular=singular, key=key)
    filler = _Filler(random.Random(rng.getrandbits(64)), tokenizer)
    cache: dict[int, int] = {}

    def measure(count: int) -> int:
        if count not in cache:
            context = head + _assemble(filler, count, needles)[0] + tail
            chat = spec.use_chat_template
            prompt = render_prompt(tokenizer, context, answer_prefix, use_chat_template=chat)
            cache[count] = _count_tokens(tokenizer, prompt, chat)
        return cache[count]

    budget = spec.length - spec.tokens_to_generate
    base = measure(0)
    if base > budget:
        raise ValueError(
            f"length={spec.length} is too small: the template and needles alone need {base} "
            f"tokens plus tokens_to_generate={spec.tokens_to_generate}"
        )
    count = _fit(measure, filler, budget, base)
    haystack, start, end = _assemble(filler, count, needles)
    return NiahSample(
        sample_id=sample_id,
        context=head + haystack + tail,
        answer_prefix=answer_prefix,
        answers=(value,),
        key=key,
        depth=depth,
        value_kind=kind,
        length=spec.length,
        num_tokens=measure(count),
        needle_char_span=(len(head) + start, len(head) + end),
    )


def generate_niah(
    tokenizer: Any,
    *,
    length: int,
    num_samples: int,
    seed: int = 0,
    value_kinds: tuple[str, ...] = VALUE_KINDS,
    num_distractors: int = 3,
    tokens_to_generate: int = 32,
    use_chat_template: bool = True,
) -> list[NiahSample]:
    """Generate `num_samples` NIAH prompts whose token count + tokens_to_generate fits `length`.

    Depths are spread evenly over [0.05, 0.95] and value kinds alternate across samples.
    `num_tokens` counts the rendered prompt (chat template if used) including `answer_prefix`.
    """
    spec = _Spec(length, num_distractors, tokens_to_generate, use_chat_template)
    _validate(tokenizer, spec, num_samples, tuple(value_kinds))
    samples: list[NiahSample] = []
    for i in range(num_samples):
        depth = round(0.5 if num_samples == 1 else 0.05 + 0.9 * i / (num_samples - 1), 6)
        kind = value_kinds[i % len(value_kinds)]
        rng = random.Random(f"niah:{seed}:{length}:{i}")
        sample_id = f"niah-{length}-{kind}-{i:03d}"
        sample = _make_sample(tokenizer, spec, rng, kind=kind, depth=depth, sample_id=sample_id)
        samples.append(sample)
    return samples


def score_string_match_all(prediction: str, answers: Sequence[str]) -> float:
    """Fraction of `answers` found (case-insensitively) in `prediction`; 1.0 means all found.

    RULER's string_match_all metric is the mean of this over samples, times 100.
    """
    if isinstance(answers, str) or not answers:
        raise ValueError("answers must be a non-empty sequence of strings")
    text = prediction.lower()
    return sum(answer.lower() in text for answer in answers) / len(answers)
