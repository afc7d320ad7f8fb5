"""CLIP score (Hessel et al. 2021, as torchmetrics computes it) and PickScore with a transformers CLIP model.

The model and its tokenizer load from a hub id or a local folder (`save_pretrained` layout). Images are
preprocessed in torch, as CLIP's own transform does (bicubic resize of the short side, centre crop, OpenAI
mean/std), so neither torchvision nor an image-processor file is needed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import MissingModel
from ..optional import require

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP (also used by the LAION / open_clip models)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_pixels(images: Tensor, size: int) -> Tensor:
    """[N, C, H, W] in [0, 1] -> CLIP input [N, 3, size, size]: short side to `size` (bicubic, antialiased),
    centre crop, normalised with the CLIP mean and std; grey images are repeated to 3 channels."""
    x = images.float().clamp(0, 1)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    x = F.interpolate(x, size=(max(size, round(h * scale)), max(size, round(w * scale))), mode="bicubic",
                      antialias=True, align_corners=False)
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    x = x[..., top:top + size, left:left + size].clamp(0, 1)
    mean, std = (torch.tensor(v, device=x.device).view(1, 3, 1, 1) for v in (CLIP_MEAN, CLIP_STD))
    return (x - mean) / std


class CLIPScorer:
    """A transformers `CLIPModel` and its tokenizer; `tokenizer` defaults to the model's own folder or id."""

    def __init__(self, model: str, device="cpu", tokenizer: str | None = None, batch_size: int = 64):
        transformers = require("transformers", "the CLIP score")
        try:
            self.model = transformers.CLIPModel.from_pretrained(model).eval().to(device)
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer or model)
        except (OSError, ValueError) as err:
            first = str(err).strip().splitlines()[0]
            raise MissingModel(f"cannot load a CLIP model and tokenizer from {model!r}: {first}") from None
        self.name, self.device, self.batch_size = model, device, batch_size
        self.max_length = min(self.tokenizer.model_max_length, self.model.config.text_config.max_position_embeddings)

    @torch.no_grad()
    def cosine(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """cos(image embedding, text embedding) per (image, prompt) pair -> [N] (CPU)."""
        if len(images) != len(prompts):
            raise ValueError(f"got {len(images)} images and {len(prompts)} prompts")
        size = self.model.config.vision_config.image_size
        out = []
        for i in range(0, len(images), self.batch_size):
            text = self.tokenizer(list(prompts[i:i + self.batch_size]), padding="max_length", truncation=True,
                                  max_length=self.max_length, return_tensors="pt").to(self.device)
            pixels = clip_pixels(images[i:i + self.batch_size].to(self.device), size)
            result = self.model(input_ids=text.input_ids, attention_mask=text.attention_mask, pixel_values=pixels)
            out.append((result.image_embeds * result.text_embeds).sum(-1).float().cpu())  # both unit-norm
        return torch.cat(out)

    def clip_score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """100 * max(cos, 0) per pair; the CLIP score of a set is its mean."""
        return 100 * self.cosine(images, prompts).clamp(min=0)

    def pickscore(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """PickScore (Kirstain et al. 2023): the model's logit scale times cos, per pair."""
        return self.model.logit_scale.exp().item() * self.cosine(images, prompts)
