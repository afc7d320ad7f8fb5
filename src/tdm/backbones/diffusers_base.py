"""What every diffusers teacher family shares: loading, the denoiser call, the sample shape, lazy VAE decoding.

A family file (sd_unet.py, sdxl.py, pixart.py, sd3.py, cogvideox.py) subclasses `DiffusersDenoiser` (how to call
its network: timestep scaling, added conditions, learned-sigma split; method.md Decision 2) and `DiffusersBackbone`
(which pipeline, its latent layout, how it encodes prompts: the hooks of diffusers_conditioning.py, run by the
pipeline's own `encode_prompt`). diffusers, transformers and peft are imported lazily: `import tdm` works without.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..core.sampling import Cond, map_cond
from ..core.schedules import Schedule
from ..data.cache import EmbeddingCache
from ..data.conditioning import PromptConditioner
from ..data.prompt_conditions import PromptConditions
from ..errors import ConfigError
from ..meta_init import denoiser_on_meta_requested, on_meta
from .base import Backbone
from .diffusers_conditioning import DiffusersConditioning
from .diffusers_pipeline import check_local_parts, check_pipeline_class, import_diffusers, pipeline_folder
from .diffusers_schedule import schedule_from_config


class DiffusersDenoiser(nn.Module):
    """`module(x_t, t, cond) -> raw output` around a diffusers UNet or transformer (`self.model`).

    t is on the tdm schedule's time axis. Inputs are cast to the network's dtype at this boundary and the output
    comes back in float32 (architecture.md principle 10); `call` holds the family's quirks. peft adapters
    (student, fake score) are injected into `self.model`.
    """

    def __init__(self, model: nn.Module, schedule: Schedule):
        super().__init__()
        self.model, self.schedule = model, schedule

    def forward(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        dtype = self.model.dtype
        cond = map_cond(lambda v: v.to(dtype) if v.is_floating_point() else v, cond)
        return self.call(x_t.to(dtype), t, cond).float()

    def call(self, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        raise NotImplementedError


class DiffusersBackbone(DiffusersConditioning, Backbone):
    """A text-conditioned diffusers teacher: `teacher`, schedule and prediction from its scheduler config,
    conditions drawn from its prompts (`conditions`: dicts of tensors on `self.device`, batched along dim 0),
    samples decoded by its VAE (loaded on first use)."""

    pipeline_class: ClassVar[str]            # the stock diffusers pipeline of the family
    denoiser_class: ClassVar[type[DiffusersDenoiser]]
    denoiser_name: ClassVar[str]             # the pipeline component holding the network: unet | transformer
    lora_layers_kwarg: ClassVar[str | None]  # `save_lora_weights` argument for it; None: no diffusers LoRA loader
    pipeline_load_kwargs: ClassVar[dict[str, Any]] = {}  # extra `from_pretrained` kwargs (components to skip)
    unguided_scale: ClassVar[float] = 1.0  # the `pipe(...)` guidance_scale that runs one unguided branch (exports)
    is_image = True
    features_description = "the raw latents (no image metric is built in for diffusers teachers)"
    needs_feature_network = True

    def __init__(self, pipeline, vae_config: dict, conditioner: PromptConditioner, *, prompts: Sequence[str] = (),
                 height: int = 0, width: int = 0, negative_prompt: str | None = None):
        self.pipeline, self.vae_config, self.conditioner = pipeline, vae_config, conditioner
        self.source, self.dtype, self.device = conditioner.source, conditioner.dtype, conditioner.device
        self.conditions = PromptConditions(conditioner, family=self.name, prompts=prompts,
                                           negative_prompt=negative_prompt, add_conditions=self.add_conditions,
                                           null_text=self.null_text)
        self.vae_scale_factor = self.vae_factor(vae_config)
        default_h, default_w = (s * self.vae_scale_factor for s in self.default_latent_size())
        self.height, self.width = height or default_h, width or default_w
        step = self.vae_scale_factor * self.patch_size()
        for key, size in (("height", self.height), ("width", self.width)):
            if size % step:
                raise ConfigError(f"backbone.{key}: {self.name} needs a multiple of {step} pixels "
                                  f"(VAE factor x patch size), got {size}")
        self.fix_scheduler()
        self.schedule, self.prediction = schedule_from_config(pipeline.scheduler)
        self.teacher = self.denoiser_class(self.denoiser, self.schedule)
        self._vae = None

    # ---- loading ----
    @classmethod
    def from_pretrained(cls, source: str, *, prompts: Sequence[str] = (), height: int = 0, width: int = 0,
                        negative_prompt: str | None = None, dtype: torch.dtype = torch.float32,
                        device: torch.device | str = "cpu", prompt_cache: str | Path = "",
                        **kwargs) -> DiffusersBackbone:
        """Load the family's pipeline (without its VAE) from a hub id or a local folder, in `dtype`, on `device`.

        `prompt_cache` (a folder, "" = none): read text embeddings from the on-disk cache there. The text encoders
        are loaded only if `prompts` or the null prompt are missing from it; those are encoded into it, and the
        encoders released. `kwargs` go to the family's constructor (e.g. `frames`, `text_encoder_3`) or else to
        the pipeline's `from_pretrained` (e.g. `variant`, `revision`)."""
        diffusers = import_diffusers()
        check_pipeline_class(source, cls.pipeline_class, cls.name, revision=kwargs.get("revision"))
        own = {k: kwargs.pop(k) for k in cls.init_kwargs() if k in kwargs}
        text, load = cls.text_encoding(own), {**cls.pipeline_load_kwargs, **cls.extra_load_kwargs(own), **kwargs}
        cache = None
        if prompt_cache:
            folder = pipeline_folder(cls.pipeline_class, source, vae=None, **load)
            cache = EmbeddingCache(prompt_cache, text.fingerprint(folder, dtype))
            if not cache.missing([*prompts, negative_prompt or ""]):
                load.update(dict.fromkeys(text.parts))  # all cached: the text encoders are not loaded
        check_local_parts(source, [part for part in text.parts if part not in load], cls.name)
        if denoiser_on_meta_requested():  # sharded loading: this rank receives its shards of rank 0's weights
            load.update(cls.meta_networks(source, dtype, kwargs.get("revision")))
        pipeline = getattr(diffusers, cls.pipeline_class).from_pretrained(source, vae=None, dtype=dtype, **load)
        vae_config = diffusers.AutoencoderKL.load_config(source, subfolder="vae", revision=kwargs.get("revision"))
        for module in pipeline.components.values():  # a meta network stays there until it is sharded
            if isinstance(module, nn.Module) and not on_meta(module):
                module.to(device)
        for name, module in pipeline.components.items():
            if isinstance(module, nn.Module) and name != cls.denoiser_name:
                module.requires_grad_(False)  # frozen parts: text encoders
        conditioner = PromptConditioner(pipeline, text, text.settings_of(getattr(pipeline, cls.denoiser_name).config),
                                        source=source, dtype=dtype, device=device, cache=cache)
        backbone = cls(pipeline, dict(vae_config), conditioner, prompts=prompts, height=height, width=width,
                       negative_prompt=negative_prompt, **own)
        backbone.conditions.prepare()
        return backbone

    @classmethod
    def meta_networks(cls, source: str, dtype: torch.dtype, revision: str | None = None) -> dict[str, nn.Module]:
        """The pipeline's networks to shard (the denoiser and `other_networks` it has, e.g. Wan 2.2's
        transformer_2), each built from its config on the meta device in `dtype`: no weights read
        (tdm.meta_init)."""
        diffusers = import_diffusers()
        index = getattr(diffusers, cls.pipeline_class).load_config(source, revision=revision)
        networks = {}
        for name in (cls.denoiser_name, *cls.other_networks):
            class_name = (index.get(name) or [None, None])[1]
            if class_name is None:  # an optional network the pipeline does not have (Wan 2.1: transformer_2)
                continue
            network_class = getattr(diffusers, class_name)
            config = network_class.load_config(source, subfolder=name, revision=revision)
            with torch.device("meta"):
                networks[name] = network_class.from_config(config).to(dtype).eval()
        return networks

    def fix_scheduler(self) -> None:
        """Make `pipeline.scheduler` one fixed noise process at this backbone's sample size, before the schedule
        is read from it (FLUX: its resolution-dependent shift evaluated here); by default it is one already."""

    @classmethod
    def vae_factor(cls, vae_config: dict) -> int:
        """Pixels per latent along height and width, from the VAE's config (AutoencoderKL's)."""
        return 2 ** (len(vae_config["block_out_channels"]) - 1)

    @classmethod
    def init_kwargs(cls) -> tuple[str, ...]:
        """Family-specific constructor arguments accepted by `from_pretrained`."""
        return ()

    @classmethod
    def extra_load_kwargs(cls, own: dict) -> dict:
        """Pipeline `from_pretrained` kwargs that depend on family arguments (SD3: skip T5)."""
        return {}

    def component_overrides(self) -> dict:
        """Pipeline components this backbone was loaded without (JSON-safe), for loading the pipeline again."""
        return self.extra_load_kwargs({k: getattr(self, k) for k in self.init_kwargs()})

    def to(self, device: torch.device | str) -> DiffusersBackbone:
        """Move the pipeline (network, text encoders) and a loaded VAE to `device`; conditions follow."""
        self.device = torch.device(device)
        self.conditions.to(self.device)
        self.pipeline.to(self.device)
        if self._vae is not None:
            self._vae.to(self.device)
        return self

    # ---- the denoiser and the sample shape ----
    @property
    def denoiser(self) -> nn.Module:
        return getattr(self.pipeline, self.denoiser_name)

    def default_latent_size(self) -> tuple[int, int]:
        """The network's native latent (height, width); the pipeline's default size divided by the VAE factor."""
        size = self.denoiser.config.sample_size
        return size, size

    def patch_size(self) -> int:
        return getattr(self.denoiser.config, "patch_size", None) or 1

    @property
    def sample_shape(self) -> tuple[int, ...]:
        f = self.vae_scale_factor
        return (self.denoiser.config.in_channels, self.height // f, self.width // f)  # [C, H/f, W/f]

    def pipeline_kwargs(self) -> dict[str, Any]:
        """`pipe(...)` arguments under which the stock pipeline encodes prompts and sizes samples as we do."""
        return {"height": self.height, "width": self.width}

    # ---- decoding ----
    @property
    def vae(self) -> nn.Module:
        """The pipeline's VAE, loaded on first use (previews and evaluation only), in float32 if it asks to be
        upcast (SDXL's fp16 VAE overflows)."""
        if self._vae is None:
            diffusers = import_diffusers()
            vae_cls = getattr(diffusers, self.vae_config.get("_class_name", "AutoencoderKL"))
            dtype = torch.float32 if self.vae_config.get("force_upcast") else self.dtype
            self._vae = vae_cls.from_pretrained(self.source, subfolder="vae", dtype=dtype)
            self._vae.requires_grad_(False).eval().to(self.device)
        return self._vae

    def decode(self, latents: Tensor) -> Tensor:
        """Latents [N, C, h, w] -> pixels [N, 3, H, W] in [-1, 1], as the pipeline decodes them."""
        config = self.vae.config
        latents = latents / config.scaling_factor + (getattr(config, "shift_factor", None) or 0.0)
        return self.vae.decode(latents, return_dict=False)[0]

    @torch.no_grad()
    def decode_to_unit(self, samples: Tensor, chunk: int = 8) -> Tensor:
        """`decode` in chunks of `chunk` samples, mapped to [0, 1], on the CPU."""
        out = []
        for part in samples.split(chunk):
            pixels = self.decode(part.to(self.device, self.vae.dtype))
            out.append((pixels.float() / 2 + 0.5).clamp(0, 1).cpu())
        return torch.cat(out)

    def to_images(self, samples: Tensor) -> Tensor:
        """Samples -> images [N, 3, H, W] in [0, 1] on the CPU, for grids."""
        return self.decode_to_unit(samples)
