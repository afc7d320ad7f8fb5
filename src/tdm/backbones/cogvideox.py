"""CogVideoX: CogVideoXTransformer3DModel, v prediction on a zero-terminal-SNR VP schedule, a frame axis."""

from __future__ import annotations

from torch import Tensor

from .diffusers_base import DiffusersBackbone, DiffusersDenoiser
from .video import VideoFamily


class CogVideoXDenoiser(DiffusersDenoiser):
    """transformer(x_t [B, F, C, h, w], t, T5 embeds), with 3-D rotary embeddings when the model uses them."""

    def call(self, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        rotary = self.rotary_embedding(x) if self.model.config.use_rotary_positional_embeddings else None
        return self.model(hidden_states=x, encoder_hidden_states=cond["prompt_embeds"], timestep=t,
                          image_rotary_emb=rotary, return_dict=False)[0]

    def rotary_embedding(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(cos, sin) for the latent grid of x, as CogVideoXPipeline._prepare_rotary_positional_embeddings."""
        from diffusers.models.embeddings import get_3d_rotary_pos_embed
        from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

        c = self.model.config
        p, p_t = c.patch_size, c.patch_size_t
        grid = (x.shape[-2] // p, x.shape[-1] // p)  # = pixel size // (VAE factor * patch size)
        base_height, base_width = c.sample_height // p, c.sample_width // p
        if p_t is None:  # CogVideoX 1.0
            crops = get_resize_crop_region_for_grid(grid, base_width, base_height)
            return get_3d_rotary_pos_embed(embed_dim=c.attention_head_dim, crops_coords=crops, grid_size=grid,
                                           temporal_size=x.shape[1], device=x.device)
        return get_3d_rotary_pos_embed(embed_dim=c.attention_head_dim, crops_coords=None, grid_size=grid,
                                       temporal_size=(x.shape[1] + p_t - 1) // p_t, grid_type="slice",
                                       max_size=(base_height, base_width), device=x.device)


class CogVideoXBackbone(VideoFamily, DiffusersBackbone):
    """CogVideoX teacher. Samples [F, C, h, w] (latent frames first, the pipeline's layout); cond:
    prompt_embeds [B, 226, 4096]. `frames` counts pixel frames (CogVideoX-2b: 49 -> 13 latent frames)."""

    name = "cogvideox"
    pipeline_class = "CogVideoXPipeline"
    denoiser_class = CogVideoXDenoiser
    time_embedding_module = "model.time_embedding"
    denoiser_name = "transformer"
    lora_layers_kwarg = "transformer_lora_layers"
    is_video = True

    def __init__(self, *args, frames: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.frames = frames or self.denoiser.config.sample_frames
        self.temporal_factor = self.vae_config["temporal_compression_ratio"]

    @classmethod
    def init_kwargs(cls):
        return ("frames",)

    def default_latent_size(self):
        return self.denoiser.config.sample_height, self.denoiser.config.sample_width

    @property
    def padding_frames(self) -> int:
        """Latent frames CogVideoX 1.5 prepends to reach a multiple of patch_size_t (dropped when decoding)."""
        p_t = self.denoiser.config.patch_size_t
        latent = (self.frames - 1) // self.temporal_factor + 1
        return 0 if p_t is None or latent % p_t == 0 else p_t - latent % p_t

    @property
    def sample_shape(self):
        c, h, w = super().sample_shape
        return ((self.frames - 1) // self.temporal_factor + 1 + self.padding_frames, c, h, w)  # [F, C, h, w]

    def pipeline_kwargs(self):
        return {**super().pipeline_kwargs(), "num_frames": self.frames,
                "max_sequence_length": self.denoiser.config.max_text_seq_length}

    @classmethod
    def text_settings(cls, denoiser_config, own):
        # the text length the transformer was built for (CogVideoXTransformer3DModel's default: 226)
        return {"max_sequence_length": denoiser_config.get("max_text_seq_length", 226)}

    def decode(self, latents: Tensor) -> Tensor:
        """Latents [N, F, C, h, w] -> frames [N, F', 3, H, W] in [-1, 1] (padding frames dropped first)."""
        latents = latents[:, self.padding_frames:].permute(0, 2, 1, 3, 4) / self.vae.config.scaling_factor
        return self.vae.decode(latents, return_dict=False)[0].permute(0, 2, 1, 3, 4)  # [N, C, F', H, W] -> frames
