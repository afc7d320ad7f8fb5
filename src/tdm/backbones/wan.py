"""Wan 2.1 / 2.2 (WanPipeline): WanTransformer3DModel, flow matching with the scheduler's flow shift, UMT5 prompts,
video latents [C, F, h, w]; Wan 2.2 A14B's two expert transformers switched at a boundary timestep."""

from __future__ import annotations

import inspect
from pathlib import Path

import torch
from torch import Tensor, nn

from ..collectives import any_rank, is_sharded
from ..core.schedules import Schedule
from ..errors import ConfigError
from .diffusers_base import DiffusersBackbone, DiffusersDenoiser
from .diffusers_schedule import full_config
from .video import VideoFamily


class WanDenoiser(DiffusersDenoiser):
    """transformer(x_t [B, C, F, h, w], sigma(t) * T, UMT5 embeds), with the pipeline's expert routing: `model`
    (`transformer`) where the network's timestep is >= `boundary`, `model_2` (`transformer_2`) below it, sample by
    sample. Both experts are submodules, so LoRA roles put each adapter on both and every call runs the adapter of
    the expert its t selects. Sharded (FSDP), each process runs every expert that any process needs: a sharded
    network's calls are collectives. `expand_timesteps` (Wan 2.2 TI2V-5B): one timestep per latent token, as the
    pipeline passes it."""

    def __init__(self, model: nn.Module, schedule: Schedule, model_2: nn.Module | None = None,
                 boundary: float | None = None, expand_timesteps: bool = False):
        super().__init__(model, schedule)
        self.model_2, self.boundary, self.expand_timesteps = model_2, boundary, expand_timesteps

    @property
    def other_experts(self) -> dict[str, nn.Module]:
        """The second expert by its pipeline component, for export (`tdm.export.other_experts`)."""
        return {} if self.model_2 is None else {"transformer_2": self.model_2}

    def call(self, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        timestep = (self.schedule.sigma(t) * self.schedule.num_train_timesteps).expand(x.shape[0])
        embeds = cond["prompt_embeds"]
        if self.model_2 is None:
            return self.expert(self.model, x, timestep, embeds)
        high = timestep >= self.boundary  # WanPipeline: `transformer` for t >= boundary_ratio * T
        sharded = is_sharded(self)
        parts, idle = [], []
        for model, rows in ((self.model, high), (self.model_2, ~high)):
            if not (any_rank(rows) if sharded else rows.any()):  # every process asks before any expert runs
                continue
            if rows.any():
                parts.append((rows, self.expert(model, x[rows], timestep[rows], embeds[rows])))
            else:  # another process runs this expert: its calls are collectives, so this one runs it on one sample
                idle.append(self.expert(model, x[:1], timestep[:1], embeds[:1]))
        if len(parts) == 1:
            out = parts[0][1]
        else:
            out = torch.empty_like(x)
            for rows, part in parts:
                out[rows] = part
        for part in idle if torch.is_grad_enabled() else ():
            out = out + 0 * part.sum()  # in the graph, so this process joins the expert's backward collectives too
        return out

    def expert(self, model: nn.Module, x: Tensor, timestep: Tensor, embeds: Tensor) -> Tensor:
        if self.expand_timesteps:  # WanPipeline: (mask[0][0][:, ::2, ::2] * t).flatten(), mask all ones for T2V
            timestep = timestep[:, None].expand(-1, x[0, 0, :, ::2, ::2].numel())
        return model(hidden_states=x, timestep=timestep, encoder_hidden_states=embeds, return_dict=False)[0]


def _pipeline_default(name: str) -> int:
    """A `WanPipeline.__call__` default (height 480, width 832, num_frames 81, max_sequence_length 512)."""
    from diffusers import WanPipeline

    return inspect.signature(WanPipeline.__call__).parameters[name].default


class WanBackbone(VideoFamily, DiffusersBackbone):
    """Wan teacher. Samples [C, F, h, w] (the pipeline's latent layout, channels first); cond: prompt_embeds
    [B, 512, text_dim] (UMT5, zero past each prompt's tokens). `frames` counts pixel frames (4k + 1; 81 -> 21
    latent frames). Two experts when the pipeline has `transformer_2` and a `boundary_ratio` (Wan 2.2 A14B)."""

    name = "wan"
    pipeline_class = "WanPipeline"
    denoiser_class = WanDenoiser
    time_embedding_module = None  # two experts have two time embeddings: step conditioning is not offered
    denoiser_name = "transformer"
    lora_layers_kwarg = "transformer_lora_layers"
    other_networks = ("transformer_2",)  # not loaded to encode prompts
    is_video = True

    def __init__(self, pipeline, vae_config: dict, *args, frames: int = 0, **kwargs):
        vae = full_config(vae_config)
        self.temporal_factor, self.spatial_factor = vae["scale_factor_temporal"], vae["scale_factor_spatial"]
        if pipeline.transformer is None:
            raise ConfigError("backbone.teacher: the Wan pipeline has no `transformer` (a transformer_2 alone is "
                              "not supported)")
        super().__init__(pipeline, vae_config, *args, **kwargs)
        boundary = pipeline.config.boundary_ratio
        if (boundary is None) != (pipeline.transformer_2 is None):
            raise ConfigError(f"backbone.teacher: {self.source} has transformer_2="
                              f"{type(pipeline.transformer_2).__name__} with boundary_ratio={boundary}; two experts "
                              f"need both")
        self.teacher = WanDenoiser(self.denoiser, self.schedule, pipeline.transformer_2,
                                   None if boundary is None else boundary * self.schedule.num_train_timesteps,
                                   pipeline.config.expand_timesteps)
        self.frames = frames or _pipeline_default("num_frames")
        if self.frames % self.temporal_factor != 1:
            raise ConfigError(f"backbone.frames: wan needs {self.temporal_factor} k + 1 frames (the VAE's temporal "
                              f"factor), got {self.frames}")

    @classmethod
    def from_pretrained(cls, source: str, **kwargs) -> WanBackbone:
        """DiffusersBackbone.from_pretrained, after checking that a local folder holds the text encoder and
        tokenizer (diffusers' own error names neither; the prompt cache's key hashes their files too)."""
        folder = Path(source)
        missing = [part for part in cls.text_parts({}) if folder.is_dir() and not (folder / part).is_dir()]
        if missing:
            raise ConfigError(f"backbone.teacher: {source} has no {', '.join(f'{m}/' for m in missing)}: WanPipeline "
                              f"encodes prompts with its UMT5 text encoder and tokenizer")
        return super().from_pretrained(source, **kwargs)

    @classmethod
    def init_kwargs(cls):
        return ("frames",)

    @property
    def experts(self) -> tuple[nn.Module, ...]:
        """The transformers the teacher routes between: (transformer,) or (transformer, transformer_2)."""
        return tuple(m for m in (self.pipeline.transformer, self.pipeline.transformer_2) if m is not None)

    def vae_factor(self, vae_config: dict) -> int:
        return self.spatial_factor

    def default_latent_size(self):
        f = self.spatial_factor
        return _pipeline_default("height") // f, _pipeline_default("width") // f

    def patch_size(self) -> int:
        _, p_h, p_w = self.denoiser.config.patch_size
        return max(p_h, p_w)  # (1, 2, 2) in every released Wan

    @property
    def sample_shape(self):
        c, h, w = super().sample_shape
        return (c, (self.frames - 1) // self.temporal_factor + 1, h, w)  # [C, F, h, w]

    def pipeline_kwargs(self):
        return {**super().pipeline_kwargs(), "num_frames": self.frames,
                "max_sequence_length": _pipeline_default("max_sequence_length")}

    @classmethod
    def text_settings(cls, denoiser_config, own):
        return {"max_sequence_length": _pipeline_default("max_sequence_length")}

    def decode(self, latents: Tensor) -> Tensor:
        """Latents [N, C, F, h, w] -> frames [N, F', 3, H, W] in [-1, 1], as WanPipeline un-normalises them."""
        config = self.vae.config
        mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1, 1).to(latents)
        std = torch.tensor(config.latents_std).view(1, -1, 1, 1, 1).to(latents)
        return self.vae.decode(latents * std + mean, return_dict=False)[0].permute(0, 2, 1, 3, 4)
