"""Shared fixtures: the real models in ../shared/models and tiny hand-built graphs."""

import json
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
SHARED = os.environ.get("GRAPHQUANT_SHARED", os.path.join(os.path.dirname(ROOT), "shared"))
SHARED_MODELS = os.path.join(SHARED, "models")

import graphquant  # noqa: E402,F401  (sets the TensorFlow environment before TF loads)


@pytest.fixture
def shared_models_dir():
    if not os.path.isdir(SHARED_MODELS):
        pytest.skip(f"{SHARED_MODELS} not present")
    return SHARED_MODELS
