import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """Every diffusers family's tiny pipeline (tests/tiny_diffusers.py), saved once per session."""
    pytest.importorskip("diffusers")
    from tiny_diffusers import save_all

    return save_all(tmp_path_factory.mktemp("tiny"))
