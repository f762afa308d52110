"""Corpora for indexer training and evaluation: a Parquet file of long documents with a question.

Used by ``flashmemory indexer build-corpus`` and read by the label dump (``indexer.labels``).
Schema (one row per document; all strings):
  doc_id    unique id
  family    task family (``retrieve``, ``aggregate``, ``vartrack``, ``multihop``, ``text``)
  split     ``train`` or ``eval``: training and evaluation families are disjoint (FAMILY_SPLIT)
  context   the long document
  question  what the model is asked after the document
  answer    the gold answer ("; "-joined when several)
Synthetic families hide their facts in seeded prose; ``text`` documents are real text (for
example Debian's python3-doc HTML, converted at build time) with a question about one passage.
"""

from __future__ import annotations

import html
import random
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from itertools import pairwise
from pathlib import Path

from flashmemory.evaluation.niah import _LEXICON, prose_sentences

FAMILY_SPLIT = {"retrieve": "train", "aggregate": "train", "vartrack": "train", "text": "train",
                "multihop": "eval"}
COLUMNS = ("doc_id", "family", "split", "context", "question", "answer")
_CITIES = ("Lisbon", "Oslo", "Quito", "Nairobi", "Hanoi", "Tbilisi", "Perth", "Montreal",
           "Cusco", "Bergen", "Dakar", "Kyoto", "Tallinn", "Porto", "Accra", "Lima")
_FIRST = ("Ada", "Boris", "Chen", "Dara", "Elif", "Femi", "Greta", "Hugo", "Ines", "Jonas",
          "Kira", "Luca", "Mina", "Nils", "Omar", "Priya", "Quinn", "Rosa", "Sami", "Tove")
_LAST = ("Alvarez", "Berg", "Costa", "Dube", "Eriksen", "Fischer", "Gupta", "Haas", "Ito",
         "Jensen", "Kowalski", "Laine", "Moreau", "Novak", "Okafor", "Petrov", "Quist", "Rossi")


@dataclass(frozen=True)
class Document:
    doc_id: str
    family: str
    split: str
    context: str
    question: str
    answer: str


def _entity(rng: random.Random) -> str:
    return f"the {rng.choice(_LEXICON['keyadj'])} {rng.choice(_LEXICON['keynoun'])}"


def _person(rng: random.Random, taken: set[str]) -> str:
    while True:
        name = f"{rng.choice(_FIRST)} {rng.choice(_LAST)}"
        if name not in taken:
            taken.add(name)
            return name


def _weave(rng: random.Random, facts: list[str], chars: int) -> str:
    """Prose of about ``chars`` characters with each fact at a random sentence boundary."""
    sents = prose_sentences(rng, max(8, chars // 70))
    for fact in facts:
        sents.insert(rng.randint(0, len(sents)), fact)
    return " ".join(sents)


def _retrieve(rng: random.Random, chars: int) -> tuple[str, str, str]:
    entities: list[str] = []
    while len(entities) < 6:
        e = _entity(rng)
        if e not in entities:
            entities.append(e)
    codes = [str(rng.randint(100_000, 999_999)) for _ in entities]
    facts = [f"The storage code of {e} is {c}." for e, c in zip(entities, codes, strict=True)]
    return _weave(rng, facts, chars), f"What is the storage code of {entities[0]}?", codes[0]


def _aggregate(rng: random.Random, chars: int) -> tuple[str, str, str]:
    cities = rng.sample(_CITIES, 3)
    items = rng.sample([f"{a} {n}" for a in _LEXICON["keyadj"] for n in _LEXICON["keynoun"]], 9)
    where = {it: cities[i % 3] for i, it in enumerate(items)}
    facts = [f"The crate of {it} was shipped to {c}." for it, c in where.items()]
    target = [it for it in items if where[it] == cities[0]]
    return (_weave(rng, facts, chars), f"Which crates were shipped to {cities[0]}?",
            "; ".join(target))


def _multihop(rng: random.Random, chars: int) -> tuple[str, str, str]:
    taken: set[str] = set()
    chains = [(_person(rng, taken), _person(rng, taken), rng.choice(_CITIES)) for _ in range(3)]
    facts = []
    for boss, member, city in chains:
        facts += [f"{boss} is the team lead of {member}.", f"{member} lives in {city}."]
    boss, _, city = chains[0]
    return (_weave(rng, facts, chars),
            f"In which city does the person whose team lead is {boss} live?", city)


def _vartrack(rng: random.Random, chars: int) -> tuple[str, str, str]:
    """Variable tracking (as in RULER): two chains of assignments, each from a number through
    four variables; asks for every variable that holds the first chain's number."""
    names: set[str] = set()
    while len(names) < 8:
        names.add("".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ") for _ in range(5)))
    order = rng.sample(sorted(names), 8)
    a, b = order[:4], order[4:]
    values = rng.sample(range(10_000, 99_999), 2)
    steps = [([f"VAR {c[0]} = {v}."] + [f"VAR {y} = VAR {x}." for x, y in pairwise(c)])
             for c, v in ((a, values[0]), (b, values[1]))]
    facts = [f for pair in zip(*steps, strict=True) for f in pair]  # both chains, in order
    sents = prose_sentences(rng, max(8, chars // 70))
    spots = sorted(rng.randint(0, len(sents)) for _ in facts)
    for spot, fact in sorted(zip(spots, facts, strict=True), reverse=True):
        sents.insert(spot, fact)  # back to front, so every assignment follows the one it copies
    return (" ".join(sents), f"Which variables are assigned the value {values[0]}?",
            "; ".join(a))


_BUILDERS = {"retrieve": _retrieve, "aggregate": _aggregate, "vartrack": _vartrack,
             "multihop": _multihop}


def synthetic(families: list[str], per_family: int, chars: int, seed: int) -> Iterator[Document]:
    """``per_family`` seeded documents of about ``chars`` characters for each family."""
    for fam in families:
        if fam not in _BUILDERS:
            raise ValueError(f"unknown synthetic family {fam!r}; "
                             f"choose from {', '.join(_BUILDERS)}")
        rng = random.Random(f"{seed}-{fam}")
        for i in range(per_family):
            context, question, answer = _BUILDERS[fam](rng, chars)
            yield Document(f"{fam}-{seed}-{i}", fam, FAMILY_SPLIT[fam], context, question, answer)


def html_to_text(raw: str) -> str:
    """Readable text of an HTML page: scripts, styles and tags dropped, whitespace folded."""
    raw = re.sub(r"(?is)<(script|style|nav|footer)\b.*?</\1>", " ", raw)
    raw = re.sub(r"(?i)<(br|/p|/div|/h\d|/li|/pre|/dt|/dd)\b[^>]*>", "\n", raw)
    text = html.unescape(re.sub(r"<[^>]+>", " ", raw))
    text = re.sub(r"[ \t\r\f\v]+", " ", text)
    return re.sub(r"\n\s*\n+", "\n\n", text).strip()


def text_documents(root: Path, count: int, chars: int, seed: int) -> Iterator[Document]:
    """Documents cut from real text files (.html/.htm/.txt) under ``root``; the question quotes
    a sentence of one passage and asks what the text says right after it."""
    files = sorted(p for p in root.rglob("*") if p.suffix in (".html", ".htm", ".txt"))
    if not files:
        raise ValueError(f"no .html/.htm/.txt files under {root}")
    rng = random.Random(f"{seed}-text")
    made = 0
    for path in rng.sample(files, len(files)):
        raw = path.read_text(errors="replace")
        text = html_to_text(raw) if path.suffix != ".txt" else raw
        if len(text) < chars // 2:
            continue
        start = rng.randint(0, max(0, len(text) - chars))
        context = text[start:start + chars]
        sents = [s.strip() for s in re.split(r"(?<=[.!?])\s+", context) if 40 < len(s) < 300]
        if len(sents) < 4:
            continue
        k = rng.randint(1, len(sents) - 2)
        q = f'The text contains the sentence "{sents[k]}" What does it say right after that?'
        yield Document(f"text-{seed}-{made}", "text", "train", context, q, sents[k + 1])
        made += 1
        if made == count:
            return


def write_corpus(docs: list[Document], path: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist([asdict(d) for d in docs])
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def read_corpus(path: Path, split: str | None = None) -> list[Document]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    missing = [c for c in COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(f"{path} is not a corpus: missing columns {', '.join(missing)}")
    docs = [Document(**{c: r[c] for c in COLUMNS}) for r in table.to_pylist()]
    return [d for d in docs if split is None or d.split == split]
