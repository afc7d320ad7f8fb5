"""FLUX.1: FluxTransformer2DModel (MMDiT + single-stream blocks), flow matching with a resolution-dependent shift,
CLIP (pooled) + T5 encoders, latents packed 2x2 into tokens, and a guidance embedding in place of CFG (FLUX.1-dev
is guidance-distilled: it has no unconditional branch; the guidance value is an input of the network)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..core.schedules import Schedule
from ..errors import ConfigError
from .diffusers_base import DiffusersBackbone, DiffusersDenoiser
from .diffusers_schedule import resolved_scheduler

MAX_SEQUENCE_LENGTH = 512  # T5 tokens, the pipeline's default (FLUX.1-dev's)
DEFAULT_GUIDANCE = 3.5     # FluxPipeline's default guidance_scale (FLUX.1-dev's model card)


def _pipeline_module():
    from diffusers.pipelines.flux import pipeline_flux

    return pipeline_flux


class FluxDenoiser(DiffusersDenoiser):
    """transformer(packed x_t [B, h/2 * w/2, 4C], sigma(t), T5 embeds, pooled CLIP, guidance, token ids): the
    network's timestep is sigma = shift(t / T) itself (the pipeline passes its timestep / 1000, the network
    multiplies by 1000); `grid` is the packed latent (h/2, w/2), whose positions the image token ids hold."""

    def __init__(self, model: nn.Module, schedule: Schedule, grid: tuple[int, int] = (0, 0)):
        super().__init__(model, schedule)
        self.grid = grid

    def call(self, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        pipeline = _pipeline_module().FluxPipeline
        img_ids = pipeline._prepare_latent_image_ids(len(x), *self.grid, x.device, x.dtype)
        txt_ids = torch.zeros(cond["prompt_embeds"].shape[1], 3, device=x.device, dtype=x.dtype)  # as encode_prompt
        return self.model(hidden_states=x, timestep=self.schedule.sigma(t), guidance=cond.get("guidance"),
                          pooled_projections=cond["pooled_projections"], encoder_hidden_states=cond["prompt_embeds"],
                          txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]


class FluxBackbone(DiffusersBackbone):
    """FLUX.1 teacher. Samples: packed latents [h/2 * w/2, 4C] (the pipeline's layout: 2x2 latent patches as
    tokens); cond: prompt_embeds [B, 512, 4096] (T5), pooled_projections [B, 768] (CLIP), and guidance [B] when
    the network has a guidance embedding (FLUX.1-dev; not schnell).

    Guidance: every role (teacher, student, fake score) sees the same embedded value `embedded_guidance`. The
    teacher's guided output is its output at that value; the student starts as the teacher there, so it starts
    at the target distribution and samples in the stock pipeline at the same value (the export's
    guidance_scale); the fake score, which tracks the student's distribution, starts where the student does.
    tdm's own two-branch CFG (tdm.guidance_scale) stays 1: there is no unconditional branch to contrast."""

    name = "flux"
    pipeline_class = "FluxPipeline"
    denoiser_class = FluxDenoiser
    time_embedding_module = "model.time_text_embed.timestep_embedder"
    denoiser_name = "transformer"
    lora_layers_kwarg = "transformer_lora_layers"
    # both streams of the double blocks and the single blocks' q, k, v, as diffusers' train_dreambooth_lora_flux.py
    lora_targets = ("attention", "joint_attention")

    def __init__(self, *args, embedded_guidance: float = 0.0, **kwargs):
        self.embedded_guidance = embedded_guidance or DEFAULT_GUIDANCE
        super().__init__(*args, **kwargs)
        if not self.denoiser.config.guidance_embeds:
            if embedded_guidance:
                raise ConfigError(f"backbone.embedded_guidance: the transformer of {self.source} has no guidance "
                                  f"embedding (guidance_embeds=false); leave it 0")
            self.embedded_guidance = 0.0
        self.teacher = FluxDenoiser(self.denoiser, self.schedule, self.packed_grid)

    @classmethod
    def init_kwargs(cls):
        return ("embedded_guidance",)

    # ---- sample size, packing and schedule ----
    def default_latent_size(self):
        size = self.pipeline.default_sample_size  # 128: 1024 pixels
        return size, size

    def patch_size(self) -> int:
        return 2 * self.denoiser.config.patch_size  # the pipeline packs 2x2 latent patches into tokens

    @property
    def packed_grid(self) -> tuple[int, int]:
        step = self.vae_scale_factor * 2
        return self.height // step, self.width // step

    @property
    def sample_shape(self):
        h, w = self.packed_grid
        return (h * w, self.denoiser.config.in_channels)

    def fix_scheduler(self):
        """The dynamic shift at this size: mu from the number of image tokens, as FluxPipeline computes it."""
        h, w = self.packed_grid
        self.pipeline.scheduler = resolved_scheduler(self.pipeline.scheduler, h * w)

    @property
    def unguided_scale(self) -> float:
        """The export's guidance_scale: the embedded value (FluxPipeline runs one branch whatever it is)."""
        return self.embedded_guidance or 1.0

    def pipeline_kwargs(self):
        return {**super().pipeline_kwargs(), "max_sequence_length": MAX_SEQUENCE_LENGTH}

    # ---- prompts ----
    @classmethod
    def text_parts(cls, own):
        return ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")

    @classmethod
    def text_settings(cls, denoiser_config, own):
        return {"max_sequence_length": MAX_SEQUENCE_LENGTH}

    @classmethod
    def encode_text(cls, pipeline, prompts, device, settings):
        embeds, pooled, _ = pipeline.encode_prompt(prompts, prompt_2=None, device=device,
                                                   max_sequence_length=settings["max_sequence_length"])
        return {"prompt_embeds": embeds, "pooled_projections": pooled}  # text_ids: zeros, made in the call

    def add_conditions(self, text):
        if not self.embedded_guidance:
            return text
        batch = len(text["prompt_embeds"])
        return {**text, "guidance": torch.full((batch,), self.embedded_guidance, device=self.device)}

    # ---- decoding ----
    def decode(self, latents: Tensor) -> Tensor:
        """Packed latents [N, h/2 * w/2, 4C] -> pixels, unpacked as the pipeline does."""
        unpacked = _pipeline_module().FluxPipeline._unpack_latents(latents, self.height, self.width,
                                                                   self.vae_scale_factor)
        return super().decode(unpacked)
