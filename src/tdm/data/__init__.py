"""Prompts (the only training data of data-free TDM) and the on-disk cache of their text embeddings.

    prompts = load_prompts("prompts.jsonl")                        # txt / jsonl / csv / parquet / dataset folder
    fingerprint = model_fingerprint(text_encoder_dir, tokenizer_dir, encoder="clip", dtype="torch.float32")
    cache_prompts(prompts, encode_fn, fingerprint, "cache/", negative_prompt="")      # once, or `tdm cache-prompts`
    emb = EmbeddingCache("cache/", fingerprint).embeddings(prompts, negative_prompt="")  # at training: no encoder
    cond, uncond = emb.sample(batch, generator), emb.null(batch)

A diffusers teacher's text embeddings go through the same cache: `conditioning.PromptConditioner` encodes with the
family's pipeline (`TextEncoding`), encoding only cache misses and releasing the text encoders after;
`prompt_conditions.PromptConditions` draws from them the training, null and evaluation conditions of a teacher.
"""

from .cache import EmbeddingCache, EmbeddingCacheError, EncodeFn, PromptEmbeddings, cache_prompts
from .fingerprint import model_fingerprint
from .prompts import PromptSourceError, drop_duplicates, load_prompts, normalize_prompt, read_prompts

__all__ = ["EmbeddingCache", "EmbeddingCacheError", "EncodeFn", "PromptEmbeddings", "PromptSourceError",
           "cache_prompts", "drop_duplicates", "load_prompts", "model_fingerprint", "normalize_prompt",
           "read_prompts"]
