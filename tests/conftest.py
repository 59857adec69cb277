"""Shared fixtures: a tiny random Llama-style model with a byte-level BPE tokenizer
(built by `spacy_cllmfs.testing.build_tiny_model`).

The tokenizer is trained in the test session on a few sentences, so unit tests
run in seconds on a CPU and need no download. Integration tests (marked
`integration`) use the embedded SmolLM2 model instead.
"""
from pathlib import Path
from typing import Dict

import pytest
import spacy
import torch

from spacy_cllmfs.testing import build_tiny_model

__all__ = ["build_tiny_model", "randomize_adapter"]


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_model_config(tiny_model_path: Path) -> Dict:
    return {
        "@misc": "spacy_cllmfs.HFCausalLM.v1",
        "name": str(tiny_model_path),
        "device": "cpu",
        "lora": {"@misc": "spacy_cllmfs.LoRA.v1", "r": 4, "alpha": 8, "dropout": 0.0},
    }


@pytest.fixture
def tiny_nlp(tiny_model_config: Dict) -> spacy.Language:
    nlp = spacy.blank("en")
    nlp.add_pipe(
        "cllmfs_ner",
        config={"model": tiny_model_config, "labels": ["person", "location"], "max_new_tokens": 24},
    )
    return nlp


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module: on a busy shared CPU, two threads make the tiny
    model much slower (use with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def randomize_adapter(component, seed: int = 0, scale: float = 0.5) -> None:
    """Attach a LoRA adapter with non-zero random weights, so that it changes outputs."""
    component.model.ensure_lora()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in component.model.trainable_parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * scale)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "integration: uses the embedded SmolLM2 model (slower)")
