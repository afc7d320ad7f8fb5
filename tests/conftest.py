import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """Every diffusers family's tiny pipeline (tests/tiny_diffusers.py), saved once per session."""
    pytest.importorskip("diffusers")
    from tiny_diffusers import save_all

    return save_all(tmp_path_factory.mktemp("tiny"))


class LocalInception(nn.Module):
    """A small network with the call interface of NVIDIA's `inception-2015-12-05.pt`: 3-channel images with
    values 0..255 at any size, resized inside; `return_features=True` gives the pool features, else logits."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, img: Tensor, return_features: bool = False) -> Tensor:
        assert img.shape[1] == 3
        x = F.interpolate(img.to(torch.float32), size=(16, 16), mode="bilinear", align_corners=False)
        features = self.conv(x * (2 / 255) - 1).relu().mean((2, 3))
        return features if return_features else self.fc(features)


@pytest.fixture
def inception_file(tmp_path):
    torch.manual_seed(0)
    from tdm.evaluate.features import INCEPTION_FILE

    path = tmp_path / INCEPTION_FILE
    with warnings.catch_warnings():  # TorchScript is deprecated in torch 2.13; the real FID network is one
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(LocalInception().eval()).save(str(path))
    return path


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A tiny CLIPModel built from config and saved with its tokenizer, loaded back as a user would."""
    from transformers import CLIPConfig, CLIPModel

    folder = tmp_path_factory.mktemp("tiny-clip")
    from tiny_diffusers import clip_tokenizer

    tok = clip_tokenizer(max_length=32)
    torch.manual_seed(0)
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=tok.model_max_length, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    vision = dict(image_size=24, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                  num_attention_heads=4)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
