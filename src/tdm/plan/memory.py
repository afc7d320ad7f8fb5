"""Per-GPU memory of one TDM iteration, estimated from counted parameters and activations (tdm.plan.counting).

The model, per GPU, with P the trainable parameters of one role (student and fake score have the same), B the frozen
base, b the base's bytes per parameter, A the bytes one forward with grad saves at the batch:
- weights: lora: B x b + 2 adapters x P x 4 (float32); separate: the teacher B x b + 2 float32 copies P x 4.
- optimiser states: AdamW's two float32 moments for each of the 2 roles: 16 P.
- gradients: the updating role's, 4 P, and during its AdamW step a float32 temporary as large (torch's foreach
  AdamW computes the denominator sqrt(v) + eps out of place; the fused step tdm takes where torch has the kernel
  needs none, so there this term is an upper bound, by 4 P at most): 4 P more; and the other role's, 4 P, held from its
  last update through this one (each update sets only its own gradients to None, before its backward, as tdm's
  trainer does), so after the first iteration both roles' gradients are resident throughout.
- activations: the generator's student forward under train.generator_forward=rollout is taken from the rollout and
  held through the fake score's update (A + max(A, step)); recompute holds one set at a time (max(A, step)).
- DDP (more than one process): float32 gradient buckets for each of the 2 wrapped roles, 8 P.
- FSDP over N GPUs: weights, both gradients, optimiser states and the step temporary divided by N, plus the weights
  gathered at once in the compute dtype: the root network's own and twice the largest unit's own (the one
  computing and the one prefetched), units as tdm.sharding shards them (the blocks a model declares, e.g. a
  UNet's transformer and resnet blocks inside its up blocks); communication buffers are not counted.
Not counted: the no-grad teacher and fake-score forwards' transient tensors, the allocator's fragmentation, the
CUDA context and kernels' workspaces, the text encoders and VAE (prompt embeddings are cached)."""

from __future__ import annotations

from dataclasses import dataclass

FLOAT32 = 4
ADAM_MOMENTS = 2
ROLES = 2  # trainable roles: student and fake score


@dataclass(frozen=True)
class Counts:
    """What one role strategy's memory depends on, counted on the meta device."""
    base_params: int        # the frozen network's weights
    trainable_params: int   # one trainable role's (an adapter, or a full copy)
    activations: int        # bytes saved by one forward with grad at the batch, without checkpointing
    activations_checkpointed: int  # the same under gradient checkpointing
    gathered_params: int  # weights FSDP holds gathered at once (tdm.sharding.gathered_params)


def layout_memory(counts: Counts, sharding: str, gpus: int, base_bytes: int, compute_bytes: int,
                  checkpointing: bool, generator_forward: str) -> dict[str, int]:
    """Bytes per GPU by component, and their `peak`, of one role strategy's `counts` under `sharding` (ddp | fsdp)
    over `gpus`; `base_bytes` per frozen weight, `compute_bytes` per gathered weight."""
    p = counts.trainable_params
    base = counts.base_params * base_bytes
    weights = base + ROLES * p * FLOAT32
    shard = gpus if sharding == "fsdp" else 1
    parts = {
        "weights": weights // shard,
        "optimiser": ROLES * ADAM_MOMENTS * p * FLOAT32 // shard,
        "gathered": counts.gathered_params * compute_bytes if sharding == "fsdp" else 0,
        "ddp_buckets": ROLES * p * FLOAT32 if sharding == "ddp" and gpus > 1 else 0,
        "gradients_held": (ROLES - 1) * p * FLOAT32 // shard,  # the other role's, from its last update
        "gradients_and_step": 2 * p * FLOAT32 // shard,
        "activations": counts.activations_checkpointed if checkpointing else counts.activations,
    }
    step = max(parts["activations"], parts["gradients_and_step"])
    held = parts["activations"] if generator_forward == "rollout" else 0
    static = parts["weights"] + parts["optimiser"] + parts["gathered"] + parts["ddp_buckets"] + parts["gradients_held"]
    return {**parts, "peak": static + held + step}
