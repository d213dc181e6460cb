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
