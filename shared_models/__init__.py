"""Everything sites and the server must agree on: the model, its objectives, text and volume processing.

This package imports neither flwr nor ``client`` nor ``server``.
"""

from __future__ import annotations

from .config import OBJECTIVES, ModelConfig, available_presets, load_config_file, load_model_config, load_preset
from .model import FoundationModel, build_model
from .objectives import BATCH_COUPLED, osl_inputs, training_losses
from .reports import extract_findings
from .state import arrays_digest, arrays_to_state_dict, frozen_keys, load_arrays, model_to_arrays, unwrap_model
from .volumes import preprocess_volume

__all__ = [
    "OBJECTIVES", "BATCH_COUPLED", "ModelConfig", "FoundationModel", "available_presets", "build_model",
    "load_config_file", "load_model_config", "load_preset", "training_losses", "osl_inputs", "extract_findings",
    "preprocess_volume", "model_to_arrays", "frozen_keys", "arrays_digest", "arrays_to_state_dict", "load_arrays", "unwrap_model",
]
