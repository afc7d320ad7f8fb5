"""What the trainer needs from a teacher family: one `Backbone` per family, built by the registry."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor, nn

from ..core.prediction import PredictionType
from ..core.sampling import Cond, linear_guidance
from ..core.schedules import Schedule


class Backbone(ABC):
    """A teacher with its schedule, prediction type, sample shape, conditioning source and metrics.

    `teacher` and `initial_weights()` are modules called as `module(x_t, t, cond) -> raw output`, where t is
    on the schedule's time axis and the output is tagged by `prediction`. The student and the fake score
    start as copies of `initial_weights()` (the teacher itself, or a fitted network for a closed-form teacher).

    Training needs only `teacher`, `schedule`, `prediction`, `sample_shape`, `sample_conditions` and
    `null_condition`; the evaluation methods have defaults (conditions drawn with a fixed seed, no metrics).
    """

    name: str  # the family's name in reports; defaults to the class name

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if not isinstance(getattr(cls, "name", None), str):
            cls.name = cls.__name__
    teacher: nn.Module
    schedule: Schedule
    prediction: PredictionType
    sample_shape: tuple[int, ...]  # one sample, e.g. (1, 8, 8); the batch dim is added by callers
    is_image: bool = False
    features_description: str = "the raw samples"  # what `features` measures, for reports
    needs_feature_network: bool = False  # True: `features` (e.g. latents) mean nothing to FD / KID; reports measure
                                         # them in an image network's features (Inception) or skip them
    time_embedding_module: str | None = None  # submodule of the network whose output is the timestep embedding
                                              # (where step conditioning adds its embedding; None = unsupported)
    lora_targets: tuple[str, ...] = ("attention",)  # train.roles=lora: layers adapted when train.lora_targets is ();
                                                    # attention: q, k, v and out projections, as diffusers' LoRA
                                                    # scripts for SD1.5, SDXL and CogVideoX
    guidance_rule = staticmethod(linear_guidance)  # the teacher's classifier-free guidance (core.sampling.guided)
    metrics_description: str = ""  # what the keys of `metrics` measure, one sentence for reports

    def initial_weights(self) -> nn.Module:
        return self.teacher

    @abstractmethod
    def sample_conditions(self, batch: int, generator: torch.Generator) -> Cond:
        """A training batch of conditions (the 'prompts'), drawn with `generator`."""

    def sample_prompted_conditions(self, batch: int, generator: torch.Generator) -> tuple[Cond, list[str] | None]:
        """`sample_conditions` (the same draw) and the prompts they encode, for rewards that read text (None: no
        text, e.g. class labels)."""
        return self.sample_conditions(batch, generator), None

    @abstractmethod
    def null_condition(self, batch: int) -> Cond:
        """The unconditional (empty-prompt) conditioning for classifier-free guidance."""

    def evaluation_conditions(self, num_samples: int) -> Cond:
        """Fixed, balanced conditions for evaluation and sample grids (default: `sample_conditions` drawn with
        seed 0, the same on every call)."""
        return self.sample_conditions(num_samples, torch.Generator().manual_seed(0))

    def evaluation_prompts(self, num_samples: int) -> list[str] | None:
        """The text of `evaluation_conditions(num_samples)`, for CLIP and preference scores (None: no text)."""
        return None

    def metrics(self, samples: Tensor, cond: Cond) -> dict[str, float]:
        """Quality metrics of generated samples [N, *sample_shape] for conditions `cond` (default: none)."""
        return {}

    def features(self, samples: Tensor) -> Tensor:
        """Features [N, D] in which Frechet distances between sample sets are measured."""
        return samples.flatten(1)

    def floor_metrics(self, num_samples: int) -> dict[str, float]:
        """`metrics` of real data in place of samples: the noise floor every table should show (default: none,
        for a teacher without real data)."""
        return {}

    def to_images(self, samples: Tensor) -> Tensor:
        """Samples -> images [N, C, H, W] in [0, 1] for grids (image backbones only)."""
        raise NotImplementedError(f"{self.name} does not produce images")
