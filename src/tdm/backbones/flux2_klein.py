"""FLUX.2 [klein]: Flux2Transformer2DModel, flow matching with a shift that depends on the sample size and the step
count, a Qwen3 text encoder (three hidden layers stacked), two-branch CFG against the empty prompt, and a VAE
whose latents are patchified 2x2 and batch-normalised before the network sees them."""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import ConfigError
from .diffusers_base import DiffusersBackbone, DiffusersDenoiser
from .diffusers_pipeline import import_diffusers
from .diffusers_schedule import fixed_shift_config

MAX_SEQUENCE_LENGTH = 512             # Qwen3 tokens, the pipeline's default
TEXT_LAYERS = (9, 18, 27)             # the hidden states the pipeline stacks (its text_encoder_out_layers)
TEACHER_STEPS = 50                    # the pipeline's default num_inference_steps, at which the shift is taken
BASE_MODEL = "black-forest-labs/FLUX.2-klein-base-4B"


def _pipeline_module():
    from diffusers.pipelines.flux2 import pipeline_flux2_klein

    return pipeline_flux2_klein


class Flux2KleinDenoiser(DiffusersDenoiser):
    """transformer(tokens of x_t, sigma(t), Qwen3 embeds, 4-D token ids): x_t is [B, 4C, h/2, w/2] (the pipeline's
    `latents`: patchified, normalised); its positions are packed into tokens and the output unpacked back."""

    def call(self, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        pipeline = _pipeline_module().Flux2KleinPipeline
        embeds = cond["prompt_embeds"]
        out = self.model(hidden_states=pipeline._pack_latents(x), timestep=self.schedule.sigma(t), guidance=None,
                         encoder_hidden_states=embeds, txt_ids=pipeline._prepare_text_ids(embeds).to(x.device),
                         img_ids=pipeline._prepare_latent_ids(x).to(x.device), return_dict=False)[0]
        return out.permute(0, 2, 1).reshape(x.shape)  # tokens [B, h w, 4C] -> [B, 4C, h, w]


class Flux2KleinBackbone(DiffusersBackbone):
    """FLUX.2 [klein] teacher (distil the base model: the distilled one ignores CFG and is few-step already).
    Samples: [4C, h/2, w/2], the pipeline's normalised patch latents; cond: prompt_embeds [B, 512, 3 x hidden]."""

    name = "flux2-klein"
    pipeline_class = "Flux2KleinPipeline"
    denoiser_class = Flux2KleinDenoiser
    time_embedding_module = "model.time_guidance_embed.timestep_embedder"
    denoiser_name = "transformer"
    lora_layers_kwarg = "transformer_lora_layers"
    # both streams of the double blocks' attention, and the single blocks' fused q, k, v + MLP-in projection (their
    # output projection `attn.to_out` has the name of the double blocks' ModuleList, which peft cannot adapt)
    lora_targets = ("attention", "joint_attention", "attn.to_qkv_mlp_proj")

    @classmethod
    def from_pretrained(cls, source: str, **kwargs) -> Flux2KleinBackbone:
        """Refuses a step-distilled Klein (model_index.json: is_distilled) before loading anything."""
        index = import_diffusers().DiffusionPipeline.load_config(source, revision=kwargs.get("revision"))
        if index.get("is_distilled"):
            raise ConfigError(f"backbone.teacher: {source} is a step-distilled FLUX.2 [klein] (is_distilled: few "
                              f"steps already, CFG ignored); distil a base model, e.g. {BASE_MODEL}")
        return super().from_pretrained(source, **kwargs)

    def default_latent_size(self):
        size = self.pipeline.default_sample_size  # 128: 1024 pixels
        return size, size

    def patch_size(self) -> int:
        return 2 * self.denoiser.config.patch_size  # the VAE latents are patchified 2x2

    @property
    def sample_shape(self):
        step = self.vae_scale_factor * 2
        return (self.denoiser.config.in_channels, self.height // step, self.width // step)

    def fix_scheduler(self):
        """The pipeline's empirical mu for this many image tokens at the teacher's default 50 steps."""
        scheduler = self.pipeline.scheduler
        if scheduler.config.get("use_dynamic_shifting"):
            _, h, w = self.sample_shape
            mu = _pipeline_module().compute_empirical_mu(image_seq_len=h * w, num_steps=TEACHER_STEPS)
            self.pipeline.scheduler = type(scheduler).from_config(fixed_shift_config(scheduler.config, mu))

    def pipeline_kwargs(self):
        return {**super().pipeline_kwargs(), "max_sequence_length": MAX_SEQUENCE_LENGTH,
                "text_encoder_out_layers": TEXT_LAYERS}

    @classmethod
    def text_settings(cls, denoiser_config, own):
        return {"max_sequence_length": MAX_SEQUENCE_LENGTH, "text_encoder_out_layers": list(TEXT_LAYERS)}

    @classmethod
    def encode_text(cls, pipeline, prompts, device, settings):
        embeds, _ = pipeline.encode_prompt(prompts, device=device, max_sequence_length=settings["max_sequence_length"],
                                           text_encoder_out_layers=tuple(settings["text_encoder_out_layers"]))
        return {"prompt_embeds": embeds}  # text_ids: positions, made in the call

    def vae_latents(self, samples: Tensor) -> Tensor:
        """Samples -> the VAE's latents [N, C, h, w], as the pipeline: batch-norm statistics undone, unpatchified
        (also what the pipeline returns for output_type='latent')."""
        bn, eps = self.vae.bn, self.vae.config.batch_norm_eps
        mean = bn.running_mean.view(1, -1, 1, 1).to(samples.device, samples.dtype)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + eps).to(samples.device, samples.dtype)
        return _pipeline_module().Flux2KleinPipeline._unpatchify_latents(samples * std + mean)

    def decode(self, latents: Tensor) -> Tensor:
        return self.vae.decode(self.vae_latents(latents), return_dict=False)[0]
