"""LongMemEval support: the loader on a tiny file in the official layout (and its errors), the
reference history prompt, fitting with the real SmolLM2 tokenizer, LocalJudge against
hand-computed verdicts and OpenAIJudge against a real local HTTP server."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest

from flashmemory.evaluation.longmemeval import (
    TOKENS_TO_GENERATE,
    LocalJudge,
    LongMemItem,
    OpenAIJudge,
    build_history,
    judge_prompt,
    load_longmemeval,
    make_samples,
    normalize,
    score,
    token_f1,
)
from flashmemory.evaluation.niah import NiahSample, render_prompt
from tests.helpers import free_port, write_longmemeval

HEAD = ("I will give you several history chats between you and a user. Please answer the "
        "question based on the relevant chat history.\n\n\nHistory Chats:\n\n")


@pytest.fixture(scope="module")
def tok():
    from flashmemory.model.loader import load_tokenizer, resolve

    return load_tokenizer(resolve("smollm2-135m-instruct"))


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return write_longmemeval(tmp_path / "longmemeval_s.json")


@pytest.fixture
def items(data: Path) -> list[LongMemItem]:
    return load_longmemeval(data)


def _tokens(tok: Any, context: str, chat: bool = True) -> int:
    text = render_prompt(tok, context, "", use_chat_template=chat)
    return len(tok.encode(text, add_special_tokens=not chat))


def _sample(qtype: str, answer: str, question: str = "Q?", abstention: bool = False) -> NiahSample:
    tags = (qtype, "abstention") if abstention else (qtype,)
    return NiahSample("q", "ctx", "", (answer,), qtype, 0.0, qtype, 100, 10, (0, 0), tags,
                      question)


# ---------------------------------------------------------------------------------- loader


def test_loader_reads_the_official_layout(data: Path) -> None:
    items = load_longmemeval(data)
    assert [i.question_id for i in items] == ["lme-user-0", "lme-temp-1", "lme-ku-2",
                                              "lme-multi-3", "lme-user-4_abs"]
    first = items[0]
    assert first.question_type == "single-session-user" and first.answer == "Paris"
    assert first.question_date == "2023/06/01 (Thu) 09:00"
    assert len(first.sessions) == len(first.dates) == len(first.session_ids) == 6
    assert first.session_ids[0] == "lme-user-0-s0"
    assert first.answer_session_ids == ("lme-user-0-s4",)
    role, content = first.sessions[4][0]  # has_answer is dropped, (role, content) kept
    assert role == "user" and content.endswith("I finally moved to Paris last month.")
    assert items[1].answer == "18" and items[3].answer == "3"  # ints coerced to str
    assert [i.abstention for i in items] == [False, False, False, False, True]
    assert len(load_longmemeval(data, limit=2)) == 2


def test_loader_accepts_json_lines(data: Path, tmp_path: Path) -> None:
    rows = json.loads(data.read_text())
    lines = tmp_path / "q.jsonl"
    lines.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert load_longmemeval(lines) == load_longmemeval(data)


def test_loader_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.json"):
        load_longmemeval(tmp_path / "nope.json")


def _drop(row: dict[str, Any], key: str) -> None:
    del row[key]


@pytest.mark.parametrize(("edit", "message"), [
    (lambda r: _drop(r, "question_date"), r"item 1: missing field\(s\) question_date"),
    (lambda r: r.update(question_type="trivia"), r"item 1: field 'question_type'"),
    (lambda r: r.update(question=None), r"item 1: field 'question' must be a string"),
    (lambda r: r["haystack_sessions"][0][1].update(content=5),
     r"item 1: field 'haystack_sessions\[0\]\[1\].content'"),
    (lambda r: r["haystack_dates"].pop(), r"item 1: field 'haystack_sessions' has 3 sessions"),
    (lambda r: r.update(haystack_sessions=[]), r"item 1: field 'haystack_sessions'"),
    (lambda r: r.update(answer_session_ids="s1"), r"item 1: field 'answer_session_ids'"),
])
def test_loader_names_file_item_and_field(data: Path, edit: Any, message: str) -> None:
    rows = json.loads(data.read_text())
    edit(rows[1])
    data.write_text(json.dumps(rows))
    with pytest.raises(ValueError, match=message) as err:
        load_longmemeval(data)
    assert str(data) in str(err.value)


@pytest.mark.parametrize(("text", "message"), [
    ('{"question_id": "x"', "not valid JSON"),
    ('{"data": []}', "expected a JSON list"),
    ("[1]", "item 0: expected an object"),
])
def test_loader_rejects_bad_files(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_longmemeval(path)


# ---------------------------------------------------------------------------------- history


def test_history_is_the_reference_format_in_date_order(items: list[LongMemItem]) -> None:
    item = items[1]  # listed out of date order, as in the oracle file
    assert item.dates[0] > item.dates[1]
    prompt = build_history(item)
    blocks = ""
    for n, k in enumerate(range(3)):  # date order: s0, s1, s2
        i = item.session_ids.index(f"lme-temp-1-s{k}")
        turns = [{"role": r, "content": c} for r, c in item.sessions[i]]
        blocks += (f"\n### Session {n + 1}:\nSession Date: 2023/05/{10 + 2 * k:02d} (Wed) "
                   f"1{k}:30\nSession Content:\n\n{json.dumps(turns)}\n")
    assert prompt == (HEAD + blocks + "\n\nCurrent Date: 2023/06/01 (Thu) 09:00\nQuestion: How "
                      "many days passed between my trip to Rome and the concert?\nAnswer:")
    assert "has_answer" not in prompt


def test_history_of_chosen_sessions(items: list[LongMemItem]) -> None:
    prompt = build_history(items[0], sessions=[5, 2])
    assert prompt.index("Session 2 of lme-user-0") < prompt.index("Session 5 of lme-user-0")
    assert "### Session 2:" in prompt and "### Session 3:" not in prompt
    assert "Session 0 of" not in prompt
    with pytest.raises(ValueError, match="out of range"):
        build_history(items[0], sessions=[6])


# ---------------------------------------------------------------------------------- fitting


def test_everything_fits_in_a_large_budget(tok: Any, items: list[LongMemItem]) -> None:
    samples = make_samples(tok, items, 8192)
    for item, s in zip(items, samples, strict=True):
        assert s.context == build_history(item)
        assert s.num_tokens == _tokens(tok, s.context)
        assert s.num_tokens + TOKENS_TO_GENERATE <= 8192
        assert (s.sessions_kept, s.sessions_total, s.chars_cut) == (len(item.sessions),) * 2 + (0,)
        assert (s.sample_id, s.key, s.value_kind, s.answers) == (
            item.question_id, item.question_type, item.question_type, (item.answer,))
        assert (s.answer_prefix, s.depth, s.needle_char_span, s.question, s.length) == (
            "", 0.0, (0, 0), item.question, 8192)
    assert samples[4].tags == ("single-session-user", "abstention")
    assert samples[1].tags == ("temporal-reasoning",)


def test_oldest_sessions_are_dropped(tok: Any, items: list[LongMemItem]) -> None:
    item = items[0]  # 6 sessions, evidence in the 5th
    two = _tokens(tok, build_history(item, [4, 5]))
    assert _tokens(tok, build_history(item, [3, 4, 5])) > two + 3
    length = TOKENS_TO_GENERATE + two + 3
    [s] = make_samples(tok, [item], length)
    assert (s.sessions_total, s.sessions_kept, s.chars_cut) == (6, 2, 0)
    assert s.context == build_history(item, [4, 5])
    assert "moved to Paris" in s.context and "Session 3 of" not in s.context
    assert s.num_tokens == _tokens(tok, s.context) <= length - TOKENS_TO_GENERATE


def test_newest_session_is_cut_from_the_start(tok: Any, items: list[LongMemItem]) -> None:
    item = items[0]
    length = TOKENS_TO_GENERATE + _tokens(tok, build_history(item, [])) + 60
    [s] = make_samples(tok, [item], length)
    assert (s.sessions_kept, s.sessions_total) == (1, 6) and s.chars_cut > 0
    assert s.num_tokens == _tokens(tok, s.context) <= length - TOKENS_TO_GENERATE
    assert s.context.startswith(HEAD + "\n### Session 1:\nSession Date: 2023/05/20 (Wed) 15:30")
    assert '(5)"}]\n\n\nCurrent Date: ' in s.context  # the newest turn's end survives
    assert s.context.endswith("Question: Which city did I move to?\nAnswer:")
    assert "Session 5 of" not in s.context  # its start is what was cut


def test_plain_prompts_and_too_small_budgets(tok: Any, items: list[LongMemItem]) -> None:
    [s] = make_samples(tok, items[:1], 4096, use_chat_template=False)
    assert s.num_tokens == _tokens(tok, s.context, chat=False)
    with pytest.raises(ValueError, match="too small for lme-user-0"):
        make_samples(tok, items[:1], TOKENS_TO_GENERATE + 20)
    with pytest.raises(ValueError, match="TOKENS_TO_GENERATE"):
        make_samples(tok, items[:1], TOKENS_TO_GENERATE)


# ---------------------------------------------------------------------------------- judges


def test_normalization_and_f1() -> None:
    assert normalize("The  Toyota-Corolla, a car!") == "toyotacorolla car"
    assert normalize("I don't know.") == "i dont know"
    assert token_f1("It took 19 days.", "18 days") == pytest.approx(1 / 3)  # P 1/4, R 1/2
    assert token_f1("The Toyota Corolla, in red", "a red Toyota Corolla") == pytest.approx(6 / 7)


@pytest.mark.parametrize(("qtype", "answer", "prediction", "verdict"), [
    ("single-session-user", "Paris", "You told me you moved to Paris last month.", True),
    ("single-session-user", "Paris", "You moved to Lyon.", False),
    ("temporal-reasoning", "18 days", "It took 19 days.", False),  # F1 1/3; no off-by-one
    ("knowledge-update", "a red Toyota Corolla", "The Toyota Corolla, in red", True),  # F1 6/7
    ("multi-session", "3", "You have 3 bikes.", True),
    ("multi-session", "3", "You have 13 bikes.", False),  # word boundary; F1 0
])
def test_local_judge(qtype: str, answer: str, prediction: str, verdict: bool) -> None:
    sample = _sample(qtype, answer)
    assert LocalJudge()(sample, prediction) is verdict
    assert score(LocalJudge(), sample, prediction) == float(verdict)


@pytest.mark.parametrize(("prediction", "verdict"), [
    ("You did not mention your cat's name.", True),
    ("I don't know.", True),
    ("There is no information about a cat.", True),
    ("Your cat is called Rex.", False),
])
def test_local_judge_abstention(prediction: str, verdict: bool) -> None:
    sample = _sample("single-session-user", "You never mentioned a cat.", abstention=True)
    assert LocalJudge()(sample, prediction) is verdict


def test_judge_prompt_follows_type_and_abstention() -> None:
    temporal = judge_prompt(_sample("temporal-reasoning", "18", "How long?"), "19 days")
    assert "off by one" in temporal and "How long?" in temporal and "19 days" in temporal
    assert "latest value" in judge_prompt(_sample("knowledge-update", "x"), "y")
    assert "rubric" in judge_prompt(_sample("single-session-preference", "x"), "y")
    abstain = judge_prompt(_sample("temporal-reasoning", "x", abstention=True), "y")
    assert "cannot be answered" in abstain and "off by one" not in abstain
    with pytest.raises(ValueError, match="unknown question type"):
        judge_prompt(_sample("trivia", "x"), "y")


class _ChatHandler(BaseHTTPRequestHandler):
    requests: ClassVar[list[dict[str, Any]]] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append({"path": self.path, "auth": self.headers.get("Authorization"),
                                    "body": body})
        if self.path != "/v1/chat/completions" or body["model"] == "broken":
            self._send(500, b'{"error": "boom"}')
            return
        # the verdict reads the graded response only (the reference answer is in the prompt too)
        graded = "Response: You moved to Paris" in body["messages"][0]["content"]
        verdict = "Yes." if graded else "no"
        reply = {"choices": [{"message": {"role": "assistant", "content": verdict}}]}
        self._send(200, json.dumps(reply).encode())

    def _send(self, status: int, payload: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: Any) -> None:  # keep test output quiet
        pass


@pytest.fixture
def server() -> Iterator[str]:
    _ChatHandler.requests = []
    httpd = ThreadingHTTPServer(("127.0.0.1", free_port()), _ChatHandler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def test_openai_judge_against_a_real_server(server: str) -> None:
    judge = OpenAIJudge(server + "/", "judge-model", api_key="secret", timeout=5)
    sample = _sample("single-session-user", "Paris", "Which city did I move to?")
    assert judge.name == "openai:judge-model"
    assert judge(sample, "You moved to Paris.") is True
    assert score(judge, sample, "You moved to Lyon.") == 0.0
    first, second = _ChatHandler.requests
    assert first["path"] == "/v1/chat/completions" and first["auth"] == "Bearer secret"
    body = second["body"]
    assert (body["model"], body["temperature"], body["max_tokens"]) == ("judge-model", 0, 10)
    [message] = body["messages"]
    assert message["role"] == "user"
    assert "Which city did I move to?" in message["content"]
    assert "You moved to Lyon." in message["content"]


def test_openai_judge_errors_name_the_url(server: str) -> None:
    sample = _sample("single-session-user", "Paris")
    with pytest.raises(RuntimeError, match=rf"{server}/chat/completions.*HTTP 500"):
        OpenAIJudge(server, "broken", timeout=5)(sample, "Paris")
    dead = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(RuntimeError, match=rf"{dead}/chat/completions"):
        OpenAIJudge(dead, "judge-model", timeout=5)(sample, "Paris")
