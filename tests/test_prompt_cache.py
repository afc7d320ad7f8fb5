"""Prompt data and the text-embedding cache behind the diffusers backbones, on tiny real pipelines.

A backbone with `backbone.prompt_cache` must give bit for bit the conditioning of one that encodes in memory
(the same prompts encoded in the same batch), encode only what the cache lacks (nothing at all after
`tdm cache-prompts`: its text encoders are never loaded), and never read embeddings of another text encoder.
"""

import json
import shutil
from contextlib import contextmanager

import pytest
import torch

pytest.importorskip("diffusers")

from safetensors import safe_open  # noqa: E402

from tdm.cli import main  # noqa: E402
from tdm.config import ConfigError  # noqa: E402
from tiny_diffusers import BUILDERS, PROMPTS, load_backbone  # noqa: E402


def prompts_file(folder, prompts=PROMPTS):
    path = folder / "prompts.txt"
    path.write_text("\n".join(prompts) + "\n", encoding="utf-8")
    return path


def build(family, pipeline, prompts, cache=None, **overrides):
    """The family's backbone through the registry, with `prompts` (a file) and, if given, the prompt cache."""
    return load_backbone(family, pipeline, prompts=str(prompts), prompt_cache=str(cache or ""), **overrides)


def conditions(backbone):
    """Every conditioning a run draws: training batches, the CFG null, evaluation and arbitrary cached prompts."""
    return {"sample": backbone.sample_conditions(5, torch.Generator().manual_seed(3)),
            "null": backbone.null_condition(2),
            "evaluation": backbone.evaluation_conditions(4, chunk=3),
            "prompts": backbone.encode_prompts(backbone.conditions.prompts[::-1])}


def assert_identical(a, b):
    torch.testing.assert_close(a, b, atol=0, rtol=0)  # values, dtypes, devices and keys


def encoded_together(memory, prompts):
    """`conditions` as `memory` (no cache) gives them when every prompt's text embedding is taken from one batch
    encoding `prompts`, as the cache encodes its misses. Encoding in other batches can differ in the last bits
    (BLAS kernels vary with the batch size), in memory as well; the cache itself adds nothing."""
    rows = memory.conditioner.encode(prompts)

    def text(chosen):
        return {key: value[[prompts.index(p) for p in chosen]] for key, value in rows.items()}

    drawn = torch.randint(len(memory.conditions.prompts), (5,), generator=torch.Generator().manual_seed(3)).tolist()
    null = memory.add_conditions(memory.null_text(text([memory.conditions.null_prompt])))
    return {"sample": memory.add_conditions(text([memory.conditions.prompts[i] for i in drawn])),
            "null": {key: value.expand(2, *value.shape[1:]) for key, value in null.items()},
            "evaluation": memory.add_conditions(text(memory.evaluation_prompts(4))),
            "prompts": memory.add_conditions(text(memory.conditions.prompts[::-1]))}


@contextmanager
def no_model_loads(monkeypatch):
    """Any transformers model load inside fails: what runs there loads no text encoder."""
    import transformers

    def refuse(cls, *args, **kwargs):
        raise AssertionError(f"loaded a {cls.__name__}")

    with monkeypatch.context() as patch:
        patch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(refuse))
        yield


def cache_files(folder):
    """{relative path: bytes} of everything in a cache root."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def shard_prompts(cache_dir):
    """The prompts of each shard of the one fingerprint folder under `cache_dir`, in shard order."""
    (folder,) = [p for p in cache_dir.iterdir() if p.is_dir()]
    out = []
    for shard in sorted(folder.glob("shard-*.safetensors")):
        with safe_open(shard, framework="pt") as f:
            out.append(json.loads(f.metadata()["prompts"]))
    return out


@pytest.mark.parametrize("family", list(BUILDERS))
def test_cached_conditioning_is_bit_identical_to_encoding_in_memory(family, tiny_dirs, tmp_path, monkeypatch):
    prompts, cache = prompts_file(tmp_path), tmp_path / "cache"
    memory = build(family, tiny_dirs[family], prompts)
    expected = encoded_together(memory, [*PROMPTS, ""])
    torch.testing.assert_close(conditions(memory), expected)  # batching noise only

    cold = build(family, tiny_dirs[family], prompts, cache)  # encodes the prompts and "" into the cache
    assert not cold.conditioner.loaded and cold.pipeline.text_encoder is None  # released after encoding
    written = cache_files(cache)
    assert_identical(conditions(cold), expected)

    with no_model_loads(monkeypatch):  # everything is cached: the text encoders are never loaded
        warm = build(family, tiny_dirs[family], prompts, cache)
        assert_identical(conditions(warm), expected)
        with pytest.raises(AssertionError, match="loaded a"):  # the check above could fail
            build(family, tiny_dirs[family], prompts)
    assert not warm.conditioner.loaded and cache_files(cache) == written

    cond = expected["sample"]
    if family == "sdxl":  # pooled embeddings cached; time_ids (H, W, 0, 0, H, W) computed
        assert cond["text_embeds"].shape == (5, 32) and cond["time_ids"][0].tolist() == [16, 16, 0, 0, 16, 16]
        assert not expected["null"]["prompt_embeds"].any()  # no negative prompt: zeros, as the pipeline
    if family == "pixart-alpha":  # the attention mask is cached as the tokenizer returns it
        assert cond["prompt_attention_mask"].dtype == torch.int64 and "resolution" in cond


def test_negative_prompt_is_cached_and_used(tiny_dirs, tmp_path):
    prompts, cache = prompts_file(tmp_path), tmp_path / "cache"
    memory = build("sdxl", tiny_dirs["sdxl"], prompts, negative_prompt="blurry")
    cached = build("sdxl", tiny_dirs["sdxl"], prompts, cache, negative_prompt="blurry")
    null = cached.null_condition(2)
    assert_identical(null, encoded_together(memory, [*PROMPTS, "blurry"])["null"])
    assert null["prompt_embeds"].any()  # a negative prompt is encoded, not zeroed
    assert_identical(null, cached.encode_prompts(["blurry", "blurry"]))
    assert shard_prompts(cache) == [[*PROMPTS, "blurry"]]


@pytest.mark.parametrize("family", ["sd15", "pixart-alpha"])
def test_cache_prompts_command_fills_the_cache_the_backbone_reads(family, tiny_dirs, tmp_path, capsys, monkeypatch):
    prompts, cache = prompts_file(tmp_path, [*PROMPTS, PROMPTS[0]]), tmp_path / "cache"
    args = ["cache-prompts", "--family", family, "--model", str(tiny_dirs[family]), "--prompts", str(prompts),
            "--out", str(cache)]
    assert main(args) == 0
    assert "(1 duplicates dropped)" in (out := capsys.readouterr().out) and "4 encoded, 0 already cached" in out
    written = cache_files(cache)

    with no_model_loads(monkeypatch):
        backbone = build(family, tiny_dirs[family], prompts, cache)
        produced = conditions(backbone)
    assert backbone.conditions.prompts == PROMPTS
    assert not backbone.conditioner.loaded and cache_files(cache) == written  # nothing encoded, nothing written
    assert_identical(produced, encoded_together(build(family, tiny_dirs[family], prompts), [*PROMPTS, ""]))

    assert main(args) == 0
    assert "0 encoded, 4 already cached" in capsys.readouterr().out

    not_a_pipeline = args[:4] + [str(tmp_path)] + args[5:]
    assert main(not_a_pipeline) == 2
    assert f"cannot read the text encoders of a {family} pipeline folder" in capsys.readouterr().err


def test_only_new_prompts_are_encoded(tiny_dirs, tmp_path):
    prompts, cache = prompts_file(tmp_path), tmp_path / "cache"
    build("sd15", tiny_dirs["sd15"], prompts, cache)
    before = cache_files(cache)
    assert shard_prompts(cache) == [[*PROMPTS, ""]]

    prompts_file(tmp_path, [*PROMPTS, "a green frog"])
    backbone = build("sd15", tiny_dirs["sd15"], prompts, cache)
    assert shard_prompts(cache) == [[*PROMPTS, ""], ["a green frog"]]  # only the miss was encoded
    after = cache_files(cache)
    assert [after[k] == v for k, v in before.items()] == [not k.endswith("index.json") for k in before]
    assert not backbone.conditioner.loaded
    memory = build("sd15", tiny_dirs["sd15"], prompts)
    assert_identical(backbone.encode_prompts(["a green frog"]), memory.encode_prompts(["a green frog"]))  # alone

    late = backbone.encode_prompts(["a late prompt"])  # a miss after release: encoders loaded again, released
    assert not backbone.conditioner.loaded and "a late prompt" in backbone.conditioner.cache
    assert_identical(late, memory.encode_prompts(["a late prompt"]))


def test_changed_text_encoder_is_a_miss_and_old_entries_stay(tiny_dirs, tmp_path):
    from transformers import CLIPTextModel

    pipeline = shutil.copytree(tiny_dirs["sd15"], tmp_path / "pipeline")
    prompts, cache = prompts_file(tmp_path), tmp_path / "cache"
    old = build("sd15", pipeline, prompts, cache)
    old_conditions, old_files = conditions(old), cache_files(cache)

    encoder = CLIPTextModel.from_pretrained(pipeline / "text_encoder")
    with torch.no_grad():
        encoder.get_input_embeddings().weight.mul_(1.5)  # a fine-tune: same shapes and config
    encoder.save_pretrained(pipeline / "text_encoder")

    new = build("sd15", pipeline, prompts, cache)
    folders = sorted(p.name for p in cache.iterdir() if p.is_dir())
    assert len(folders) == 2 and new.conditioner.cache.fingerprint != old.conditioner.cache.fingerprint
    assert {k: v for k, v in cache_files(cache).items() if k.split("/")[0] == old.conditioner.cache.fingerprint} == {
        k: v for k, v in old_files.items() if "/" in k}  # the old encoder's entries untouched
    assert len(new.conditioner.cache) == len(PROMPTS) + 1  # every prompt re-encoded with the new weights
    new_conditions = conditions(new)
    assert_identical(new_conditions, encoded_together(build("sd15", pipeline, prompts), [*PROMPTS, ""]))
    assert not torch.equal(new_conditions["sample"]["prompt_embeds"], old_conditions["sample"]["prompt_embeds"])

    float16 = build("sd15", pipeline, prompts, cache, dtype="float16")  # an encode setting is part of the key
    assert len({p.name for p in cache.iterdir() if p.is_dir()}) == 3
    assert float16.sample_conditions(2, torch.Generator())["prompt_embeds"].dtype == torch.float16


def test_prompt_sources_and_their_errors(tiny_dirs, tmp_path):
    table = tmp_path / "prompts.jsonl"
    table.write_text('{"id": 1, "caption": "a cat"}\n{"id": 2, "caption": " a  dog"}\n{"id": 3, "caption": "a cat"}\n')
    load = dict(teacher=str(tiny_dirs["sd15"]), height=16, width=16, prompts=str(table))
    from tdm.config import BackboneConfig
    from tdm.registry import build_backbone

    assert build_backbone(BackboneConfig(name="sd15", **load)).conditions.prompts == ["a cat", "a dog"]
    kept = build_backbone(BackboneConfig(name="sd15", keep_duplicate_prompts=True, **load))
    assert kept.conditions.prompts == ["a cat", "a dog", "a cat"]
    with pytest.raises(ConfigError, match=r"backbone.prompts: .*prompts.jsonl:1 has no column 'text'; available "
                                          r"columns: \['id', 'caption'\] .*backbone.prompt_column"):
        build_backbone(BackboneConfig(name="sd15", prompt_column="text", **load))

    with pytest.raises(ConfigError, match="backbone.prompt_cache: .* is a file"):
        build_backbone(BackboneConfig(name="sd15", prompt_cache=str(table), **load))
    cache = tmp_path / "cache"
    build_backbone(BackboneConfig(name="sd15", prompt_cache=str(cache), **load))
    (index,) = cache.glob("*/index.json")
    index.write_text("{not json")
    with pytest.raises(ConfigError, match="backbone.prompt_cache: .*index.json: unreadable embedding cache"):
        build_backbone(BackboneConfig(name="sd15", prompt_cache=str(cache), **load))
