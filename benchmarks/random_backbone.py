"""A real-size diffusers network with random weights behind tdm's `Backbone`, for benchmarks of the trainer.

No text encoder and no VAE: the "prompts" are a fixed table of random embeddings of the shapes the family's
pipeline would give (tdm.plan.architectures), drawn per sample. The network is called through the family's
own `DiffusersDenoiser` (tdm.backbones), with the family's noise schedule, so `Trainer(config, out, backbone=...)`
runs tdm's real iteration on it. `tiny(arch)` shrinks an architecture to seconds on a CPU, same code path.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path

import torch
from torch import Tensor

from tdm.backbones.base import Backbone
from tdm.backbones.diffusers_schedule import schedule_from_config
from tdm.config import PRESET_DIR, load_config, to_dict
from tdm.files import write_text_atomic
from tdm.plan.architectures import Architecture
from tdm.registry import diffusers_family

# The released models' scheduler configs (scheduler/scheduler_config.json), the keys that define training noise.
SCHEDULERS = {
    "pixart-alpha": {"_class_name": "DPMSolverMultistepScheduler", "beta_schedule": "linear", "beta_start": 0.0001,
                     "beta_end": 0.02, "num_train_timesteps": 1000, "prediction_type": "epsilon"},
    "sdxl": {"_class_name": "EulerDiscreteScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
             "beta_end": 0.012, "num_train_timesteps": 1000, "prediction_type": "epsilon"},
}
# diffusers forward kwargs -> tdm's condition keys (tdm.backbones: sd_unet, sdxl, pixart); added conditions keep theirs
COND_KEYS = {"encoder_hidden_states": "prompt_embeds", "encoder_attention_mask": "prompt_attention_mask"}
NUM_PROMPTS = 64  # rows of the random embedding table the training conditions are drawn from

# Shrunk configs with the real ones' structure (block types, attention layout, conditioning): latents 8 x 8.
TINY = {
    "pixart-alpha-512": {
        "config": {"num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 8, "cross_attention_dim": 16,
                   "caption_channels": 32, "sample_size": 8},
        "latent": (4, 8, 8), "context": {"encoder_hidden_states": (8, 32)}, "mask": {"encoder_attention_mask": 8}},
    "sdxl": {
        "config": {"block_out_channels": (32, 64), "layers_per_block": 1, "sample_size": 8,
                   "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
                   "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"), "transformer_layers_per_block": (1, 2),
                   "attention_head_dim": (2, 4), "cross_attention_dim": 64, "addition_time_embed_dim": 8,
                   "projection_class_embeddings_input_dim": 6 * 8 + 32, "norm_num_groups": 8},
        "latent": (4, 8, 8), "context": {"encoder_hidden_states": (8, 64)}, "added": {"text_embeds": (32,)}},
}


def tiny(arch: Architecture) -> Architecture:
    """`arch` shrunk to CPU size, with a preset (a file in the temporary folder) at its pixel size: the preset's
    settings otherwise, so FLOP counts (benchmarks/flops.py) and the trainer's config read it as the real one."""
    shrink = TINY[arch.name]
    height, width = (8 * n for n in shrink["latent"][-2:])  # VAE factor 8
    config = load_config(str(PRESET_DIR / arch.preset), [f"backbone.height={height}", f"backbone.width={width}"])
    preset = Path(tempfile.gettempdir()) / f"tdm-tiny-{arch.name}.yaml"
    write_text_atomic(preset, json.dumps(to_dict(config)))  # YAML reads JSON
    return dataclasses.replace(arch, preset=str(preset), config={**arch.config, **shrink["config"]},
                               **{k: v for k, v in shrink.items() if k != "config"})


class RandomBackbone(Backbone):
    """`arch`'s network with random weights in `dtype` on `device`, as the family's denoiser; conditions drawn
    from a fixed table of random embeddings (row 0: the null condition)."""

    is_image = False

    def __init__(self, arch: Architecture, device: torch.device | str, dtype: torch.dtype,
                 gradient_checkpointing: bool = False, seed: int = 0):
        family = diffusers_family(arch.family)
        self.name, self.lora_targets = arch.family, family.lora_targets
        self.time_embedding_module = family.time_embedding_module
        self.schedule, self.prediction = schedule_from_config(SCHEDULERS[arch.family])
        torch.manual_seed(seed)
        network = arch.build(device, dtype)
        if gradient_checkpointing:  # before the roles are built, as tdm.registry.build_backbone
            network.enable_gradient_checkpointing()
        self.teacher = family.denoiser_class(network, self.schedule)
        self.denoiser, self.sample_shape = network, tuple(arch.latent)
        _, _, kwargs = arch.inputs(NUM_PROMPTS + 1, device, dtype)
        added = kwargs.pop("added_cond_kwargs", {})
        self.table = {COND_KEYS.get(k, k): v for k, v in {**kwargs, **added}.items()}

    def _rows(self, index: Tensor) -> dict[str, Tensor]:
        return {k: v[index.to(v.device)] for k, v in self.table.items()}

    def sample_conditions(self, batch: int, generator: torch.Generator) -> dict[str, Tensor]:
        return self._rows(torch.randint(1, NUM_PROMPTS + 1, (batch,), generator=generator))

    def null_condition(self, batch: int) -> dict[str, Tensor]:
        return self._rows(torch.zeros(batch, dtype=torch.long))

    def evaluation_conditions(self, num_samples: int) -> dict[str, Tensor]:
        return self._rows(torch.arange(num_samples) % NUM_PROMPTS + 1)

    def metrics(self, samples: Tensor, cond) -> dict[str, float]:
        return {}

    def floor_metrics(self, num_samples: int) -> dict[str, float]:
        return {}
