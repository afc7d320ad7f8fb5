"""FSDP2 for TDM's roles: torch's `fully_shard` applied to each role's networks, driven by the FSDP settings of
`accelerate launch` (its config file's `distributed_type: FSDP` and `fsdp_config`, which it passes to every rank
as ACCELERATE_USE_FSDP and FSDP_* variables).

tdm shards the roles itself rather than through `Accelerator.prepare`: accelerate's FSDP2 preparation takes one
model per call with its optimiser, and TDM trains two networks next to a frozen one (or two adapters on one
frozen base, whose views are not modules FSDP can wrap); and accelerate runs FSDP only on accelerators, while a
CPU run (gloo) would silently get DDP from the same config. So the Accelerator is built as a plain multi-process
one (`accelerate_without_fsdp`) and this module shards:
- train.roles=separate: the teacher, the student, the fake score and the student's EMA, each a network of its own;
- train.roles=lora: the one frozen base with its adapters (student, fake, EMA), trainable fp32 LoRA weights and
  frozen base weights of any dtype in the same units; the views then see the sharded adapter weights.
A unit is each module whose class the config names (fsdp_transformer_layer_cls_to_wrap), else the network's
`_no_split_modules` (diffusers' and accelerate's transformer and resnet blocks), else each element of the
outermost ModuleLists; then the whole network (its remaining weights). Every unit, the whole network too, frees its
gathered weights after each forward, so the no-grad calls of the teacher and fake score keep none alive.

Gradients are reduce-scattered by FSDP during the backward (mean over ranks), so each rank holds the gradient
shard of its weight shard; optimisers, clipping, the EMA and the non-finite checks work on the shards (DTensors).
Checkpoints hold full tensors (`full_state` gathers them on every rank; `FullStateLoader` keeps each rank's
shard of them), so a run resumes on any process count.

With fsdp_cpu_ram_efficient_loading, rank 0 alone loads the teacher's weights; the other ranks build the networks
to shard on the meta device (tdm.meta_init) and the roles on them as rank 0 does. `shard_roles` then gives their
meta tensors rank 0's dtypes, shards every network, and sends rank 0's weights, tensor by tensor, into each rank's
shards (torch.distributed.checkpoint's broadcast from rank 0), buffers outside the state dict and the shared
base's fingerprint too; so a rank > 0 never holds more than its shards and one full tensor.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from .collectives import all_ranks_true
from .errors import ConfigError, TDMError
from .launch import LaunchError
from .meta_init import on_meta
from .registry import builds_on_meta
from .roles import AdapterView, Roles

MIXED_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class FSDPSettings:
    """The fsdp_config entries tdm honours."""
    reshard_after_forward: bool = True
    offload_params: bool = False
    unit_classes: tuple[str, ...] = ()  # fsdp_transformer_layer_cls_to_wrap; () = the networks' own blocks
    whole_networks: bool = False  # fsdp_auto_wrap_policy NO_WRAP: no units, each network is one
    from_rank0: bool = False  # fsdp_cpu_ram_efficient_loading: ranks > 0 build on meta and receive rank 0's weights


def _flag(name: str, default: str = "false") -> bool:
    return os.environ.get(name, default).lower() == "true"


def launch_settings() -> FSDPSettings | None:
    """The FSDP settings `accelerate launch` passed down, or None for a launch without FSDP. Settings tdm does not
    implement are errors or warnings naming the fsdp_config key, never silently dropped."""
    if not _flag("ACCELERATE_USE_FSDP"):
        return None
    version = os.environ.get("FSDP_VERSION", "1")
    if version != "2":
        raise LaunchError(f"fsdp_config.fsdp_version: tdm shards with FSDP2 only; set fsdp_version: 2 (got {version})")
    if _flag("FSDP_ACTIVATION_CHECKPOINTING"):
        raise LaunchError("fsdp_config.fsdp_activation_checkpointing: tdm checkpoints the diffusers families' "
                          "blocks itself (the LoRA roles route the recomputation through their adapter); set it to "
                          "false and set backbone.gradient_checkpointing=true")
    policy = os.environ.get("FSDP_AUTO_WRAP_POLICY", "TRANSFORMER_BASED_WRAP")
    if policy not in ("TRANSFORMER_BASED_WRAP", "NO_WRAP"):
        raise LaunchError(f"fsdp_config.fsdp_auto_wrap_policy: tdm shards TRANSFORMER_BASED_WRAP units (the "
                          f"classes fsdp_transformer_layer_cls_to_wrap names, else the model's blocks) or NO_WRAP "
                          f"(each network whole), not {policy}")
    classes = os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "")
    return FSDPSettings(reshard_after_forward=_flag("FSDP_RESHARD_AFTER_FORWARD", "true"),
                        offload_params=_flag("FSDP_OFFLOAD_PARAMS"),
                        unit_classes=tuple(c.strip() for c in classes.split(",") if c.strip()),
                        whole_networks=policy == "NO_WRAP",
                        from_rank0=_flag("FSDP_CPU_RAM_EFFICIENT_LOADING"))


@contextlib.contextmanager
def accelerate_without_fsdp() -> Iterator[None]:
    """Build the Accelerator inside: with ACCELERATE_USE_FSDP hidden it is a plain multi-process one (MULTI_GPU)
    on GPUs, as it is on the CPU, where accelerate ignores FSDP anyway; this module shards."""
    saved = os.environ.pop("ACCELERATE_USE_FSDP", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["ACCELERATE_USE_FSDP"] = saved


def check_config(config, mixed_precision: str, settings: FSDPSettings) -> None:
    """Training options that do not combine with FSDP here, before anything is loaded."""
    if settings.from_rank0 and not builds_on_meta(config.backbone.name):
        raise LaunchError(f"fsdp_config.fsdp_cpu_ram_efficient_loading: backbone {config.backbone.name} cannot be "
                          f"built without its weights on ranks > 0 (supported: digits and the diffusers families); "
                          f"set it to false")
    if config.train.compile:
        raise ConfigError("train.compile: not supported under FSDP by tdm yet; set train.compile=false")
    if mixed_precision == "fp16":
        raise ConfigError("mixed_precision fp16: not supported under FSDP by tdm (the grad scaler would judge "
                          "overflows on each rank's gradient shard alone); use bf16")
    if config.train.fp32_signal and mixed_precision in MIXED_DTYPES:
        raise ConfigError(f"train.fp32_signal: under FSDP with mixed_precision={mixed_precision} the sharded "
                          f"weights are gathered in {mixed_precision}, so the teacher and fake score cannot run in "
                          f"float32; set train.fp32_signal=false or mixed precision no")


def units(network: nn.Module, classes: tuple[str, ...] = ()) -> list[nn.Module]:
    """The modules sharded as units of `network`, innermost first: those of `classes`, else of the blocks the
    network's models declare (`_no_split_modules`, as accelerate reads them), else the outermost ModuleLists'
    elements that hold weights."""
    classes = classes or tuple(c for m in network.modules() for c in getattr(m, "_no_split_modules", None) or ())
    if classes:
        found = [m for m in network.modules() if type(m).__name__ in classes and m is not network]
    else:
        found, inside = [], set()
        for parent in network.modules():
            if isinstance(parent, nn.ModuleList) and id(parent) not in inside:
                found += [m for m in parent if any(True for _ in m.parameters())]
                inside.update(id(m) for m in parent.modules())
    return found[::-1]


def gathered_params(network: nn.Module, classes: tuple[str, ...] = ()) -> int:
    """Parameters of `network` FSDP holds gathered at once during a forward: the root's own (gathered for the whole
    forward) and twice the largest unit's own (the unit computing and the one prefetched); a unit's own weights
    are those no unit inside it shards."""
    managed: set[int] = set()
    largest = 0
    for unit in units(network, classes):  # innermost first
        own = [p for p in unit.parameters() if id(p) not in managed]
        managed.update(id(p) for p in own)
        largest = max(largest, sum(p.numel() for p in own))
    return sum(p.numel() for p in network.parameters() if id(p) not in managed) + 2 * largest


def shard_network(network: nn.Module, settings: FSDPSettings, mixed_precision: str | None) -> nn.Module:
    """`network` sharded in place over all ranks: its units, then itself."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    dtype = MIXED_DTYPES.get(mixed_precision or "no")
    # Weights gathered in the compute dtype, gradients reduced in float32; the inputs keep their dtype (the
    # run's autocast casts what the layers compute: a float timestep cast to bf16 would lose its value).
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32 if dtype else None,
                                  cast_forward_inputs=False)
    kwargs = {"reshard_after_forward": settings.reshard_after_forward, "mp_policy": policy,
              "offload_policy": CPUOffloadPolicy() if settings.offload_params else OffloadPolicy()}
    for unit in [] if settings.whole_networks else units(network, settings.unit_classes):
        fully_shard(unit, **kwargs)
    fully_shard(network, **kwargs)  # explicitly resharding after forward: torch keeps a root gathered by default
    return network


def shard_roles(roles: Roles, ema: nn.Module | None, settings: FSDPSettings, mixed_precision: str | None) -> None:
    """Shard every network of `roles` (and the student's EMA) in place; the LoRA views then hold the sharded
    adapter weights. `settings.from_rank0`: rank 0's weights are every rank's (the others' may be on meta)."""
    networks = [roles.shared.base] if roles.shared is not None else [roles.student, roles.fake_score]
    if ema is not None and roles.shared is None:
        networks.append(ema)
    if not isinstance(roles.teacher, AdapterView):
        networks.append(roles.teacher)
    rank0_states = [rank0_state(network) for network in networks] if settings.from_rank0 else []
    for network in networks:
        shard_network(network, settings, mixed_precision)
    for network, state in zip(networks, rank0_states):
        load_from_rank0(network, state)
    if settings.from_rank0 and roles.shared is not None:
        roles.shared.fingerprint = _from_rank0(roles.shared.fingerprint)
    if roles.shared is not None:
        for view in (roles.student, roles.fake_score, ema):
            if view is not None:
                view.rebind()


def _from_rank0(value):
    """Rank 0's `value` (a picklable object) on every rank."""
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def rank0_state(network: nn.Module) -> dict[str, torch.Tensor]:
    """Before sharding: rank 0's state dict of `network` ({} on the other ranks), whose tensors it keeps until
    `load_from_rank0` sends them. Every rank checks that its `network` has rank 0's tensor names and shapes, and
    gives its meta tensors rank 0's dtypes (a network built from its config may differ from the loaded one, e.g.
    modules diffusers keeps in float32)."""
    tensors = dict(network.named_parameters())
    tensors.update(network.named_buffers())
    layout = _from_rank0({name: (tuple(t.shape), t.dtype) for name, t in tensors.items()})
    differ = sorted(name for name, t in tensors.items() if layout.get(name, (None,))[0] != tuple(t.shape))
    differ += sorted(layout.keys() - tensors.keys())
    if not all_ranks_true(torch.tensor(not differ)):  # every rank stops, none waits in a collective
        where = f"rank {torch.distributed.get_rank()}'s, in {differ[:3]}" if differ else "another rank's"
        raise TDMError(f"fsdp_config.fsdp_cpu_ram_efficient_loading: the {type(network).__name__} built from its "
                       f"config ({where}) differs from the one rank 0 loaded; set fsdp_cpu_ram_efficient_loading: "
                       f"false")
    for name, t in tensors.items():
        if t.is_meta and t.dtype != layout[name][1]:
            t.data = t.data.to(layout[name][1])
    return dict(network.state_dict()) if torch.distributed.get_rank() == 0 else {}


def load_from_rank0(network: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Every rank's shards of sharded `network` (all its tensors, also buffers outside the state dict) from rank 0's
    `state` (`rank0_state`; {} on the other ranks). A rank whose network is on meta allocates its shards first."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if on_meta(network):
        network.to_empty(device=device)
    set_model_state_dict(network, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    in_state = network.state_dict().keys()
    for name, buffer in network.named_buffers():
        if name not in in_state:
            torch.distributed.broadcast(buffer, src=0)
    state.clear()  # rank 0's full tensors go now


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of `tensor` (itself when not sharded)."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole of `tensor`: gathered from every rank when sharded (all ranks must call this)."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def like(param: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """`value`, a full tensor, as `param` holds it: this rank's shard when `param` is sharded (no communication:
    every rank has the full tensor)."""
    if not isinstance(param, DTensor) or isinstance(value, DTensor):
        return value
    return distribute_tensor(value.to(param.device), param.device_mesh, param.placements, src_data_rank=None)


def full_state(target) -> dict:
    """The state dict of a sharded module or optimiser with every sharded tensor gathered (all ranks call this);
    what a checkpoint holds."""
    def gathered(value):
        if isinstance(value, dict):
            return {k: gathered(v) for k, v in value.items()}
        return full(value).detach() if torch.is_tensor(value) else value

    return gathered(target.state_dict())


class FullStateLoader:
    """Loads a checkpoint's full tensors into a sharded module or optimiser: each rank keeps its shard."""

    def __init__(self, target):
        self.target = target

    def load_state_dict(self, state_dict: dict) -> None:
        if isinstance(self.target, torch.optim.Optimizer) or hasattr(self.target, "optimizer"):
            self.target.load_state_dict(self._optimizer_state(state_dict))
            return
        params = dict(self.target.named_parameters())
        params.update(self.target.named_buffers())
        self.target.load_state_dict({k: like(params[k], v) if k in params else v for k, v in state_dict.items()})

    def _optimizer_state(self, state_dict: dict) -> dict:
        """Each per-parameter state tensor of its parameter's full shape, as that parameter's shard."""
        params = [p for group in self.target.param_groups for p in group["params"]]
        state = {}
        for index, entries in state_dict["state"].items():
            p = params[int(index)]
            state[index] = {k: like(p, v) if torch.is_tensor(v) and k != "step" and v.shape == p.shape else v
                            for k, v in entries.items()}
        return {**state_dict, "state": state}
