import os
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_DATA = HERE / "data" / "tiny_chat.jsonl"


@pytest.fixture
def tiny_data() -> Path:
    return TINY_DATA
