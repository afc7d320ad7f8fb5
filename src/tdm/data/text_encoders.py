"""Text encoders `tdm cache-prompts` can run, by name: each gives a cheap fingerprint and a loaded encode function.

"clip" is a CLIP text model with its tokenizer, as SD 1.x encodes prompts (padded to the tokenizer's max length,
last hidden state). The diffusers teacher families add their own entries, built on their pipelines' prompt
encoding (`tdm.registry.PROMPT_ENCODERS`). transformers and huggingface_hub are imported lazily.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import TDMError
from .cache import EncodeFn
from .fingerprint import model_fingerprint


class TextEncoderError(TDMError, ValueError):
    """A text-encoder model that cannot be found or loaded."""


@dataclass(frozen=True)
class TextEncoderFamily:
    """How to fingerprint and load one kind of text encoder from a local folder."""

    fetch: Callable[[str], Path]  # hub id -> local folder holding the encoder's files (downloaded or cached)
    fingerprint: Callable[[Path, torch.dtype], str]  # reads files only, loads no weights
    load: Callable[[Path, str, torch.dtype], EncodeFn]  # (folder, device, dtype) -> encode_fn


def resolve_model(model: str, family: TextEncoderFamily) -> Path:
    """A local folder as is; otherwise a hub id fetched (or found in the hub cache) by `family.fetch`."""
    path = Path(model)
    if path.is_dir():
        return path
    if path.exists():
        raise TextEncoderError(f"--model {model}: expected a folder or a hub id, got a file")
    try:
        return family.fetch(model)
    except Exception as err:  # offline, unknown repo, bad id: all mean "not found" to the user
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TextEncoderError(f"--model {model}: not a local folder, and not available from the hub: "
                               f"{first}") from None


def _clip_folders(root: Path) -> tuple[Path, Path]:
    """(model folder, tokenizer folder): a pipeline's text_encoder/ and tokenizer/, or one folder with both."""
    if (root / "text_encoder").is_dir():
        return root / "text_encoder", root / "tokenizer"
    return root, root


def _clip_fetch(model: str) -> Path:
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(model, allow_patterns=[  # only the encoder's files
        "config.json", "model.safetensors", "text_encoder/config.json", "text_encoder/model.safetensors",
        "tokenizer*", "vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer/*"]))


def _clip_fingerprint(root: Path, dtype: torch.dtype) -> str:
    return model_fingerprint(*dict.fromkeys(_clip_folders(root)), encoder="clip", dtype=str(dtype))


def _clip_load(root: Path, device: str, dtype: torch.dtype) -> EncodeFn:
    from transformers import CLIPTextModel, CLIPTokenizer

    model_dir, tokenizer_dir = _clip_folders(root)
    try:
        tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
        encoder = CLIPTextModel.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    except (OSError, ValueError) as err:
        raise TextEncoderError(f"--model {root}: cannot load a CLIP text encoder and tokenizer: "
                               f"{str(err).strip().splitlines()[0]}") from None

    @torch.no_grad()
    def encode(prompts: list[str]) -> dict[str, torch.Tensor]:
        tokens = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                           return_tensors="pt")
        out = encoder(tokens.input_ids.to(device))
        return {"prompt_embeds": out.last_hidden_state,  # [B, L, D]
                "pooled_prompt_embeds": out.pooler_output,  # [B, D]
                "attention_mask": tokens.attention_mask}  # [B, L]

    return encode


TEXT_ENCODERS: dict[str, TextEncoderFamily] = {
    "clip": TextEncoderFamily(fetch=_clip_fetch, fingerprint=_clip_fingerprint, load=_clip_load),
}
