"""The student LoRA in the file formats that other tools read, written side by side into an export folder.

  format     file(s)                            read by
  diffusers  pytorch_lora_weights.safetensors   `pipe.load_lora_weights(EXPORT_DIR)` (SD1.5/2, SDXL, SD3, CogVideoX);
                                                ComfyUI for SD3 (its `transformer.` keys)
  peft       adapter_model.safetensors +        `PeftModel.from_pretrained(network, EXPORT_DIR)` (every family);
               adapter_config.json              ComfyUI for PixArt and SD3 (its `base_model.model.` keys)
  kohya      lora_kohya.safetensors             ComfyUI, A1111 and kohya tooling (`lora_unet_...` keys for SD1.5 and
                                                SDXL, `lora_transformer_...` for SD3); `pipe.load_lora_weights` for
                                                SD1.5 and SDXL, which converts these keys

The scale alpha/r: the diffusers and peft files fold each layer's scale into its lora_B ("up") weights and record
alpha = r, so any reader gets the student at scale 1, also one that ignores the metadata and config: ComfyUI
applies scale 1 to lora_A/lora_B keys without an `.alpha` tensor, and diffusers' SD3 and CogVideoX loaders refuse
keys without "lora" in their name, so `.alpha` tensors cannot go into the diffusers file. The kohya file keeps the
weights as trained and carries alpha as an `.alpha` tensor per layer (scale alpha/rank), as kohya tooling writes
it (`kohya_weights` says what happens to layers of another scale).
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .backbones.diffusers_pipeline import import_diffusers
from .errors import TDMError
from .roles import adapter_weights

FORMATS = ("diffusers", "peft", "kohya")
DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"
PEFT_FILE = "adapter_model.safetensors"  # peft's SAFETENSORS_WEIGHTS_NAME
PEFT_CONFIG_FILE = "adapter_config.json"  # peft's CONFIG_NAME
KOHYA_FILE = "lora_kohya.safetensors"
PEFT_PREFIX = "base_model.model."  # what `get_peft_model_state_dict(PeftModel)` puts before a network's layer names
# kohya key prefix per pipeline: what ComfyUI maps for the model (SD UNets: kohya's own; SD3: OneTrainer's)
KOHYA_PREFIX = {"StableDiffusionPipeline": "lora_unet", "StableDiffusionXLPipeline": "lora_unet",
                "StableDiffusion3Pipeline": "lora_transformer"}
KOHYA_IN_DIFFUSERS = {"StableDiffusionPipeline", "StableDiffusionXLPipeline"}  # load_lora_weights converts these


class LoraFormatError(TDMError, ValueError):
    """A LoRA format that the family or the adapter cannot be written in; the message says which and why."""


@dataclass
class StudentLora:
    """A peft adapter as the files hold it: weights keyed as `get_peft_model_state_dict(network)` keys them
    (`<layer>.lora_A.weight`, ...), each layer's scale as peft applies it, and the adapter's LoraConfig."""

    weights: dict[str, torch.Tensor]
    scales: dict[str, float]
    config: object  # peft.LoraConfig
    network_class: type

    @classmethod
    def of(cls, network: nn.Module, adapter_name: str, config) -> StudentLora:
        from peft.tuners.lora import LoraLayer

        weights = {k: v.detach().cpu().contiguous() for k, v in adapter_weights(network, adapter_name).items()}
        scales = {name: float(m.scaling[adapter_name]) for name, m in network.named_modules()
                  if isinstance(m, LoraLayer) and adapter_name in m.scaling}
        return cls(weights, scales, config, type(network))


def _layer(key: str) -> str:
    return key.split(".lora_")[0]


def _is_up(key: str) -> bool:
    """lora_B holds the "up" projection (and peft's optional LoRA bias, scaled with it)."""
    return ".lora_B." in key or ".lora_embedding_B" in key


def folded_weights(lora: StudentLora) -> dict[str, torch.Tensor]:
    """The weights with each layer's scale multiplied into its up projection: the same layer output at scale 1."""
    return {k: v * lora.scales[_layer(k)] if _is_up(k) else v for k, v in lora.weights.items()}


def folded_config(lora: StudentLora):
    """The LoraConfig of `folded_weights`: alpha = r everywhere (also in rank_pattern's layers), no rsLoRA."""
    config = copy.deepcopy(lora.config)
    config.lora_alpha, config.use_rslora = config.r, False
    config.alpha_pattern = dict(config.rank_pattern or {})
    return config


def kohya_weights(lora: StudentLora, prefix: str) -> dict[str, torch.Tensor]:
    """`<prefix>_<layer with dots as underscores>.lora_down.weight / .lora_up.weight / .alpha`: a reader applying
    alpha/rank gets the student. One alpha for every layer, the most common scale * rank (diffusers' kohya
    conversion drops per-layer alphas of attention layers); a layer with another scale has the ratio folded into
    its lora_up, the others keep their weights as trained."""
    alphas = {}
    for key, value in lora.weights.items():
        layer, kind = _layer(key), key[len(_layer(key)):]
        if kind not in (".lora_A.weight", ".lora_B.weight"):
            raise LoraFormatError(f"--lora-format kohya: {key} ({kind.lstrip('.')}) has no kohya key; only "
                                  "Linear and Conv LoRA weights without LoRA bias do (use diffusers or peft)")
        if kind == ".lora_A.weight":
            alphas[layer] = lora.scales[layer] * value.shape[0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    out = {}
    for key, value in lora.weights.items():
        layer = _layer(key)
        name = f"{prefix}_{layer.replace('.', '_')}"
        if _is_up(key):
            out[f"{name}.lora_up.weight"] = value if alphas[layer] == alpha else value * (alphas[layer] / alpha)
        else:
            out[f"{name}.lora_down.weight"] = value
            out[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    return out


def formats_for(requested: str, pipeline_class: str, lora_layers_kwarg: str | None) -> tuple[str, ...]:
    """The formats `requested` ("all" or one of FORMATS) means for a family: "all" is every format a tool reads for
    it; a single format the family has no reader for is an error."""
    applies = {"diffusers": lora_layers_kwarg is not None, "peft": True, "kohya": pipeline_class in KOHYA_PREFIX}
    if requested == "all":
        return tuple(f for f in FORMATS if applies[f])
    if requested not in FORMATS:
        raise LoraFormatError(f"--lora-format: expected one of {', '.join(FORMATS)}, all; got {requested!r}")
    if not applies[requested]:
        why = {"diffusers": "has no load_lora_weights",
               "kohya": f"has no kohya key convention that tools read (these do: {', '.join(KOHYA_PREFIX)})"
               }[requested]
        raise LoraFormatError(f"--lora-format {requested}: {pipeline_class} {why}; use peft or all")
    return (requested,)


def write_diffusers(lora: StudentLora, folder: Path, pipeline_class: str, lora_layers_kwarg: str) -> str:
    """Through the pipeline's own `save_lora_weights`, which adds the component prefix and the metadata."""
    pipeline_cls = getattr(import_diffusers(), pipeline_class)
    metadata_kwarg = lora_layers_kwarg.replace("_lora_layers", "_lora_adapter_metadata")
    pipeline_cls.save_lora_weights(folder, **{lora_layers_kwarg: folded_weights(lora),
                                              metadata_kwarg: folded_config(lora).to_dict()},
                                   weight_name=DIFFUSERS_FILE)
    return DIFFUSERS_FILE


def write_peft(lora: StudentLora, folder: Path) -> str:
    """What `PeftModel.save_pretrained` writes for a model without a task type: prefixed weights and the config in
    inference mode with the base class it applies to."""
    from safetensors.torch import save_file

    save_file({PEFT_PREFIX + k: v for k, v in folded_weights(lora).items()}, folder / PEFT_FILE,
              metadata={"format": "pt"})
    config = folded_config(lora)
    config.inference_mode = True
    config.save_pretrained(folder, auto_mapping_dict={"base_model_class": lora.network_class.__name__,
                                                      "parent_library": lora.network_class.__module__})
    return PEFT_FILE


def write_kohya(lora: StudentLora, folder: Path, pipeline_class: str) -> str:
    from safetensors.torch import save_file

    save_file(kohya_weights(lora, KOHYA_PREFIX[pipeline_class]), folder / KOHYA_FILE, metadata={"format": "pt"})
    return KOHYA_FILE


def write_lora(lora: StudentLora, folder: Path, formats: tuple[str, ...], pipeline_class: str,
               lora_layers_kwarg: str | None) -> dict:
    """Write `formats` into `folder`; return the recipe's `lora` entry: every format's file, and the one tdm loads
    (`format`, `file`): diffusers, else peft, else kohya."""
    files = {}
    for fmt in formats:
        if fmt == "diffusers":
            files[fmt] = write_diffusers(lora, folder, pipeline_class, lora_layers_kwarg)
        elif fmt == "peft":
            files[fmt] = write_peft(lora, folder)
        else:
            files[fmt] = write_kohya(lora, folder, pipeline_class)
    primary = next(f for f in FORMATS if f in files)
    return {"format": primary, "file": files[primary], "files": files}


def read_peft_weights(path: Path) -> dict[str, torch.Tensor]:
    """A peft adapter file's weights keyed by the network's layer names, as `set_peft_model_state_dict(network)`
    takes them (files without the PeftModel prefix, as earlier exports wrote them, too)."""
    from safetensors.torch import load_file

    return {k.removeprefix(PEFT_PREFIX): v for k, v in load_file(path).items()}
