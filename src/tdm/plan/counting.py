"""Counted, not estimated: FLOPs (torch's FlopCounterMode) and the bytes a forward saves for its backward (autograd's
saved-tensor hooks) of a network on the meta device, which has shapes and no memory.

The FLOP counter counts matmuls, convolutions and attention (2 FLOPs per multiply-add), not norms or elementwise
ops: the usual MFU convention. On meta, attention runs as plain matmuls, so its backward counts 2 forwards (a fused
GPU kernel's count adds the recomputed scores: 2.5). Saved bytes are every distinct tensor autograd keeps for the
backward, weights excluded, with attention saving what a fused kernel saves (query, key, value, output, mask and
a float32 log-sum-exp per query: flash and memory-efficient attention on GPU, torch's flash kernel on CPU) rather
than the score matrix of meta's plain matmuls; under gradient checkpointing the checkpointed blocks save only their
inputs, and the recompute in the backward holds one block's activations at a time (`checkpointed_activations`)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode

from ..config import Config
from ..registry import diffusers_family
from ..roles import resolve_targets


def count_flops(fn: Callable[[], object]) -> tuple[int, object]:
    """(FLOPs counted while `fn` runs, its result)."""
    with FlopCounterMode(display=False) as counter:
        result = fn()
    return counter.get_total_flops(), result


class _FusedAttention(torch.autograd.Function):
    """Attention that saves for its backward what a fused kernel saves; only counted, never differentiated."""

    @staticmethod
    def forward(ctx, q, k, v, kwargs):
        with torch.no_grad():
            out = F.scaled_dot_product_attention(q, k, v, **kwargs)
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        mask = kwargs.get("attn_mask")
        ctx.save_for_backward(q, k, v, out, lse, *([mask] if isinstance(mask, Tensor) else []))
        return out

    @staticmethod
    def backward(ctx, grad):
        raise NotImplementedError("tdm.plan counts the saved tensors of this attention; it has no backward")


class _FusedAttentionMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and torch.is_grad_enabled():
            names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
            bound = {**dict(zip(names, args)), **kwargs}
            return _FusedAttention.apply(bound.pop("query"), bound.pop("key"), bound.pop("value"), bound)
        return func(*args, **kwargs)


def saved_bytes(model: nn.Module, fn: Callable[[], object]) -> tuple[int, object]:
    """(bytes of the distinct non-parameter tensors autograd saves for the backward while `fn` runs, its result;
    attention saving as a fused kernel: no backward through it)."""
    weights = {id(p) for p in model.parameters()}
    kept: dict[int, Tensor] = {}  # holding each tensor keeps its id unique

    def pack(t: Tensor) -> Tensor:
        root = t if t._base is None else t._base
        if id(root) not in weights:
            kept.setdefault(id(root), root)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _FusedAttentionMode():
        result = fn()
    return sum(t.untyped_storage().nbytes() for t in kept.values()), result


def passes(model: nn.Module, run: Callable[[nn.Module], Tensor]) -> dict[str, int]:
    """FLOPs of a no-grad forward, a forward with grad and its backward (loss = output.sum()) of `model` as it is:
    its requires_grad flags decide which gradients the backward computes, its checkpointing whether it recomputes."""
    with torch.no_grad():
        forward, _ = count_flops(lambda: run(model))
    forward_grad, out = count_flops(lambda: run(model))
    backward, _ = count_flops(lambda: out.float().sum().backward())
    return {"forward": forward, "forward_grad": forward_grad, "backward": backward}


def role_settings(config: Config, family: str) -> dict:
    """What the counting needs from a config: role strategy, LoRA rank and targets (the family's defaults unless
    train.lora_targets), checkpointing, batch, CFG and K."""
    train = config.train
    return {"roles": train.roles, "lora_rank": train.lora_rank,
            "lora_targets": list(train.lora_targets or diffusers_family(family).lora_targets),
            "batch_size": train.batch_size, "gradient_checkpointing": config.backbone.gradient_checkpointing,
            "guidance_scale": config.tdm.guidance_scale, "num_steps": config.tdm.num_steps}


def make_trainable(model: nn.Module, roles: str, rank: int, targets: list[str]) -> nn.Module:
    """roles=lora: a peft LoRA adapter of rank `rank` on the frozen model (eval mode, as tdm's shared base; its
    alpha scales values, not FLOPs); separate: every weight trainable (train mode, as tdm's copies)."""
    if roles == "separate":
        return model.train().requires_grad_(True)
    from peft import LoraConfig, inject_adapter_in_model

    model.eval().requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=resolve_targets(model, tuple(targets)))
    return inject_adapter_in_model(config, model, adapter_name="student")  # adapter weights: requires_grad


def checkpointed_activations(model: nn.Module, run: Callable[[nn.Module], Tensor]) -> int:
    """Bytes a forward with grad keeps under the model's (diffusers) gradient checkpointing: what runs outside the
    checkpointed blocks saves, the blocks' distinct input tensors, and the largest block's own saved bytes, which
    its recompute holds during the backward. Leaves checkpointing on."""
    inputs: dict[int, Tensor] = {}
    largest = 0

    def measured_block(block, *args):
        nonlocal largest
        inputs.update({id(a): a for a in args if isinstance(a, Tensor) and not isinstance(a, nn.Parameter)})
        held, out = saved_bytes(block, lambda: block(*args))
        largest = max(largest, held)
        return out

    model.enable_gradient_checkpointing(gradient_checkpointing_func=measured_block)
    outside, _ = saved_bytes(model, lambda: run(model))
    model.enable_gradient_checkpointing()
    return outside + sum(t.untyped_storage().nbytes() for t in inputs.values()) + largest


def expected_student_forwards(num_steps: int) -> float:
    """E[K - min(k_f, k_g) + 1], k_f and k_g independent and uniform on 1..K: level j runs unless both draws are
    above it, with probability 1 - ((K - j) / K)^2 (3.125 at K = 4)."""
    K = num_steps
    return sum(1 - ((K - j) / K) ** 2 for j in range(1, K + 1))


def schedule_flops(p: dict[str, float], num_steps: int, guidance_scale: float) -> dict:
    """Per sample-iteration cost of each role under both schedules, from `pass_flops`'s counts (any unit)."""
    cfg_calls = 2 if guidance_scale != 1 else 1
    fake = p["forward"] + p["forward_backward"]
    schedules = {
        "tdm": {"student": (expected_student_forwards(num_steps) - 1) * p["forward"] + p["forward_backward"],
                "teacher": cfg_calls * p["teacher_forward"], "fake": fake},
        "official": {"student": (num_steps + 1) * p["forward"] + p["forward_backward"],
                     "teacher": (1 + cfg_calls) * p["teacher_forward"], "fake": fake},
    }
    for roles in schedules.values():
        roles["total"] = sum(roles.values())
    return {**schedules, "ratio": schedules["tdm"]["total"] / schedules["official"]["total"]}
