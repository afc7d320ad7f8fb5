"""What the video families (CogVideoX, Wan) share: T5-style prompt encoding at a fixed token length, and samples
that decode to videos, shown in sample grids by their middle frame."""

from __future__ import annotations

from torch import Tensor


class VideoFamily:
    """Mixin before DiffusersBackbone: `encode_text` through the pipeline's `encode_prompt` at the family's
    `max_sequence_length`, `to_videos` and `to_images` from `decode_to_unit`."""

    @classmethod
    def encode_text(cls, pipeline, prompts, device, settings):
        embeds, _ = pipeline.encode_prompt(prompts, do_classifier_free_guidance=False, device=device,
                                           max_sequence_length=settings["max_sequence_length"])
        return {"prompt_embeds": embeds}

    def to_videos(self, samples: Tensor) -> Tensor:
        """Samples -> videos [N, F, 3, H, W] in [0, 1] on the CPU."""
        return self.decode_to_unit(samples)

    def to_images(self, samples: Tensor) -> Tensor:
        """The middle frame of each video [N, 3, H, W], for sample grids."""
        videos = self.to_videos(samples)
        return videos[:, videos.shape[1] // 2]
