"""Text embeddings cached on disk, so that training reads them by index and text encoders stay off the GPU.

TDM needs only the prompts' embeddings, c for every training prompt and c_null for the negative prompt
(method.md E, Algorithm line 1), so they are computed once. Layout of a cache root:

    root/<fingerprint>/index.json                 format, fingerprint, per-key dtype and per-prompt shape, shards
    root/<fingerprint>/shard-00000.safetensors    each key stacked [rows, ...]; the prompts (JSON, row order)
                                                  in the safetensors metadata

- One folder per text-encoder fingerprint (`model_fingerprint`): embeddings of another encoder, or of other
  encode settings, are never read; index.json repeats the fingerprint and is checked.
- A shard is written under a temporary name and renamed into place, then index.json likewise. A crash leaves
  at worst a complete shard that index.json does not list (ignored, overwritten by the next write), never a
  half-written shard that is read. Only listed shards of the recorded size are read.
- Values are stored as the encoder returned them (dtype included), so reading back is bit-exact.
- Writers take turns: `encode_missing` holds an exclusive lock (root/.<fingerprint>.lock, fcntl) and re-reads
  index.json under it, so processes that start training together encode each missing prompt once. Any number
  of readers.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from ..errors import TDMError
from ..files import atomic_write, write_text_atomic

INDEX = "index.json"
FORMAT = 1
EncodeFn = Callable[[list[str]], dict[str, Tensor]]  # prompts -> tensors batched along dim 0


class EmbeddingCacheError(TDMError, ValueError):
    """An unreadable or mismatched cache, or an encode function whose output cannot be cached."""


class PromptEmbeddings:
    """The cached embeddings of a prompt list, read from the shards by index (CPU tensors, bit-exact).

    A training backbone draws `sample(batch, generator)` for its conditions and `null(batch)` for classifier-free
    guidance; nothing here needs the text encoder."""

    def __init__(self, folder: Path, files: list[str], spec: dict, prompts: list[str],
                 locations: list[tuple[int, int]], null_location: tuple[int, int] | None):
        self.prompts = prompts
        self._folder, self._files, self._spec = folder, files, spec
        self._locations = locations
        self._null = self._read([null_location]) if null_location is not None else None

    def __len__(self) -> int:
        return len(self.prompts)

    def batch(self, indices: Iterable[int]) -> dict[str, Tensor]:
        """Embeddings of prompts[i] for i in `indices`, each key stacked [len(indices), ...]."""
        return self._read([self._locations[int(i)] for i in indices])

    def sample(self, batch: int, generator: torch.Generator) -> dict[str, Tensor]:
        """A batch of uniformly drawn prompts (with replacement), drawn with `generator`."""
        return self.batch(torch.randint(len(self), (batch,), generator=generator, device=generator.device).tolist())

    def null(self, batch: int) -> dict[str, Tensor]:
        """The negative prompt's embeddings, expanded (not copied) to `batch` rows."""
        if self._null is None:
            raise EmbeddingCacheError("these embeddings were loaded without a negative prompt "
                                      "(EmbeddingCache.embeddings(prompts, negative_prompt=...))")
        return {key: value.expand(batch, *value.shape[1:]) for key, value in self._null.items()}

    def _read(self, locations: list[tuple[int, int]]) -> dict[str, Tensor]:
        out = {key: torch.empty((len(locations), *spec["shape"]), dtype=getattr(torch, spec["dtype"]))
               for key, spec in self._spec.items()}
        rows_by_shard = defaultdict(list)
        for position, (shard, row) in enumerate(locations):
            rows_by_shard[shard].append((position, row))
        for shard, rows in rows_by_shard.items():
            with safe_open(self._folder / self._files[shard], framework="pt") as f:  # reads only these rows
                for key, tensor in out.items():
                    stored = f.get_slice(key)
                    for position, row in rows:
                        tensor[position] = stored[row:row + 1][0]
        return out


class EmbeddingCache:
    """The embeddings of one text encoder (one fingerprint) under `root`; see the module docstring."""

    def __init__(self, root: str | Path, fingerprint: str):
        if not re.fullmatch(r"[A-Za-z0-9_-]+", fingerprint):
            raise EmbeddingCacheError(f"fingerprint must be a non-empty [A-Za-z0-9_-] name, got {fingerprint!r}")
        self.fingerprint = fingerprint
        self.folder = Path(root) / fingerprint
        self._reload()

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, prompt: str) -> bool:
        return prompt in self._where

    def missing(self, prompts: Iterable[str]) -> list[str]:
        """The distinct prompts not in the cache, in first-seen order."""
        return [p for p in dict.fromkeys(prompts) if p not in self._where]

    def encode_missing(self, prompts: Iterable[str], encode_fn: EncodeFn, *, batch_size: int = 64,
                       shard_rows: int = 256) -> int:
        """Encode only the prompts not yet cached, `batch_size` per call, and store them in shards of at most
        `shard_rows` prompts, each committed as soon as it is complete. Returns how many prompts were encoded."""
        if batch_size < 1 or shard_rows < 1:
            raise EmbeddingCacheError(f"batch_size and shard_rows must be >= 1, got {batch_size}, {shard_rows}")
        prompts = list(prompts)
        if not self.missing(prompts):
            return 0
        with self._writer_lock():
            self._reload()  # another process may have cached some of them meanwhile
            todo = self.missing(prompts)
            for start in range(0, len(todo), shard_rows):
                chunk = todo[start:start + shard_rows]
                parts = [self._checked(encode_fn(chunk[i:i + batch_size]), len(chunk[i:i + batch_size]))
                         for i in range(0, len(chunk), batch_size)]
                self._write_shard(chunk, {key: torch.cat([part[key] for part in parts]) for key in self._spec})
        return len(todo)

    def embeddings(self, prompts: list[str], negative_prompt: str | None = None) -> PromptEmbeddings:
        """Lazy embeddings of `prompts` (and of `negative_prompt` for `null`); all must be cached already."""
        wanted = [*prompts, *([] if negative_prompt is None else [negative_prompt])]
        missing = self.missing(wanted)
        if missing:
            raise EmbeddingCacheError(
                f"{len(missing)} of {len(set(wanted))} prompts are not in the embedding cache {self.folder} "
                f"(first: {missing[0]!r}); encode them first (tdm cache-prompts, or EmbeddingCache.encode_missing)")
        return PromptEmbeddings(self.folder, [s["file"] for s in self._shards], self._spec, list(prompts),
                                [self._where[p] for p in prompts],
                                None if negative_prompt is None else self._where[negative_prompt])

    def get_or_encode(self, prompts: list[str], encode_fn: EncodeFn, *, batch_size: int = 64) -> dict[str, Tensor]:
        """Every prompt's embeddings stacked [len(prompts), ...] in order; only cache misses are encoded."""
        self.encode_missing(prompts, encode_fn, batch_size=batch_size)
        return self.embeddings(prompts).batch(range(len(prompts)))

    def _checked(self, output: dict[str, Tensor], rows: int) -> dict[str, Tensor]:
        """One encode_fn batch as CPU tensors, after checking it has the keys, dtypes and shapes of all others."""
        if not isinstance(output, dict) or not output or not all(isinstance(v, Tensor) for v in output.values()):
            raise EmbeddingCacheError(f"encode_fn must return a non-empty dict of tensors, got {type(output).__name__}")
        unbatched = sorted(k for k, v in output.items() if v.ndim == 0 or v.shape[0] != rows)
        if unbatched:
            raise EmbeddingCacheError(f"encode_fn: {unbatched} are not batched along dim 0 ({rows} prompts given)")
        spec = {k: {"dtype": str(v.dtype).removeprefix("torch."), "shape": list(v.shape[1:])}
                for k, v in sorted(output.items())}
        if self._spec and spec != self._spec:
            raise EmbeddingCacheError(f"encode_fn returned {spec}, but {self.folder} holds {self._spec}: every batch "
                                      f"must give the same keys, dtypes and per-prompt shapes (pad to a fixed length)")
        self._spec = spec
        return {k: v.detach().to("cpu") for k, v in output.items()}

    def _write_shard(self, prompts: list[str], tensors: dict[str, Tensor]) -> None:
        entry = {"file": f"shard-{len(self._shards):05d}.safetensors", "rows": len(prompts)}
        path = self.folder / entry["file"]
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"prompts": json.dumps(prompts)}))
        entry["bytes"] = path.stat().st_size
        index = {"format": FORMAT, "fingerprint": self.fingerprint, "keys": self._spec,
                 "shards": [*self._shards, entry]}
        write_text_atomic(self.folder / INDEX, json.dumps(index, indent=1))  # commits the shard
        self._add_shard(entry, prompts)

    def _add_shard(self, entry: dict, prompts: list[str]) -> None:
        number = len(self._shards)
        self._shards.append(entry)
        self._where.update((prompt, (number, row)) for row, prompt in enumerate(prompts))

    @contextmanager
    def _writer_lock(self) -> Iterator[None]:
        """Exclusive across processes (where fcntl exists: Linux, macOS), held while shards are written."""
        try:
            import fcntl
        except ImportError:
            yield
            return
        path = self.folder.with_name(f".{self.folder.name}.lock")
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _reload(self) -> None:
        self._shards: list[dict] = []  # {"file", "rows", "bytes"} in index order
        self._spec: dict[str, dict] = {}  # key -> {"dtype": "float16", "shape": [77, 768]} (one prompt's)
        self._where: dict[str, tuple[int, int]] = {}  # prompt -> (shard number, row)
        if (self.folder / INDEX).is_file():
            self._load_index()

    def _load_index(self) -> None:
        path = self.folder / INDEX
        rebuild = f"delete {self.folder} to rebuild the cache"
        try:
            index = json.loads(path.read_text())
            if index["format"] != FORMAT or index["fingerprint"] != self.fingerprint:
                raise EmbeddingCacheError(f"{path}: format {index['format']} for fingerprint {index['fingerprint']!r}"
                                          f", expected format {FORMAT} for {self.fingerprint!r}; {rebuild}")
            self._spec = index["keys"]
            unknown = [spec["dtype"] for spec in self._spec.values()
                       if not isinstance(getattr(torch, spec["dtype"], None), torch.dtype)]
            if unknown:
                raise EmbeddingCacheError(f"{path}: unknown dtypes {unknown}; {rebuild}")
            for entry in index["shards"]:
                shard = self.folder / entry["file"]
                if not shard.is_file() or shard.stat().st_size != entry["bytes"]:
                    raise EmbeddingCacheError(f"{shard}: missing, or not the {entry['bytes']} bytes {path} "
                                              f"records; {rebuild}")
                with safe_open(shard, framework="pt") as f:
                    prompts = json.loads(f.metadata()["prompts"])
                if len(prompts) != entry["rows"]:
                    raise EmbeddingCacheError(f"{shard}: {len(prompts)} prompts, {path} records {entry['rows']}; "
                                              f"{rebuild}")
                self._add_shard(entry, prompts)
        except (OSError, ValueError, KeyError, TypeError, SafetensorError) as err:
            if isinstance(err, EmbeddingCacheError):
                raise
            raise EmbeddingCacheError(f"{path}: unreadable embedding cache ({type(err).__name__}: {err}); "
                                      f"{rebuild}") from None


def cache_prompts(prompts: list[str], load_encoder: Callable[[], EncodeFn], fingerprint: str, out_dir: str | Path, *,
                  negative_prompt: str = "", batch_size: int = 64) -> int:
    """Cache the embeddings of `prompts` and of the negative prompt under `out_dir`/`fingerprint`. The encoder is
    loaded (`load_encoder()`) only if some are missing. Returns how many were encoded (0: all were cached)."""
    cache = EmbeddingCache(out_dir, fingerprint)
    wanted = [*prompts, negative_prompt]
    if not cache.missing(wanted):
        return 0
    return cache.encode_missing(wanted, load_encoder(), batch_size=batch_size)
