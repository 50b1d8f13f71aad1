"""Every test runs offline on the CPU, importing the project's files from the repo root."""
import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))

_BACKBONES = {}


@pytest.fixture(scope="session")
def backbones():
    """load(name) -> a cached tiny backbone (tiny, tiny-clip); built once per session.
    Tests must not modify it (they check that the backbone is left unchanged)."""
    from common import load_backbone

    def load(name):
        if name not in _BACKBONES:
            _BACKBONES[name] = load_backbone(name, "cpu")
        return _BACKBONES[name]
    return load
