"""Prompt sources and the text-embedding cache, with a real tiny CLIP text encoder built offline."""

import json
import shutil
import sys

import pytest
import torch

from tdm.cli import main
from tdm.data import (
    EmbeddingCache,
    EmbeddingCacheError,
    PromptSourceError,
    cache_prompts,
    drop_duplicates,
    load_prompts,
    model_fingerprint,
    read_prompts,
)
from tdm.data.text_encoders import TEXT_ENCODERS
from tiny_diffusers import clip_text_encoder, clip_tokenizer

PROMPTS = ["a cat", "a red car", "two dogs on a beach", "a bowl of fruit", "snowy mountains"]


# ---- a real tiny CLIP text encoder + tokenizer (tests/tiny_diffusers.py), saved like a hub folder ----

def _save_clip(folder, seed=0, max_length=16):
    tokenizer = clip_tokenizer(max_length)
    clip_text_encoder(tokenizer, seed).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return _save_clip(tmp_path_factory.mktemp("clip"))


class Counting:
    """The registry's real CLIP encode function, recording every batch it is given."""

    def __init__(self, folder, fail_after=None):
        self.encode = TEXT_ENCODERS["clip"].load(folder, "cpu", torch.float32)
        self.batches, self.fail_after = [], fail_after

    def __call__(self, prompts):
        if self.fail_after is not None and len(self.batches) == self.fail_after:
            raise RuntimeError("encoder crashed")
        self.batches.append(list(prompts))
        return self.encode(prompts)


def _assert_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


# ---- prompt sources ----

def test_txt_blank_lines_whitespace_duplicates(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("  a   cat \n\n\t\r\na cat\r\nA dog\ncafe\u0301\ncaf\u00e9\n   \n")
    assert read_prompts(path) == ["a cat", "a cat", "A dog", "caf\u00e9", "caf\u00e9"]
    assert drop_duplicates(read_prompts(path)) == (["a cat", "A dog", "caf\u00e9"], 2)
    assert load_prompts(path) == ["a cat", "A dog", "caf\u00e9"]  # first occurrence kept, order kept
    assert load_prompts(path, keep_duplicates=True) == read_prompts(path)


def test_jsonl_and_csv_columns(tmp_path):
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"id": 1, "prompt": "a cat", "caption": "x"}\n\n{"id": 2, "prompt": " a\\n dog ", '
                     '"caption": "y"}\n{"id": 3, "prompt": null, "caption": "z"}\n')
    assert load_prompts(jsonl) == ["a cat", "a dog"]  # "prompt" before "caption"; null is blank
    assert load_prompts(jsonl, column="caption") == ["x", "y", "z"]
    csv = tmp_path / "p.csv"
    csv.write_bytes('\ufeffid,caption\n1,"a cat,\nsitting"\n2,\n3,a dog\n3,a dog\n'.encode())  # BOM, quoted newline
    assert load_prompts(csv) == ["a cat, sitting", "a dog"]
    assert load_prompts(csv, column="id") == ["1", "2", "3"]


def test_missing_column_lists_available_columns(tmp_path):
    (tmp_path / "p.csv").write_text("id,caption\n1,a cat\n")
    with pytest.raises(PromptSourceError, match=r"p\.csv has no column 'text'; available columns: \['id', 'caption'\]"):
        load_prompts(tmp_path / "p.csv", column="text")
    (tmp_path / "q.jsonl").write_text('{"id": 1, "title": "a cat"}\n')
    with pytest.raises(PromptSourceError, match=r"q\.jsonl:1 has none of the default prompt columns.*'title'\]"):
        load_prompts(tmp_path / "q.jsonl")


@pytest.mark.parametrize("text, message", [
    ('{"prompt": "a"}\n{"text": "b"}\n', r"bad\.jsonl:2 has no column 'prompt'; available columns: \['text'\]"),
    ('{"prompt": "a"}\n["b"]\n', r"bad\.jsonl:2: expected one JSON object per line, got list"),
    ('{"prompt": "a"}\n{"prompt": \n', r"bad\.jsonl:2: not valid JSON"),
    ('{"prompt": 3}\n', r"bad\.jsonl:1: expected a string prompt, got int 3"),
])
def test_bad_jsonl_names_the_line(tmp_path, text, message):
    (tmp_path / "bad.jsonl").write_text(text)
    with pytest.raises(PromptSourceError, match=message):
        load_prompts(tmp_path / "bad.jsonl")


@pytest.mark.parametrize("name, content", [("e.txt", ""), ("e.txt", "\n  \n\t\n"), ("e.csv", "prompt\n"),
                                           ("e.csv", ""), ("e.jsonl", "\n")])
def test_empty_source_is_an_error_naming_it(tmp_path, name, content):
    (tmp_path / name).write_text(content)
    with pytest.raises(PromptSourceError, match=rf"{name.replace('.', '[.]')} holds no prompts"):
        load_prompts(tmp_path / name)


def test_non_utf8_file_is_an_error(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("a cat\nun caf\u00e9\n".encode("latin-1"))
    with pytest.raises(PromptSourceError, match=r"latin1\.txt is not UTF-8 text \(byte 0xe9 on line 2\)"):
        load_prompts(tmp_path / "latin1.txt")


def test_missing_path_and_unknown_suffix(tmp_path):
    with pytest.raises(PromptSourceError, match="nope.txt does not exist"):
        load_prompts(tmp_path / "nope.txt")
    (tmp_path / "p.xlsx").write_text("a")
    with pytest.raises(PromptSourceError, match=r"p\.xlsx has an unknown suffix '\.xlsx'"):
        load_prompts(tmp_path / "p.xlsx")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PromptSourceError, match="folder .*empty has no"):
        load_prompts(tmp_path / "empty")


def test_folder_of_files_in_path_order(tmp_path):
    (tmp_path / "b.jsonl").write_text('{"text": "from jsonl"}\n')
    (tmp_path / "a.txt").write_text("from txt\nshared\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.csv").write_text("prompt\nfrom csv\nshared\n")
    (tmp_path / ".hidden.txt").write_text("hidden\n")
    (tmp_path / "notes.md").write_text("ignored\n")
    assert load_prompts(tmp_path) == ["from txt", "shared", "from jsonl", "from csv"]


def test_parquet_without_pyarrow_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as on a machine without pyarrow (this one has none)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    (tmp_path / "p.parquet").write_bytes(b"PAR1")
    with pytest.raises(PromptSourceError, match=r"p\.parquet \(a parquet file\) needs the `pyarrow` package.*"
                                                r"pip install pyarrow"):
        load_prompts(tmp_path / "p.parquet")


def test_dataset_folder_without_datasets_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    (tmp_path / "dataset_info.json").write_text("{}")
    (tmp_path / "state.json").write_text("{}")
    with pytest.raises(PromptSourceError, match=r"needs the `datasets` package.*pip install datasets"):
        load_prompts(tmp_path)


def test_parquet_file(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"id": [1, 2, 3], "caption": ["a cat", None, " a  dog"]}), tmp_path / "p.parquet")
    assert load_prompts(tmp_path / "p.parquet") == ["a cat", "a dog"]
    with pytest.raises(PromptSourceError, match=r"available columns: \['id', 'caption'\]"):
        load_prompts(tmp_path / "p.parquet", column="prompt")


def test_dataset_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a cat", "a cat", "a dog"]})}).save_to_disk(
        tmp_path / "ds")
    assert load_prompts(tmp_path / "ds") == ["a cat", "a dog"]


# ---- fingerprints ----

def test_fingerprint_follows_weights_config_tokenizer_and_settings(clip_dir, tmp_path):
    from transformers import CLIPTextModel

    base = model_fingerprint(clip_dir, encoder="clip")
    copy = shutil.copytree(clip_dir, tmp_path / "copy")
    assert model_fingerprint(copy, encoder="clip") == base  # content, not location
    assert model_fingerprint(copy, encoder="clip", dtype="torch.float16") != base

    model = CLIPTextModel.from_pretrained(copy)
    assert model_fingerprint(model) == model_fingerprint(CLIPTextModel.from_pretrained(clip_dir))
    with torch.no_grad():
        model.get_input_embeddings().weight[0, 0] += 1e-3  # a fine-tune: same shapes, same header
    assert model_fingerprint(model) != model_fingerprint(CLIPTextModel.from_pretrained(clip_dir))
    model.save_pretrained(copy)
    weights = model_fingerprint(copy, encoder="clip")
    assert weights != base

    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "hidden_act": "gelu"}))
    assert model_fingerprint(copy, encoder="clip") not in (base, weights)

    tokenizer = shutil.copytree(clip_dir, tmp_path / "tok")
    clip_tokenizer(max_length=12).save_pretrained(tokenizer)
    assert model_fingerprint(tokenizer, encoder="clip") != base
    assert model_fingerprint(clip_tokenizer(12)) == model_fingerprint(clip_tokenizer(12))
    assert model_fingerprint(clip_tokenizer(12)) != model_fingerprint(clip_tokenizer(16))


def test_fingerprint_reads_the_hub_cache_blob_name(clip_dir, tmp_path):
    import hashlib

    snapshot, blobs = tmp_path / "snapshots" / "rev", tmp_path / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for f in clip_dir.iterdir():
        data = f.read_bytes()
        blob = blobs / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / f.name).symlink_to(blob)
    assert model_fingerprint(snapshot) == model_fingerprint(clip_dir)
    weights = blobs / hashlib.sha256((clip_dir / "model.safetensors").read_bytes()).hexdigest()
    weights.write_bytes(b"anything")  # the name is trusted: a hub blob is never rewritten in place
    assert model_fingerprint(snapshot) == model_fingerprint(clip_dir)


# ---- the embedding cache ----

def test_round_trip_is_bit_exact(clip_dir, tmp_path):
    encode = Counting(clip_dir)
    fingerprint = TEXT_ENCODERS["clip"].fingerprint(clip_dir, torch.float32)
    first = EmbeddingCache(tmp_path, fingerprint).get_or_encode(PROMPTS, encode, batch_size=len(PROMPTS))
    fresh = Counting(clip_dir).encode(PROMPTS)
    _assert_equal(first, fresh)
    _assert_equal(EmbeddingCache(tmp_path, fingerprint).get_or_encode(PROMPTS, encode), fresh)  # from disk
    assert first["prompt_embeds"].shape == (5, 16, 32) and first["attention_mask"].dtype == torch.int64
    assert len(encode.batches) == 1

    def half_precision(prompts):
        return {"embeds": fresh["prompt_embeds"][:len(prompts)].to(torch.bfloat16),
                "mask": fresh["attention_mask"][:len(prompts)].bool()}

    stored = EmbeddingCache(tmp_path, "other-dtypes").get_or_encode(PROMPTS[:3], half_precision)
    _assert_equal(EmbeddingCache(tmp_path, "other-dtypes").get_or_encode(PROMPTS[:3], half_precision), stored)
    _assert_equal(stored, half_precision(PROMPTS[:3]))


def test_hits_are_not_encoded_and_misses_are(clip_dir, tmp_path):
    encode = Counting(clip_dir)
    cache = EmbeddingCache(tmp_path, "fp")
    first = cache.get_or_encode(PROMPTS[:3], encode, batch_size=2)
    assert encode.batches == [PROMPTS[:2], PROMPTS[2:3]]

    assert cache.encode_missing(PROMPTS[:3], encode) == 0
    again = EmbeddingCache(tmp_path, "fp").get_or_encode(PROMPTS[2::-1], encode)  # reopened, reversed order
    assert len(encode.batches) == 2  # every prompt was a hit
    _assert_equal(again, {k: v.flip(0) for k, v in first.items()})

    both = EmbeddingCache(tmp_path, "fp").get_or_encode([*PROMPTS, PROMPTS[4]], encode, batch_size=8)
    assert encode.batches[2:] == [PROMPTS[3:]]  # only the misses, once each
    _assert_equal({k: v[:3] for k, v in both.items()}, first)
    _assert_equal({k: v[3:5] for k, v in both.items()}, Counting(clip_dir).encode(PROMPTS[3:]))
    assert torch.equal(both["prompt_embeds"][5], both["prompt_embeds"][4])


def test_stale_text_encoder_is_never_read(clip_dir, tmp_path):
    old = TEXT_ENCODERS["clip"].fingerprint(clip_dir, torch.float32)
    EmbeddingCache(tmp_path / "cache", old).get_or_encode(PROMPTS, Counting(clip_dir))

    retrained = _save_clip(tmp_path / "retrained", seed=1)  # same architecture and tokenizer, new weights
    new = TEXT_ENCODERS["clip"].fingerprint(retrained, torch.float32)
    assert new != old
    encode = Counting(retrained)
    embeds = EmbeddingCache(tmp_path / "cache", new).get_or_encode(PROMPTS, encode, batch_size=8)
    assert encode.batches == [PROMPTS]  # nothing of the old encoder's cache was used
    _assert_equal(embeds, Counting(retrained).encode(PROMPTS))
    assert not torch.equal(embeds["prompt_embeds"], Counting(clip_dir).encode(PROMPTS)["prompt_embeds"])

    shutil.copytree(tmp_path / "cache" / old, tmp_path / "cache" / "renamed")
    with pytest.raises(EmbeddingCacheError, match=f"for fingerprint '{old}', expected format 1 for 'renamed'"):
        EmbeddingCache(tmp_path / "cache", "renamed")


def test_crash_during_encoding_leaves_a_consistent_cache(clip_dir, tmp_path):
    crashing = Counting(clip_dir, fail_after=1)
    with pytest.raises(RuntimeError, match="encoder crashed"):
        EmbeddingCache(tmp_path, "fp").encode_missing(PROMPTS, crashing, batch_size=2, shard_rows=2)
    cache = EmbeddingCache(tmp_path, "fp")
    assert len(cache) == 2 and cache.missing(PROMPTS) == PROMPTS[2:]  # the first shard was committed
    assert sorted(p.name for p in (tmp_path / "fp").iterdir()) == ["index.json", "shard-00000.safetensors"]

    with pytest.raises(RuntimeError, match="encoder crashed"):  # a crash inside a shard commits none of it
        cache.encode_missing(PROMPTS, Counting(clip_dir, fail_after=1), batch_size=2, shard_rows=4)
    assert len(EmbeddingCache(tmp_path, "fp")) == 2

    encode = Counting(clip_dir)
    resumed = EmbeddingCache(tmp_path, "fp").get_or_encode(PROMPTS, encode, batch_size=len(PROMPTS))
    assert encode.batches == [PROMPTS[2:]]
    _assert_equal(resumed, EmbeddingCache(tmp_path / "one-go", "fp").get_or_encode(PROMPTS, Counting(clip_dir)))


def test_shard_written_but_index_not_is_ignored(clip_dir, tmp_path, monkeypatch):
    import tdm.data.cache as cache_module

    encode = Counting(clip_dir)
    EmbeddingCache(tmp_path, "fp").encode_missing(PROMPTS[:2], encode)

    def disk_full(path, text):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cache_module, "write_text_atomic", disk_full)
    with pytest.raises(OSError, match="No space left"):
        EmbeddingCache(tmp_path, "fp").encode_missing(PROMPTS, encode)
    monkeypatch.undo()
    assert (tmp_path / "fp" / "shard-00001.safetensors").is_file()  # complete on disk, but not committed
    (tmp_path / "fp" / ".shard-00001.safetensors.tmp-99.safetensors").write_bytes(b"half a shard")  # a killed write
    cache = EmbeddingCache(tmp_path, "fp")
    assert cache.missing(PROMPTS) == PROMPTS[2:]
    _assert_equal(cache.get_or_encode(PROMPTS, encode, batch_size=8), Counting(clip_dir).encode(PROMPTS))

    shard = tmp_path / "fp" / "shard-00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:-8])  # damaged after the fact
    with pytest.raises(EmbeddingCacheError, match=r"shard-00000.safetensors: missing, or not the \d+ bytes"):
        EmbeddingCache(tmp_path, "fp")
    (tmp_path / "fp" / "index.json").write_text("{not json")
    with pytest.raises(EmbeddingCacheError, match=r"index.json: unreadable embedding cache"):
        EmbeddingCache(tmp_path, "fp")


def test_writers_take_turns_and_encode_each_prompt_once(tmp_path):
    """Two processes starting training together: the second waits for the first's writer lock, then finds its
    prompts cached (threads stand in for processes: flock locks are per open file)."""
    import threading

    holding, release, second_batches, results = threading.Event(), threading.Event(), [], []

    def slow(prompts):  # the first writer, inside the lock until released
        holding.set()
        release.wait(10)
        return {"embeds": torch.ones(len(prompts), 2)}

    def second(prompts):
        second_batches.append(prompts)
        return {"embeds": torch.zeros(len(prompts), 2)}

    first = threading.Thread(target=lambda: EmbeddingCache(tmp_path, "fp").encode_missing(PROMPTS, slow))
    first.start()
    assert holding.wait(10)
    cache = EmbeddingCache(tmp_path, "fp")
    assert cache.missing(PROMPTS) == PROMPTS  # nothing committed yet
    waiting = threading.Thread(target=lambda: results.append(cache.encode_missing(PROMPTS, second)))
    waiting.start()
    waiting.join(0.5)
    assert waiting.is_alive()  # blocked on the lock
    release.set()
    first.join()
    waiting.join()
    assert results == [0] and second_batches == [] and not cache.missing(PROMPTS)
    assert torch.equal(cache.embeddings(PROMPTS).batch([0])["embeds"], torch.ones(1, 2))


def test_encode_output_is_checked(tmp_path):
    def varying(prompts):  # pads to the longest prompt of the batch: shapes differ between batches
        return {"embeds": torch.zeros(len(prompts), max(len(p) for p in prompts))}

    with pytest.raises(EmbeddingCacheError, match="same keys, dtypes and per-prompt shapes"):
        EmbeddingCache(tmp_path, "fp").encode_missing(["a", "bb", "ccc"], varying, batch_size=1)
    with pytest.raises(EmbeddingCacheError, match=r"\['embeds'\] are not batched along dim 0 \(2 prompts"):
        EmbeddingCache(tmp_path, "fp").encode_missing(["a", "b"], lambda p: {"embeds": torch.zeros(3, 4)})
    with pytest.raises(EmbeddingCacheError, match="dict of tensors"):
        EmbeddingCache(tmp_path, "fp").encode_missing(["a"], lambda p: torch.zeros(1, 4))
    with pytest.raises(EmbeddingCacheError, match="fingerprint must be"):
        EmbeddingCache(tmp_path, "../elsewhere")
    assert not (tmp_path / "fp").exists()


def test_prompt_embeddings_for_training(clip_dir, tmp_path):
    fresh = Counting(clip_dir).encode([*PROMPTS, "ugly"])
    assert cache_prompts(PROMPTS, lambda: Counting(clip_dir), "fp", tmp_path, negative_prompt="ugly",
                         batch_size=2) == 6
    assert cache_prompts(PROMPTS, lambda: pytest.fail("loaded the encoder"), "fp", tmp_path,
                         negative_prompt="ugly") == 0
    cache = EmbeddingCache(tmp_path, "fp")
    embeddings = cache.embeddings(PROMPTS[1:], negative_prompt="ugly")
    assert len(embeddings) == 4 and embeddings.prompts == PROMPTS[1:]

    draw = embeddings.sample(3, torch.Generator().manual_seed(0))
    indices = torch.randint(4, (3,), generator=torch.Generator().manual_seed(0)).tolist()
    _assert_equal(draw, {k: v[[i + 1 for i in indices]] for k, v in fresh.items()})
    _assert_equal(embeddings.batch([3, 0]), {k: v[[4, 1]] for k, v in fresh.items()})
    _assert_equal(embeddings.null(2), {k: v[[5, 5]] for k, v in fresh.items()})

    with pytest.raises(EmbeddingCacheError, match=r"1 of 2 prompts are not in the embedding cache .*'a dog'"):
        cache.embeddings(["a cat", "a dog"])
    with pytest.raises(EmbeddingCacheError, match="without a negative prompt"):
        cache.embeddings(PROMPTS).null(1)


# ---- tdm cache-prompts ----

def test_cache_prompts_command(clip_dir, tmp_path, capsys):
    (tmp_path / "prompts.txt").write_text("\n".join([*PROMPTS, PROMPTS[0], ""]))
    args = ["cache-prompts", "--prompts", str(tmp_path / "prompts.txt"), "--model", str(clip_dir),
            "--family", "clip", "--out", str(tmp_path / "cache"), "--batch-size", "2"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "5 prompts from" in out and "(1 duplicates dropped)" in out and "6 encoded, 0 already cached" in out
    assert main(args) == 0
    assert "0 encoded, 6 already cached" in capsys.readouterr().out

    fingerprint = TEXT_ENCODERS["clip"].fingerprint(clip_dir, torch.float32)
    embeddings = EmbeddingCache(tmp_path / "cache", fingerprint).embeddings(PROMPTS, negative_prompt="")
    encode, batches = Counting(clip_dir).encode, [PROMPTS[:2], PROMPTS[2:4], [PROMPTS[4], ""]]  # as the CLI ran
    fresh = [encode(batch) for batch in batches]
    fresh = {key: torch.cat([f[key] for f in fresh]) for key in fresh[0]}
    _assert_equal(embeddings.batch(range(5)), {k: v[:5] for k, v in fresh.items()})
    _assert_equal(embeddings.null(1), {k: v[5:] for k, v in fresh.items()})

    pipeline = tmp_path / "pipeline"  # a diffusers pipeline folder: text_encoder/ and tokenizer/
    shutil.copytree(clip_dir, pipeline / "text_encoder")
    shutil.copytree(clip_dir, pipeline / "tokenizer")
    assert main([*args[:4], str(pipeline), *args[5:]]) == 0
    assert "6 encoded" in capsys.readouterr().out


def test_cache_prompts_command_errors(clip_dir, tmp_path, capsys):
    (tmp_path / "prompts.txt").write_text("a cat\n")
    base = ["cache-prompts", "--prompts", str(tmp_path / "prompts.txt"), "--family", "clip", "--out", str(tmp_path)]
    assert main([*base, "--model", str(tmp_path / "no-such-model")]) == 2
    assert "tdm: error: --model " in capsys.readouterr().err
    assert main([*base, "--model", str(tmp_path / "prompts.txt")]) == 2
    assert "expected a folder or a hub id, got a file" in capsys.readouterr().err
    assert main([*base, "--model", str(tmp_path)]) == 2
    assert "cannot load a CLIP text encoder and tokenizer" in capsys.readouterr().err
    (tmp_path / "prompts.txt").write_text("\n")
    assert main([*base, "--model", str(clip_dir)]) == 2
    assert "holds no prompts" in capsys.readouterr().err
