"""Each LoRA format of an export, read by its own loader, gives the trained student's network output: diffusers'
`load_lora_weights` (diffusers and kohya files), peft's `PeftModel.from_pretrained` (the peft files), and a reader
that knows only the tensors (scale alpha/r from `.alpha` tensors, 1 without them) and ComfyUI's key conventions
for these models (comfy/lora.py `model_lora_keys_unet`: `lora_unet_<diffusers name>` for SD UNets,
`lora_transformer_<name>`, `transformer.<name>` and `base_model.model.<name>` for SD3, the last two for PixArt).
ComfyUI itself is not installable here; the reader applies its rule, ΔW = up @ down * alpha / rank."""

import json
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from tdm.core.algorithm import TDMConfig  # noqa: E402
from tdm.export import ExportError, export_student, load_pipeline, read_recipe  # noqa: E402
from tdm.lora_files import (  # noqa: E402
    DIFFUSERS_FILE,
    KOHYA_FILE,
    PEFT_CONFIG_FILE,
    PEFT_FILE,
    LoraFormatError,
    formats_for,
)
from tiny_diffusers import PROMPTS, load_backbone, save_tiny, two_adapter_student  # noqa: E402

FAMILIES = ["sd15", "sdxl", "sd3", "pixart-alpha", "cogvideox"]
# attention everywhere; feed-forward, projections, resnet convolutions and time embeddings where the network has them
TARGETS = {"sd15": ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "conv1", "conv2",
                    "conv_shortcut", "time_emb_proj"],
           "sd3": ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                   "ff.net.0.proj", "ff.net.2"],
           "pixart-alpha": ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]}
TARGETS["cogvideox"] = TARGETS["pixart-alpha"]
TARGETS["sdxl"] = TARGETS["sd15"]
# which files ComfyUI reads for each model, and the key prefix it maps for each (it has no CogVideoX model)
COMFY = {"sd15": {KOHYA_FILE: "lora_unet_"}, "sdxl": {KOHYA_FILE: "lora_unet_"},
         "sd3": {KOHYA_FILE: "lora_transformer_", DIFFUSERS_FILE: "transformer.", PEFT_FILE: "base_model.model."},
         "pixart-alpha": {PEFT_FILE: "base_model.model."}}


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {family: save_tiny(family, root / family) for family in FAMILIES}


def lora_student(backbone, family):
    """The teacher with a random 'fake' and 'student' LoRA (rank 4, alpha 8: scale 2; to_k at rank 2 and to_v at
    alpha 16, so layers differ in scale), 'student' active, as the LoRA role strategy leaves it."""
    return two_adapter_student(backbone, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                    target_modules=TARGETS[family], rank_pattern={"to_k": 2},
                                                    alpha_pattern={"to_v": 16}))


@pytest.fixture(scope="module", params=FAMILIES)
def exported(request, tiny_dirs, tmp_path_factory):
    """(family, backbone, export folder, network inputs, the student's output) for an export with every format."""
    family = request.param
    backbone = load_backbone(family, tiny_dirs[family])
    student = lora_student(backbone, family)
    x = torch.randn(2, *backbone.sample_shape, generator=torch.Generator().manual_seed(0))
    inputs = (x, torch.tensor([700.0, 300.0]), backbone.encode_prompts(PROMPTS[:2]))
    with torch.no_grad():
        expected = student(*inputs)
        assert (expected - backbone.teacher(*inputs)).abs().max() > 1e-2
    out = export_student(backbone, student, tmp_path_factory.mktemp(family) / "export",
                         tdm_config=TDMConfig(num_steps=2))
    return family, backbone, out, inputs, expected


def output(backbone, network, inputs):
    with torch.no_grad():
        return backbone.denoiser_class(network, backbone.schedule)(*inputs)


def fresh_network(backbone, family, tiny_dirs):
    return getattr(diffusers, type(backbone.denoiser).__name__).from_pretrained(tiny_dirs[family],
                                                                                subfolder=backbone.denoiser_name)


def test_every_format_a_tool_reads_is_written(exported):
    family, _, out, _, _ = exported
    files = read_recipe(out)["lora"]["files"]
    expected = {"sd15": ["diffusers", "peft", "kohya"], "sdxl": ["diffusers", "peft", "kohya"],
                "sd3": ["diffusers", "peft", "kohya"], "pixart-alpha": ["peft"],
                "cogvideox": ["diffusers", "peft"]}[family]
    assert list(files) == expected
    assert all((out / f).is_file() for f in files.values()) and (out / PEFT_CONFIG_FILE).is_file()


@pytest.mark.parametrize("exported", ["sd15", "sdxl", "sd3", "cogvideox"], indirect=True)  # PixArt's has no loader
def test_diffusers_file_in_load_lora_weights(exported, tiny_dirs):
    family, backbone, out, inputs, expected = exported
    pipe = diffusers.DiffusionPipeline.from_pretrained(tiny_dirs[family])
    pipe.load_lora_weights(out, adapter_name="tdm")  # the documented call: picks pytorch_lora_weights among the files
    assert (output(backbone, getattr(pipe, backbone.denoiser_name), inputs) - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("exported", ["sd15", "sdxl"], indirect=True)  # diffusers converts kohya keys for these
def test_kohya_file_in_load_lora_weights(exported, tiny_dirs):
    family, backbone, out, inputs, expected = exported
    pipe = diffusers.DiffusionPipeline.from_pretrained(tiny_dirs[family])
    pipe.load_lora_weights(out, weight_name=KOHYA_FILE, adapter_name="tdm")
    assert (output(backbone, pipe.unet, inputs) - expected).abs().max() <= 1e-5


def test_peft_files_in_peft_model_from_pretrained(exported, tiny_dirs, recwarn):
    family, backbone, out, inputs, expected = exported
    network = fresh_network(backbone, family, tiny_dirs)
    PeftModel.from_pretrained(network, out)  # injects the adapter into `network` itself
    assert not [w for w in recwarn if "missing" in str(w.message).lower()]
    assert (output(backbone, network, inputs) - expected).abs().max() <= 1e-5


def test_peft_files_are_what_peft_saves(exported, tiny_dirs, tmp_path):
    """The same key names, shapes and config as `PeftModel.save_pretrained` of the network with this adapter."""
    family, backbone, out, _, _ = exported
    reference = get_peft_model(fresh_network(backbone, family, tiny_dirs), LoraConfig.from_pretrained(out))
    reference.save_pretrained(tmp_path)
    ours, theirs = load_file(out / PEFT_FILE), load_file(tmp_path / PEFT_FILE)
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    assert peft_config(out) == peft_config(tmp_path)


def peft_config(folder: Path) -> dict:
    """The adapter config as peft reads it: `target_modules` is a set, saved as a list in the set's iteration order,
    which differs between two sets of the same names built in different orders."""
    config = json.loads((folder / PEFT_CONFIG_FILE).read_text())
    return {**config, "target_modules": sorted(config["target_modules"])}


def read_like_comfyui(network, tensors: dict[str, torch.Tensor], prefix: str, use_alpha: bool = True) -> None:
    """Merge a LoRA file into `network` from its tensors alone: layers found by ComfyUI's key map for the prefix
    (kohya-style prefixes spell the layer name with underscores), up/down or lora_B/lora_A pairs, scale alpha/rank
    from an `.alpha` tensor, else 1. Every key must find its layer (ComfyUI warns "lora key not loaded")."""
    spell = (lambda n: n.replace(".", "_")) if prefix.endswith("_") else (lambda n: n)
    layers = {prefix + spell(name): m for name, m in network.named_modules()
              if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    names = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in tensors}
    assert names <= layers.keys(), sorted(names - layers.keys())[:3]
    with torch.no_grad():
        for name in names:
            up = tensors.get(f"{name}.lora_up.weight", tensors.get(f"{name}.lora_B.weight"))
            down = tensors.get(f"{name}.lora_down.weight", tensors.get(f"{name}.lora_A.weight"))
            alpha = tensors.get(f"{name}.alpha")
            scale = alpha.item() / down.shape[0] if use_alpha and alpha is not None else 1.0
            weight = layers[name].weight
            weight += scale * (up.flatten(1) @ down.flatten(1)).reshape(weight.shape)


@pytest.mark.parametrize("exported", list(COMFY), indirect=True)
def test_tensors_alone_carry_the_scale(exported, tiny_dirs):
    """What ComfyUI and A1111 do: every file they read for the model gives the student; the kohya file's `.alpha`
    tensors matter (ignoring them changes the output)."""
    family, backbone, out, inputs, expected = exported
    for file, prefix in COMFY[family].items():
        network = fresh_network(backbone, family, tiny_dirs)
        read_like_comfyui(network, load_file(out / file), prefix)
        assert (output(backbone, network, inputs) - expected).abs().max() <= 1e-5, file
    if KOHYA_FILE in COMFY[family]:
        tensors = load_file(out / KOHYA_FILE)
        assert {t.item() for k, t in tensors.items() if k.endswith(".alpha")} == {8.0}  # the common alpha
        network = fresh_network(backbone, family, tiny_dirs)
        read_like_comfyui(network, tensors, COMFY[family][KOHYA_FILE], use_alpha=False)
        assert (output(backbone, network, inputs) - expected).abs().max() > 1e-3


@pytest.mark.parametrize("exported", ["pixart-alpha"], indirect=True)
def test_lora_format_choice(exported, tmp_path):
    """A format the family has no reader for is refused before anything is written."""
    family, backbone, out, inputs, expected = exported
    student = lora_student(backbone, family)
    for fmt, why in (("diffusers", "has no load_lora_weights"), ("kohya", "has no kohya key convention")):
        with pytest.raises(LoraFormatError, match=f"--lora-format {fmt}: PixArtAlphaPipeline {why}"):
            export_student(backbone, student, tmp_path / fmt, lora_format=fmt)
        assert not (tmp_path / fmt).exists()
    assert formats_for("kohya", "StableDiffusionPipeline", "unet_lora_layers") == ("kohya",)
    with pytest.raises(LoraFormatError, match="expected one of diffusers, peft, kohya, all; got 'safetensors'"):
        formats_for("safetensors", "StableDiffusionPipeline", "unet_lora_layers")


@pytest.mark.parametrize("exported", ["pixart-alpha"], indirect=True)
def test_tdm_loads_peft_exports_old_and_new(exported, tmp_path):
    """`load_pipeline` loads the peft files into PixArt, and also the layout earlier exports wrote (weights without
    the PeftModel prefix in student_lora.safetensors, alpha in the config)."""
    family, backbone, out, inputs, expected = exported
    pipe, _ = load_pipeline(out)
    assert (output(backbone, pipe.transformer, inputs) - expected).abs().max() <= 1e-5

    old = tmp_path / "old"
    old.mkdir()
    student = lora_student(backbone, family)
    save_file({k.replace(".student.", "."): v.detach().contiguous() for k, v in student.model.state_dict().items()
               if ".lora_" in k and ".student." in k}, old / "student_lora.safetensors")
    student.model.peft_config["student"].save_pretrained(old)
    recipe = read_recipe(out)
    recipe["lora"] = {"format": "peft", "file": "student_lora.safetensors", "scale": 1.0}
    (old / "recipe.json").write_text(json.dumps(recipe))
    pipe, _ = load_pipeline(old)
    assert (output(backbone, pipe.transformer, inputs) - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("exported", ["sd15", "sd3"], indirect=True)
def test_one_format_alone(exported, tmp_path):
    """`lora_format="kohya"` writes the kohya file only; tdm loads it where diffusers reads kohya keys (SD1.5,
    SDXL) and says what to export instead elsewhere."""
    family, backbone, _, inputs, expected = exported
    out = export_student(backbone, lora_student(backbone, family), tmp_path / "export", lora_format="kohya")
    assert read_recipe(out)["lora"]["files"] == {"kohya": KOHYA_FILE}
    assert sorted(p.name for p in out.glob("*.safetensors")) == [KOHYA_FILE]
    if family == "sd15":
        pipe, _ = load_pipeline(out)
        assert (output(backbone, pipe.unet, inputs) - expected).abs().max() <= 1e-5
    else:
        with pytest.raises(ExportError, match=r"export: holds the LoRA only in kohya format, which "
                                              r"StableDiffusion3Pipeline\.load_lora_weights does not read"):
            load_pipeline(out)
