"""diffusers-denoiser: a bare diffusers network from a `save_pretrained` folder, without a text-to-image pipeline.

`UNet2DModel` (unconditional, or class-conditional through `num_class_embeds`, whose last class is the
unconditional one of classifier-free guidance) or `DiTTransformer2DModel` (class-conditional; its unconditional
class is `num_embeds_ada_norm`, as DiTPipeline passes it). The noise schedule and prediction come from a diffusers
scheduler config found next to the network (see `find_parts`). Samples are pixels in [-1, 1] when the network has
1 or 3 channels, images decoded by the folder's `vae/` when it has one, else latents (not images).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ..core.schedules import Schedule
from ..errors import ConfigError
from .base import Backbone
from .diffusers_base import DiffusersDenoiser
from .diffusers_pipeline import import_diffusers
from .diffusers_schedule import schedule_from_config

NETWORKS = {"UNet2DModel": "unet", "DiTTransformer2DModel": "transformer"}  # class -> its pipeline subfolder
SCHEDULER_FILE = "scheduler_config.json"


class BareDenoiser(DiffusersDenoiser):
    """network(x_t, t, class_labels) for a class-conditional network, network(x_t, t) otherwise; the learned-
    variance half of a DiT's output is dropped."""

    def __init__(self, model: nn.Module, schedule: Schedule, conditional: bool):
        super().__init__(model, schedule)
        self.conditional = conditional

    def call(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        out = self.model(x, t, class_labels=cond if self.conditional else None, return_dict=False)[0]
        if out.shape[1] == 2 * x.shape[1]:  # learned sigma: [eps, variance] along channels
            out = out.chunk(2, dim=1)[0]
        return out


@dataclass(frozen=True)
class DenoiserParts:
    network: Path            # the network's save_pretrained folder (config.json + weights)
    scheduler: Path          # its scheduler_config.json
    vae: Path | None = None  # a VAE folder next to it, if any


def _scheduler_file(path: Path) -> Path | None:
    for candidate in (path, path / SCHEDULER_FILE, path / "scheduler" / SCHEDULER_FILE):
        if candidate.is_file():
            return candidate
    return None


def find_parts(folder: str | Path, scheduler: str | Path = "") -> DenoiserParts:
    """The network, scheduler config and VAE of `folder`: a network's own folder (its scheduler_config.json in it
    or in scheduler/ beside its config) or a pipeline folder (unet/ or transformer/, scheduler/, vae/).
    `scheduler` (a scheduler_config.json or a folder holding one) overrides the folder's."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"backbone.teacher: {folder} is not a folder (expected a diffusers network saved with "
                          f"save_pretrained, or a pipeline folder holding one)")
    network = next((folder / sub for sub in ("", *NETWORKS.values()) if (folder / sub / "config.json").is_file()),
                   None)
    if network is None:
        raise ConfigError(f"backbone.teacher: {folder} holds no config.json of a diffusers network (nor in unet/ or "
                          f"transformer/)")
    found = _scheduler_file(Path(scheduler)) if scheduler else (_scheduler_file(network) or _scheduler_file(folder))
    if found is None:
        where = f"backbone.scheduler: {scheduler} holds" if scheduler else f"backbone.teacher: {folder} holds"
        raise ConfigError(f"{where} no {SCHEDULER_FILE} (save the teacher's scheduler with "
                          f"scheduler.save_pretrained(FOLDER), or set backbone.scheduler to one)")
    vae = folder / "vae" if (folder / "vae" / "config.json").is_file() else None
    return DenoiserParts(network, found, vae)


class DiffusersDenoiserBackbone(Backbone):
    """A bare UNet2DModel or DiTTransformer2DModel teacher. Cond: class labels [B] (long; zeros when unconditional)."""

    name = "diffusers-denoiser"
    time_embedding_module = "model.time_embedding"  # UNet2DModel's; None for DiT (set in __init__)
    needs_feature_network = True  # latents or pixels: FD needs an image network

    def __init__(self, network: nn.Module, scheduler, vae: nn.Module | None = None):
        network_class = type(network).__name__
        if network_class not in NETWORKS:
            raise ConfigError(f"backbone.teacher: diffusers-denoiser loads {sorted(NETWORKS)}, got {network_class}")
        config = network.config
        self.denoiser_name = NETWORKS[network_class]
        if network_class == "DiTTransformer2DModel":
            self.num_classes, self.null_class = config.num_embeds_ada_norm, config.num_embeds_ada_norm
            self.time_embedding_module = None
        else:
            if config.class_embed_type is not None:
                raise ConfigError(f"backbone.teacher: class_embed_type={config.class_embed_type!r} is not supported "
                                  f"(class labels through num_class_embeds only)")
            classes = config.num_class_embeds or 0
            if classes == 1:
                raise ConfigError("backbone.teacher: num_class_embeds=1 leaves no class beside the unconditional one "
                                  "(the last class)")
            self.num_classes, self.null_class = max(classes - 1, 0), max(classes - 1, 0)
        self.scheduler, self.vae = scheduler, vae
        self.schedule, self.prediction = schedule_from_config(scheduler)
        self.teacher = BareDenoiser(network, self.schedule, conditional=self.num_classes > 0)
        size = config.sample_size
        height, width = (size, size) if isinstance(size, int) else size
        self.sample_shape = (config.in_channels, height, width)
        self.is_image = vae is not None or config.in_channels in (1, 3)
        self.features_description = "the raw samples (latents or pixels)"

    @classmethod
    def from_folder(cls, folder: str | Path, scheduler: str | Path = "",
                    dtype: torch.dtype = torch.float32) -> DiffusersDenoiserBackbone:
        diffusers = import_diffusers()
        parts = find_parts(folder, scheduler)
        network_class = json.loads((parts.network / "config.json").read_text()).get("_class_name")
        if network_class not in NETWORKS:
            raise ConfigError(f"backbone.teacher: {parts.network} holds a {network_class}; diffusers-denoiser loads "
                              f"{sorted(NETWORKS)}")
        network = getattr(diffusers, network_class).from_pretrained(parts.network, dtype=dtype)
        scheduler_config = json.loads(parts.scheduler.read_text())
        scheduler_cls = getattr(diffusers, scheduler_config.get("_class_name", ""), None)
        if scheduler_cls is None:
            raise ConfigError(f"{parts.scheduler}: _class_name {scheduler_config.get('_class_name')!r} is not a "
                              f"diffusers scheduler")
        vae = None
        if parts.vae is not None:
            vae = diffusers.AutoencoderKL.from_pretrained(parts.vae, dtype=dtype).eval().requires_grad_(False)
        return cls(network.requires_grad_(False), scheduler_cls.from_config(scheduler_config), vae)

    @property
    def denoiser(self) -> nn.Module:
        return self.teacher.model

    def sample_conditions(self, batch: int, generator: torch.Generator) -> Tensor:
        if not self.num_classes:
            return torch.zeros(batch, dtype=torch.long)
        return torch.randint(0, self.num_classes, (batch,), generator=generator)

    def null_condition(self, batch: int) -> Tensor:
        return torch.full((batch,), self.null_class, dtype=torch.long)

    def evaluation_conditions(self, num_samples: int) -> Tensor:
        """Balanced classes 0, 1, ..., in turn (zeros when unconditional)."""
        if not self.num_classes:
            return torch.zeros(num_samples, dtype=torch.long)
        return torch.arange(num_samples) % self.num_classes

    @torch.no_grad()
    def to_images(self, samples: Tensor) -> Tensor:
        """Samples -> images [N, C, H, W] in [0, 1] on the CPU: decoded by the VAE, or pixels in [-1, 1]."""
        if not self.is_image:
            raise ConfigError(f"{self.name}: the samples are {self.sample_shape[0]}-channel latents without a VAE, "
                              f"not images")
        if self.vae is not None:
            vae = self.vae.to(samples.device)
            config = vae.config
            latents = (samples / config.scaling_factor + (getattr(config, "shift_factor", None) or 0.0)).to(vae.dtype)
            samples = torch.cat([vae.decode(part, return_dict=False)[0] for part in latents.split(8)])
        return (samples.float() / 2 + 0.5).clamp(0, 1).cpu()
