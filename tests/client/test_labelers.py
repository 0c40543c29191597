"""The LLM labeler against a loopback server speaking the OpenAI chat-completions protocol."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from client.labelers import LLMLabeler, RuleLabeler


class FakeLLM(BaseHTTPRequestHandler):
    answers: list = []
    requests: list = []

    def do_POST(self):  # noqa: N802 - the http.server API
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeLLM.requests.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
        answer = FakeLLM.answers.pop(0)
        if answer == "500":
            self.send_response(500)
            self.end_headers()
            return
        payload = {"choices": [{"message": {"role": "assistant", "content": answer}}]}
        data = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    FakeLLM.answers, FakeLLM.requests = [], []
    httpd = HTTPServer(("127.0.0.1", 0), FakeLLM)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}/v1"
    httpd.shutdown()


VOCAB = ["Pleural effusion", "Cardiomegaly", "Lung nodule"]


def test_llm_answers_are_parsed_cached_and_reused(server, tmp_path, monkeypatch):
    monkeypatch.setenv("SITE_LLM_KEY", "secret")
    FakeLLM.answers = ['```json\n{"Pleural effusion": "present", "Cardiomegaly": "absent", "Lung nodule": "not mentioned"}\n```']
    cache = tmp_path / "llm.jsonl"
    labeler = LLMLabeler(server, "local-model", VOCAB, cache, api_key_env="SITE_LLM_KEY")
    text = "Small effusion. Heart normal."
    assert labeler.label(text) == {"Pleural effusion": True, "Cardiomegaly": False}
    request = FakeLLM.requests[0]
    assert request["path"] == "/v1/chat/completions" and request["auth"] == "Bearer secret"
    assert request["body"]["model"] == "local-model" and text in request["body"]["messages"][1]["content"]
    again = LLMLabeler(server, "local-model", VOCAB, cache)  # a new process: the disk cache answers
    assert again.label(text) == {"Pleural effusion": True, "Cardiomegaly": False}
    assert len(FakeLLM.requests) == 1 and again.stats["cached"] == 1


@pytest.mark.parametrize("answer", ["500", "not json at all", '{"Pleural effusion": "maybe"}', "[1, 2]"])
def test_failures_fall_back_to_the_rule_labeler(server, answer):
    FakeLLM.answers = [answer]
    labeler = LLMLabeler(server, "m", VOCAB)
    text = "No pleural effusion. Cardiomegaly."
    assert labeler.label(text) == RuleLabeler(VOCAB).label(text) == {"Pleural effusion": False, "Cardiomegaly": True}
    assert labeler.stats["fallback"] == 1


def test_unreachable_endpoint_falls_back():
    labeler = LLMLabeler("http://127.0.0.1:9/v1", "m", VOCAB, timeout_s=2)
    assert labeler.label("Lung nodule.") == {"Lung nodule": True}
    assert labeler.stats["fallback"] == 1


def test_an_ingest_with_the_llm_labeler_uses_its_answers(server, tmp_path, ct_series_writer, site_yaml_writer):
    from client.ingest.pipeline import run_ingest
    from client.site_config import load_site_config
    from shared_models.cohort import read_manifest

    ct_series_writer(tmp_path / "dicom" / "s1", "1.2.1", "1.2.1.1", "ACC1", slices=10)
    (tmp_path / "reports.csv").write_text("AccessionNumber,ReportText\nACC1,\"Heart enlarged. Small effusion.\"\n")
    FakeLLM.answers = ['{"Cardiomegaly": "present", "Pleural effusion": "present", "Lung nodule": "absent"}']
    cfg = load_site_config(site_yaml_writer(tmp_path, data={"labeler": {"kind": "llm", "endpoint": server, "model": "m"}}))
    report = run_ingest(cfg, progress=False)
    row = read_manifest(cfg.cache_dir)[0]
    assert row["labeler"] == "llm:m" and report["labeler"]["asked"] == 1
    assert row["findings"] == {"Cardiomegaly": True, "Pleural effusion": True, "Lung nodule": False}
    assert (tmp_path / "cache" / "llm_labels.jsonl").is_file()  # cached beside the site's data
