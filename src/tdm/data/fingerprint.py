"""A text encoder's fingerprint: the key under which its prompt embeddings are cached.

It changes whenever the embeddings could: weights, config, tokenizer files, or an encode setting.
- A folder (or file) is hashed file by file: relative path + sha256 of the full content. Weight files are
  hashed in full too, since a fine-tune keeps every shape and header: about 1.5 GB/s here, so a 10 GB T5
  encoder costs seconds, once per process (memoised by path, size and mtime). Files in a Hugging Face hub
  cache are free: their blob's name already is the sha256 of the content.
- An in-memory module is hashed over its class, its config and every state-dict tensor's bytes (copied to the
  CPU): fine for small models; pass folders for big ones.
- A tokenizer object is saved to a temporary folder and hashed as one.
- Keyword settings (encoder kind, dtype, max length, ...) are part of the key.
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

FINGERPRINT_LENGTH = 20  # hex characters (80 bits)
_HUB_BLOB_NAME = re.compile(r"[0-9a-f]{64}")  # an LFS blob in the hub cache is named by its content's sha256


def model_fingerprint(*sources: str | Path | nn.Module | Any, **settings: Any) -> str:
    """Hex fingerprint of text-encoder folders/files, modules and tokenizers, plus JSON-able encode settings."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for source in sources:
        for part in _describe(source):
            digest.update(part)
    return digest.hexdigest()[:FINGERPRINT_LENGTH]


def _describe(source: Any) -> Iterator[bytes | memoryview]:
    if isinstance(source, str | Path):
        yield from _describe_path(Path(source))
    elif isinstance(source, nn.Module):
        yield from _describe_module(source)
    elif hasattr(source, "save_pretrained"):  # a tokenizer (or any other Hugging Face object saved as files)
        with tempfile.TemporaryDirectory() as tmp:
            source.save_pretrained(tmp)
            yield type(source).__name__.encode()
            yield from _describe_path(Path(tmp))
    else:
        raise TypeError(f"model_fingerprint: cannot fingerprint a {type(source).__name__} (expected a folder, a "
                        f"file, an nn.Module or a tokenizer)")


def _describe_path(path: Path) -> Iterator[bytes]:
    if path.is_file():
        yield f"file {path.name} {file_sha256(path)}\n".encode()
    elif path.is_dir():
        files = sorted(f for f in path.rglob("*") if f.is_file()
                       and not any(part.startswith(".") for part in f.relative_to(path).parts))
        for f in files:
            yield f"file {f.relative_to(path).as_posix()} {file_sha256(f)}\n".encode()
    else:
        raise FileNotFoundError(f"model_fingerprint: {path} does not exist")


def file_sha256(path: Path) -> str:
    """sha256 of a file's content; free for a hub-cache symlink, memoised by (path, size, mtime) otherwise."""
    target = path.resolve()
    if path.is_symlink() and _HUB_BLOB_NAME.fullmatch(target.name) and target.parent.name == "blobs":
        return target.name
    stat = target.stat()
    return _hash_file(target, stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=4096)
def _hash_file(path: Path, size: int, mtime_ns: int) -> str:  # size and mtime only key the memo
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _describe_module(module: nn.Module) -> Iterator[bytes | memoryview]:
    yield type(module).__name__.encode()
    config = getattr(module, "config", None)
    if config is not None:
        config = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        # drop bookkeeping that varies with where the model was loaded from or the library version
        config = {k: v for k, v in config.items() if not k.startswith("_") and k != "transformers_version"}
        yield json.dumps(config, sort_keys=True, default=str).encode()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous()
        yield f"{name} {tensor.dtype} {tuple(tensor.shape)}\n".encode()
        yield tensor.reshape(-1).view(torch.uint8).numpy().data  # the raw bytes, no copy
