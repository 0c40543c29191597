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
