"""Shared fixtures: a tiny model (tiny preset with a 2-layer random BERT on the real MiniLM tokenizer)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))

TINY_TEXT = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128}


def tiny_config(**overrides):
    from shared_models import load_preset

    sections = {"text": {"random_init": TINY_TEXT}}
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(sections.get(key), dict):
            sections[key] = {**sections[key], **value}
        else:
            sections[key] = value
    return load_preset("tiny").replace(**sections)


@pytest.fixture(scope="session")
def make_tiny_config():
    """``make_tiny_config(**overrides)``: the tiny config with a tiny text encoder, plus overrides."""
    return tiny_config


@pytest.fixture(scope="session")
def tiny_cfg():
    return tiny_config()


@pytest.fixture
def tiny_model(tiny_cfg):
    from shared_models import build_model

    torch.manual_seed(0)
    return build_model(tiny_cfg)


HOSTILE_CLIENT = '''"""A hostile ClientApp, built by the tests: no mods; it reads the site's cache and tries to send a report."""
import json
import os
import pathlib
import re

import numpy as np
import yaml
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

MARKERS = pathlib.Path({markers!r})
MARKERS.mkdir(parents=True, exist_ok=True)
(MARKERS / f"imported-{{os.getpid()}}").write_text(__file__)  # proof that this module was imported, and where

app = ClientApp()


def a_report(context):
    site_yaml = pathlib.Path(context.node_config["site-config"])
    cache = (site_yaml.parent / yaml.safe_load(site_yaml.read_text())["cache_dir"]).resolve()
    for line in (cache / "manifest.jsonl").read_text().splitlines():
        if json.loads(line).get("report"):
            return json.loads(line)["report"]
    return "There is no report in this cache, which is itself a secret of the site."


@app.train()
def train(msg, context):
    sentence = max(re.split(r"[.\\n]", a_report(context)), key=len).strip()
    (MARKERS / f"ran-{{os.getpid()}}").write_text(sentence)
    arrays = dict(msg.content["arrays"].items())
    arrays["exfiltrated-report-bytes"] = Array(np.frombuffer(sentence.encode(), dtype=np.uint8).copy())
    return Message(RecordDict({{
        "arrays": ArrayRecord(array_dict=arrays),
        "metrics": MetricRecord({{"num-examples": 1, sentence: 1.0,
                                  "train-loss": [float(b) for b in sentence.encode()]}}),
        "exfiltrated-config": ConfigRecord({{"report": sentence}}),
        "exfiltrated-arrays": ArrayRecord(array_dict={{"report": Array(np.frombuffer(sentence.encode(), np.uint8).copy())}}),
    }}), reply_to=msg)
'''


def write_hostile_app(folder, markers, repo=None):
    """A Flower app folder whose ClientApp is hostile (no mods; it replies with a report sentence in a metric,
    an extra array and a config record) and writes ``markers/imported-PID`` when imported. With ``repo``, the
    ServerApp is this project's (a copy of its ``server`` and ``shared_models``), so it can be run."""
    import shutil
    from pathlib import Path

    import tomli_w
    import tomllib

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "hostile_client.py").write_text(HOSTILE_CLIENT.format(markers=str(markers)))
    config = {"project": {"name": "fedvlp-hostile", "version": "0.1.0"},
              "tool": {"flwr": {"app": {"publisher": "mallory", "components": {"serverapp": "server.app:app",
                                                                                "clientapp": "hostile_client:app"}}}}}
    if repo is not None:
        ours = tomllib.loads((Path(repo) / "pyproject.toml").read_text())
        config["tool"]["flwr"]["app"]["config"] = ours["tool"]["flwr"]["app"]["config"]
        config["tool"]["flwr"]["app"]["fab-include"] = ["hostile_client.py", "server/**", "shared_models/**"]
        for package in ("server", "shared_models"):
            shutil.copytree(Path(repo) / package, folder / package, ignore=shutil.ignore_patterns("__pycache__"))
    (folder / "pyproject.toml").write_text(tomli_w.dumps(config))
    return folder


@pytest.fixture(scope="session")
def hostile_app_writer():
    """``hostile_app_writer(folder, markers, repo=None)``: see :func:`write_hostile_app`."""
    return write_hostile_app
