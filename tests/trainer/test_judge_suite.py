"""The LLM-judge suite against a real HTTP server on loopback.

The server is a mock of a remote judge model: a stdlib HTTP server that answers OpenAI chat
completions with a fixed reply (a grade, text without one, or too late). What is real is
everything on this side of the socket: the openai client, its timeouts and errors, the
generation of the answers and the parsing of the grade.
"""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from sqlalchemy import select
from transformers import AutoModelForCausalLM, AutoTokenizer

from streams.objects import ObjectStore
from streams.store import Adapter
from tests.conftest import free_port
from tests.trainer import batches
from trainer.config import StageConfig, SuiteSpec, TrainerConfig
from trainer.gate import evaluate, load_suites
from trainer.judge_suite import judge_suite, parse_grade
from trainer.recipe import train_batch

RUBRIC = "A good answer converts the units correctly and says so in one sentence."


class MockJudge(ThreadingHTTPServer):
    """Answers every chat completion with ``reply`` after ``delay_s``; keeps the requests."""

    def __init__(self, reply: str = "0.75", delay_s: float = 0.0) -> None:
        self.reply, self.delay_s, self.requests = reply, delay_s, []
        super().__init__(("127.0.0.1", 0), Handler)


class Handler(BaseHTTPRequestHandler):
    server: MockJudge

    def do_POST(self) -> None:  # noqa: N802 (the stdlib's name)
        self.server.requests.append((self.path, json.loads(self.rfile.read(int(self.headers["Content-Length"])))))
        time.sleep(self.server.delay_s)
        body = json.dumps({"id": "c", "object": "chat.completion", "created": 0, "model": "judge",
                           "choices": [{"index": 0, "finish_reason": "stop",
                                        "message": {"role": "assistant", "content": self.server.reply}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def judge():
    servers = []

    def start(**kwargs) -> MockJudge:
        server = MockJudge(**kwargs)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "judged.jsonl"
    path.write_text(json.dumps({"prompt": "Convert 3 km to miles", "reference": "About 1.86 miles."}) + "\n"
                    + json.dumps({"prompt": "What is 2 plus 2?"}) + "\n")  # fmt: skip
    return str(path)


def options(prompts: str, port: int, **more) -> dict:
    return {"path": prompts, "base_url": f"http://127.0.0.1:{port}/v1", "model": "judge-1", "rubric": RUBRIC,
            "api_key_env": None, "max_new_tokens": 12, **more}  # fmt: skip


@pytest.fixture(scope="module")
def tiny(trained_base):
    return (AutoModelForCausalLM.from_pretrained(trained_base, local_files_only=True),
            AutoTokenizer.from_pretrained(trained_base, local_files_only=True))  # fmt: skip


def test_the_grade_is_the_first_number_of_the_reply_between_0_and_1():
    assert [parse_grade(r) for r in ("0.8", "Grade: 1", "1.0 - well done", "0")] == [0.8, 1.0, 1.0, 0.0]
    for reply in ("7", "1.5 of 2", "Good answer!", ""):
        with pytest.raises(ValueError, match="no grade between 0 and 1"):
            parse_grade(reply)


def test_the_judge_grades_the_models_answers_by_the_rubric(judge, prompts, tiny):
    server = judge(reply="0.75")
    (suite,) = load_suites([SuiteSpec(component="trainer.judge_suite:judge_suite",
                                      options=options(prompts, server.server_port))])  # fmt: skip
    assert (suite.name, suite.protected, suite.tolerance) == ("judge_grade", False, 0.05)
    assert suite.prompts == ("Convert 3 km to miles", "What is 2 plus 2?")
    assert evaluate(*tiny, [suite], {}).scores == {"judge_grade": 0.75}
    (path, first), _ = server.requests
    assert path == "/v1/chat/completions" and first["model"] == "judge-1" and first["temperature"] == 0
    system, user = first["messages"]
    assert RUBRIC in system["content"] and "a number from 0 (worst) to 1 (best)" in system["content"]
    assert "Convert 3 km to miles" in user["content"] and "About 1.86 miles." in user["content"]
    assert user["content"].split("Answer to grade:\n")[1]  # the tiny model's own answer
    assert "Reference answer" not in server.requests[1][1]["messages"][1]["content"]
    other = judge_suite(**options(prompts, server.server_port, rubric="Be kind."))[0]
    assert other.version != suite.version  # another rubric asks another question


@pytest.mark.parametrize(
    ("reply", "delay_s", "reachable", "why"),
    [
        ("I would rather not say.", 0, True, "ValueError: no grade between 0 and 1 in the judge's reply"),
        ("0.9", 2.0, True, "APITimeoutError"),
        ("0.9", 0, False, "APIConnectionError"),
    ],
    ids=["no-grade", "too-slow", "out-of-reach"],
)
def test_a_judge_that_gives_no_grade_makes_the_suite_abstain_with_the_reason(judge, prompts, tiny, reply, delay_s,
                                                                            reachable, why):  # fmt: skip
    port = judge(reply=reply, delay_s=delay_s).server_port if reachable else free_port()
    (suite,) = judge_suite(**options(prompts, port, timeout_s=0.5))
    evaluation = evaluate(*tiny, [suite], {})
    assert evaluation.scores == {}
    assert evaluation.abstained["judge_grade"].startswith(f"the judge judge-1 at http://127.0.0.1:{port}/v1 gave no "
                                                          f"grade: {why}")  # fmt: skip


def test_a_missing_api_key_stops_the_trainer_at_start_up(prompts, monkeypatch):
    monkeypatch.delenv("FEEDLOOP_JUDGE_API_KEY", raising=False)
    with pytest.raises(ValueError, match="put it in FEEDLOOP_JUDGE_API_KEY"):
        judge_suite(**options(prompts, 1, api_key_env="FEEDLOOP_JUDGE_API_KEY"))
    monkeypatch.setenv("FEEDLOOP_JUDGE_API_KEY", "sk-test")
    assert judge_suite(**options(prompts, 1, api_key_env="FEEDLOOP_JUDGE_API_KEY"))[0].client.api_key == "sk-test"


def test_a_judge_out_of_reach_never_stops_the_trainer(trained_base, sessions, prompts, tmp_path):
    (suite,) = judge_suite(**options(prompts, free_port(), timeout_s=0.5))
    batch = batches.write(tmp_path, "batch-sft", batches.sft_records(seed=3, count=16))
    config = TrainerConfig(num_threads=2, sft=StageConfig(epochs=1), rehearsal_per_batch=0)

    result = train_batch(batch, config, sessions, base_model_dir=trained_base, adapters_dir=tmp_path / "adapters",
                         objects=ObjectStore(tmp_path.as_uri()),
                         suites=[suite])  # fmt: skip

    assert result.status == "trained" and result.metrics == {}
    with sessions() as session:
        (row,) = session.scalars(select(Adapter)).all()
    abstained = row.lineage["eval"]["abstained"]
    assert "APIConnectionError" in abstained["parent"]["judge_grade"] == abstained["candidate"]["judge_grade"]
