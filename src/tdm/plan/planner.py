"""`tdm plan`: what a preset needs per GPU and per iteration, before any weight is downloaded.

The preset's network is built on the meta device from its shipped diffusers config (tdm.plan.architectures): its
parameters are counted, its FLOPs and saved activations counted at one sample (tdm.plan.counting) and scaled by the
batch; memory per GPU follows tdm.plan.memory's model; time per iteration is the counted FLOPs at a stated MFU."""

from __future__ import annotations

import torch

from ..config import Config
from ..errors import ConfigError
from ..sharding import gathered_params
from .architectures import ARCHITECTURES, Architecture, check_latent
from .counting import (
    checkpointed_activations,
    count_flops,
    make_trainable,
    passes,
    role_settings,
    saved_bytes,
    schedule_flops,
)
from .memory import ADAM_MOMENTS, FLOAT32, Counts, layout_memory

STRATEGIES = ("lora", "separate")
SHARDINGS = ("ddp", "fsdp")
GIB = 2**30
MARGIN = 0.15  # a peak this close to the limit is "tight": the estimate ran up to 6% under the mid UNet's peaks


def architecture_for(config: Config) -> Architecture:
    """The shipped architecture of the config's family at its sample size; where the family has two at that size
    (Wan 2.1 14B and Wan 2.2 A14B), the one released as the config's teacher, else the first."""
    candidates = sorted((a for a in ARCHITECTURES.values() if a.family == config.backbone.name),
                        key=lambda a: a.teacher != config.backbone.teacher)  # stable: the shipped order otherwise
    if not candidates:
        shipped = sorted({a.family for a in ARCHITECTURES.values()})
        raise ConfigError(f"backbone.name: no shipped architecture config for {config.backbone.name!r} to plan "
                          f"with (shipped: {', '.join(shipped)})")
    for arch in candidates:
        try:
            check_latent(arch, config)
            return arch
        except ConfigError:
            continue
    check_latent(candidates[0], config)  # raises, naming the mismatch
    raise AssertionError("unreachable")


def count_strategy(arch: Architecture, settings: dict, strategy: str, dtype: torch.dtype,
                   autocast: bool = False) -> tuple[Counts, dict]:
    """(memory counts at the settings' batch, TFLOP per sample of each pass) for one role strategy, with the network
    in `dtype` on the meta device (`autocast`: mixed precision computes in `dtype`)."""
    model = arch.build("meta", dtype)
    x, t, kwargs = arch.inputs(1, "meta", dtype)

    def run(m):
        return arch.call(m, x, t, kwargs)

    base = sum(p.numel() for p in model.parameters())
    gathered = gathered_params(model)  # the units tdm.sharding shards
    with torch.no_grad():
        teacher, _ = count_flops(lambda: run(model))
    make_trainable(model, strategy, settings["lora_rank"], settings["lora_targets"])
    trainable = [p for p in model.parameters() if p.requires_grad]
    if strategy == "lora" and not autocast:  # float32 adapters on the base: peft casts their inputs up, and
        for p in trainable:                      # saves those (under autocast they are cast back to `dtype`)
            p.data = p.data.float()
    saved, _ = saved_bytes(model, lambda: run(model))
    checkpointed = checkpointed_activations(model, run)  # turns checkpointing on
    if not settings["gradient_checkpointing"]:
        model.disable_gradient_checkpointing()
    counted = passes(model, run)
    batch = settings["batch_size"]
    # every expert is held and trained (its own adapters or copies); one runs per call
    counts = Counts(base * arch.experts, sum(p.numel() for p in trainable) * arch.experts, saved * batch,
                    checkpointed * batch, gathered)
    flops = {"teacher_forward": teacher, "forward": counted["forward"],
             "forward_backward": counted["forward_grad"] + counted["backward"]}
    return counts, {k: v / 1e12 for k, v in flops.items()}


def dtypes(config: Config, strategy: str) -> tuple[torch.dtype, torch.dtype, bool]:
    """(the frozen base's dtype, the dtype activations are counted in, whether that is mixed precision's): the
    compute dtype of mixed precision, else the base's (lora) or float32 (separate: float32 copies)."""
    base = getattr(torch, config.backbone.dtype)
    mixed = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.train.mixed_precision)
    return base, mixed or (base if strategy == "lora" else torch.float32), mixed is not None


def plan(config: Config, gpus: int, gpu_memory_gib: float, mfu: float, peak_tflops: float,
         arch: Architecture | None = None) -> dict:
    """Counts, per-GPU memory of every (sharding, strategy) layout and time per iteration for `config`."""
    for name, value in (("--gpus", gpus), ("--gpu-memory", gpu_memory_gib), ("--peak-tflops", peak_tflops)):
        if value <= 0:
            raise ConfigError(f"{name}: expected a positive number, got {value}")
    if not 0 < mfu <= 1:
        raise ConfigError(f"--mfu: expected a fraction in (0, 1], got {mfu}")
    arch = arch or architecture_for(config)
    settings = role_settings(config, arch.family)
    checkpointing = settings["gradient_checkpointing"]
    result = {"architecture": arch.name, "model_class": arch.model_class, "settings": settings, "gpus": gpus,
              "gpu_memory_gib": gpu_memory_gib, "mfu": mfu, "peak_tflops": peak_tflops,
              "generator_forward": config.train.generator_forward, "strategies": {}, "layouts": {}}
    for strategy in STRATEGIES:
        base_dtype, compute_dtype, autocast = dtypes(config, strategy)
        counts, flops = count_strategy(arch, settings, strategy, compute_dtype, autocast)
        iteration = schedule_flops(flops, settings["num_steps"], settings["guidance_scale"])["tdm"]
        per_gpu = settings["batch_size"] * iteration["total"]
        result["strategies"][strategy] = {
            "counts": counts, "base_dtype": str(base_dtype).removeprefix("torch."),
            "compute_dtype": str(compute_dtype).removeprefix("torch."),
            "optimiser_bytes_per_role": ADAM_MOMENTS * FLOAT32 * counts.trainable_params,
            "tflop_per_sample": iteration, "tflop_per_iteration_per_gpu": per_gpu,
            "seconds_per_iteration": per_gpu / (mfu * peak_tflops)}
        for sharding in SHARDINGS:
            memory = layout_memory(counts, sharding, gpus, base_dtype.itemsize, compute_dtype.itemsize,
                                   checkpointing, config.train.generator_forward)
            limit = gpu_memory_gib * GIB
            fits = "yes" if memory["peak"] <= (1 - MARGIN) * limit else "tight" if memory["peak"] <= limit else "no"
            result["layouts"][f"{sharding}/{strategy}"] = {**memory, "fits": fits}
    return result
