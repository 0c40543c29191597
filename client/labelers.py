"""Findings labels for a site's reports: the shared rule labeler, or an LLM served inside the hospital.

The LLM labeler ("More performant and scalable" extracts silver labels with an LLM) talks to an
OpenAI-compatible chat-completions endpoint that the site YAML names. Reports never leave the
site: the endpoint must be a model the hospital runs itself. Answers are cached on disk (keyed by
model, vocabulary and report text), and any failure falls back to the rule labeler for that report.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import urllib.error
import urllib.request
from pathlib import Path

from shared_models.reports import extract_findings, get_vocabulary

log = logging.getLogger(__name__)

SYSTEM_PROMPT = (
    "You label radiology reports. For each finding in the list, answer 'present' if the report states or "
    "suspects it, 'absent' if the report states it is not there, and 'not mentioned' otherwise. Reply with "
    "one JSON object mapping every finding name exactly as given to one of those three answers, and nothing else."
)


class RuleLabeler:
    """The shared negation-aware rule labeler (``shared_models.extract_findings``)."""

    name = "rules"

    def __init__(self, vocabulary: str | list[str] | None = None) -> None:
        self.vocabulary = get_vocabulary(vocabulary)

    def label(self, text: str) -> dict[str, bool]:
        return extract_findings(text, self.vocabulary)


class LLMLabeler:
    """Labels from an OpenAI-compatible ``/chat/completions`` endpoint, cached, with the rules as fallback.

    Args:
        endpoint: base URL such as ``http://llm.internal:8000/v1``.
        model: the served model's name.
        vocabulary: findings to ask about.
        cache_path: a JSONL file of earlier answers.
        api_key_env: name of an environment variable holding a bearer token, if the endpoint needs one.
        timeout_s: per request.
    """

    def __init__(self, endpoint: str, model: str, vocabulary=None, cache_path: str | Path | None = None,
                 api_key_env: str | None = None, timeout_s: float = 30.0) -> None:
        self.url = endpoint.rstrip("/") + "/chat/completions"
        self.model = model
        self.name = f"llm:{model}"
        self.vocabulary = get_vocabulary(vocabulary)
        self.fallback = RuleLabeler(self.vocabulary)
        self.timeout_s = timeout_s
        self.api_key = os.environ.get(api_key_env, "") if api_key_env else ""
        self.cache_path = Path(cache_path) if cache_path else None
        self.cache: dict[str, dict[str, bool]] = self._read_cache()
        self.stats = {"cached": 0, "asked": 0, "fallback": 0}

    def _key(self, text: str) -> str:
        payload = json.dumps([self.model, self.vocabulary, text], ensure_ascii=False)
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()

    def _read_cache(self) -> dict[str, dict[str, bool]]:
        cache: dict[str, dict[str, bool]] = {}
        if self.cache_path and self.cache_path.is_file():
            for line in self.cache_path.read_text(encoding="utf-8").splitlines():
                try:
                    entry = json.loads(line)
                    cache[entry["key"]] = {k: bool(v) for k, v in entry["findings"].items()}
                except (ValueError, KeyError, TypeError, AttributeError):
                    continue  # a torn last line after a crash: that report is asked again
        return cache

    def label(self, text: str) -> dict[str, bool]:
        key = self._key(text)
        if key in self.cache:
            self.stats["cached"] += 1
            return self.cache[key]
        try:
            findings = self._ask(text)
        except (OSError, ValueError, KeyError, TypeError, urllib.error.URLError) as err:
            self.stats["fallback"] += 1
            log.warning("LLM labeler failed (%s); using the rule labeler for this report", type(err).__name__)
            return self.fallback.label(text)
        self.stats["asked"] += 1
        self.cache[key] = findings
        if self.cache_path:
            self.cache_path.parent.mkdir(parents=True, exist_ok=True)
            with self.cache_path.open("a", encoding="utf-8") as f:
                f.write(json.dumps({"key": key, "findings": findings}) + "\n")
        return findings

    def _ask(self, text: str) -> dict[str, bool]:
        body = {
            "model": self.model,
            "temperature": 0,
            "messages": [
                {"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": "Findings: " + json.dumps(self.vocabulary) + "\n\nReport:\n" + text},
            ],
        }
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, data=json.dumps(body).encode("utf-8"), headers=headers)
        with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
            reply = json.loads(response.read().decode("utf-8"))
        content = reply["choices"][0]["message"]["content"].strip()
        if content.startswith("```"):  # models often fence JSON
            content = content.strip("`").removeprefix("json").strip()
        answers = json.loads(content)
        if not isinstance(answers, dict):
            raise ValueError("the model did not answer with a JSON object")
        findings: dict[str, bool] = {}
        for name in self.vocabulary:
            answer = str(answers.get(name, "not mentioned")).strip().lower()
            if answer == "present":
                findings[name] = True
            elif answer == "absent":
                findings[name] = False
            elif answer != "not mentioned":
                raise ValueError(f"unexpected answer {answer!r} for {name!r}")
        return findings


def build_labeler(site_cfg, vocabulary) -> RuleLabeler | LLMLabeler:
    """The labeler a site config asks for (``data.labeler``)."""
    lab = site_cfg.data.labeler
    if lab.kind == "llm":
        return LLMLabeler(lab.endpoint, lab.model, vocabulary, Path(site_cfg.cache_dir) / "llm_labels.jsonl",
                          lab.api_key_env, lab.timeout_s)
    return RuleLabeler(vocabulary)
