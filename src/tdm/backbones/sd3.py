"""Stable Diffusion 3: SD3Transformer2DModel (MMDiT), flow matching with shift, two CLIP + optional T5 encoders."""

from __future__ import annotations

from torch import Tensor

from .diffusers_base import DiffusersBackbone, DiffusersDenoiser

MAX_SEQUENCE_LENGTH = 256  # T5 tokens, the pipeline's default


class SD3Denoiser(DiffusersDenoiser):
    """transformer(x_t, sigma(t) * T, joint text embeds, pooled projections): the network's timestep is the
    flow scheduler's, sigma * 1000, where sigma = shift(t / T) on tdm's time axis (method.md A.3)."""

    def call(self, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        timestep = self.schedule.sigma(t) * self.schedule.num_train_timesteps
        return self.model(hidden_states=x, timestep=timestep, encoder_hidden_states=cond["prompt_embeds"],
                          pooled_projections=cond["pooled_projections"], return_dict=False)[0]


class SD3Backbone(DiffusersBackbone):
    """SD3 teacher. Cond: prompt_embeds [B, 77 + 256, 4096] (CLIP-L/G padded + T5), pooled_projections [B, 2048].

    `text_encoder_3=False` loads the pipeline without T5 (its tokens are then zeros, as in the pipeline)."""

    name = "sd3"
    pipeline_class = "StableDiffusion3Pipeline"
    denoiser_class = SD3Denoiser
    time_embedding_module = "model.time_text_embed.timestep_embedder"
    denoiser_name = "transformer"
    lora_layers_kwarg = "transformer_lora_layers"
    # both streams of each joint block, as diffusers' SD3 LoRA training script (train_dreambooth_lora_sd3.py)
    lora_targets = ("attention", "joint_attention")

    def __init__(self, *args, text_encoder_3: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.text_encoder_3 = text_encoder_3

    @classmethod
    def init_kwargs(cls):
        return ("text_encoder_3",)

    @classmethod
    def extra_load_kwargs(cls, own):
        return {} if own.get("text_encoder_3", True) else {"text_encoder_3": None, "tokenizer_3": None}

    def pipeline_kwargs(self):
        return {**super().pipeline_kwargs(), "max_sequence_length": MAX_SEQUENCE_LENGTH}

    @classmethod
    def text_parts(cls, own):
        t5 = ("text_encoder_3", "tokenizer_3") if own.get("text_encoder_3", True) else ()
        return ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", *t5)

    @classmethod
    def text_settings(cls, denoiser_config, own):
        return {"max_sequence_length": MAX_SEQUENCE_LENGTH, "t5": own.get("text_encoder_3", True)}

    @classmethod
    def encode_text(cls, pipeline, prompts, device, settings):
        embeds, _, pooled, _ = pipeline.encode_prompt(prompts, prompt_2=None, prompt_3=None, device=device,
                                                      do_classifier_free_guidance=False,
                                                      max_sequence_length=settings["max_sequence_length"])
        return {"prompt_embeds": embeds, "pooled_projections": pooled}
