"""The three roles of TDM: a frozen teacher, a trainable student and a trainable fake score (method.md Part 1, 9).

Two memory strategies behind one interface. The trainer calls `teacher`, `student` and `fake_score` as
`module(x_t, t, cond)`; `student.parameters()` and `student.state_dict()` (likewise the fake score's) are exactly
that role's trainable weights, which is all its optimiser, gradient clipping, EMA and checkpoint ever see.

- `Roles.separate_copies`: full fine-tuning; student and fake score are independent copies of the initial network.
- `Roles.lora`: one frozen base carrying two peft LoRA adapters, `student` and `fake`; the teacher is the base with
  adapters disabled, so one copy of the backbone sits in memory. Each role is an `AdapterView` of the base that
  activates its adapter for the duration of a call.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.utils.checkpoint
from torch import nn

from .config import Config
from .core.algorithm import FAKE_SCORE
from .core.algorithm import STUDENT as STUDENT_ROLE
from .errors import ConfigError, TDMError
from .meta_init import on_meta
from .step_conditioning import accept_earlier_layout, condition_for_role, initial_network

if TYPE_CHECKING:
    from .backbones.base import Backbone

STUDENT, FAKE, STUDENT_EMA = "student", "fake", "student_ema"  # adapter names on the shared base
REWARD_MODEL = "reward_model"  # the surrogate reward model of reward post-training (tdm.reward_stage)

# Named groups usable in train.lora_targets, next to plain module-name patterns.
TARGET_GROUPS: dict[str, tuple[str, ...]] = {
    "attention": ("to_q", "to_k", "to_v", "to_out.0"),  # diffusers `Attention` projections (UNets and DiTs)
    "joint_attention": ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"),  # MMDiT (SD3) text-stream projections
    "feedforward": ("ff.net.0.proj", "ff.net.2"),       # diffusers `FeedForward`: GELU projection in, linear out
    "gated_feedforward": ("feed_forward.w1", "feed_forward.w2", "feed_forward.w3"),  # Z-Image's SwiGLU FeedForward
    "conv": ("conv1", "conv2", "conv_shortcut"),        # diffusers `ResnetBlock2D` convolutions
    "projections": ("proj_in", "proj_out"),             # a UNet's `Transformer2DModel` input and output projections
    "time_embedding": ("time_emb_proj",),                # `ResnetBlock2D`'s projection of the time embedding
}
RECOMPILE_LIMIT = 32  # train.compile: graphs per compiled function (Roles.compile)
LORA_LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)  # what peft's LoRA can wrap


def _matches(name: str, pattern: str) -> bool:
    """peft's `target_modules` rule for a list entry: the full module name, or its tail after a dot."""
    return name == pattern or name.endswith(f".{pattern}")


def resolve_targets(module: nn.Module, targets: tuple[str, ...]) -> list[str]:
    """Expand groups and check that every entry of train.lora_targets names at least one LoRA-able layer."""
    layers = {name for name, m in module.named_modules() if isinstance(m, LORA_LAYER_TYPES)}
    patterns, missing = [], []
    for entry in targets:
        group = TARGET_GROUPS.get(entry, (entry,))
        found = [p for p in group if any(_matches(n, p) for n in layers)]
        patterns += found
        if not found:
            missing.append(entry)
    if missing or not patterns:
        examples = ", ".join(sorted(layers)[:8]) or "none"
        raise ConfigError(f"train.lora_targets: {missing or list(targets)} match no Linear, Conv or Embedding "
                          f"layer of {type(module).__name__} (groups: {sorted(TARGET_GROUPS)}; a pattern is a "
                          f"module name or its tail after a dot; layers here include: {examples})")
    return patterns


def adapter_weights(module: nn.Module, adapter: str) -> dict[str, nn.Parameter]:
    """LoRA adapter `adapter`'s weights in `module`, keyed as in peft's `get_peft_model_state_dict(module,
    adapter_name=adapter)`: parameter names with the adapter's name taken out."""
    weights = {}
    for name, p in module.named_parameters():
        parts = name.split(".")  # e.g. to_q.lora_A.student.weight, emb.lora_embedding_A.student
        i = next((i for i in range(1, len(parts)) if parts[i] == adapter and parts[i - 1].startswith("lora_")), None)
        if i is not None:
            weights[".".join(parts[:i] + parts[i + 1:])] = p
    return weights


def base_fingerprint(module: nn.Module) -> str:
    """sha256 of every parameter's and buffer's name, shape and dtype plus up to 1024 evenly spaced values.

    Identifies the base a LoRA checkpoint was trained on (another model or fine-tune differs in nearly every
    value) without hashing gigabytes; computed before adapters are injected."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 1024)].float().cpu().contiguous()
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()


def trainable_copy(module: nn.Module) -> nn.Module:
    """An independent copy of `module` to train: fp32 weights and buffers, train mode, gradients on."""
    return copy.deepcopy(module).float().train().requires_grad_(True)


def require_compiler(device: torch.device) -> None:
    """Raise a ConfigError naming train.compile when torch.compile's default backend cannot compile for `device`:
    inductor needs a C++ compiler for the CPU and triton for CUDA."""
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            raise ConfigError("train.compile: torch.compile on CUDA needs triton, which is not installed here "
                              "(pip install triton), or set train.compile=false")
    elif device.type == "cpu":
        from torch._inductor.cpp_builder import get_cpp_compiler

        try:
            get_cpp_compiler()
        except (RuntimeError, OSError) as e:
            raise ConfigError(f"train.compile: torch.compile on the CPU needs a C++ compiler and none works here "
                              f"({e}); install g++, point CXX at one, or set train.compile=false") from None


class SharedBase:
    """One frozen backbone with named peft LoRA adapters, switched per call.

    Switching writes the LoRA layers' active-adapter state directly instead of calling peft's `set_adapter` /
    `enable_adapters`: those also flip `requires_grad` of the inactive adapters, and a leaf whose `requires_grad`
    is turned off between forward and backward silently gets no gradient. The generator loss runs the student
    with grad and then the fake score and teacher under no_grad, before its backward (tdm.core.algorithm).
    """

    def __init__(self, base: nn.Module, adapters: tuple[str, ...], rank: int, alpha: float,
                 targets: tuple[str, ...], seed: int):
        from peft import LoraConfig
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.base, self.seed = base.eval().requires_grad_(False), seed
        # A base on meta (sharded loading, tdm.meta_init) gets rank 0's fingerprint and adapters when its weights
        # arrive (tdm.sharding); its adapters stay on meta too.
        self.on_meta = on_meta(base)
        self.fingerprint = None if self.on_meta else base_fingerprint(base)
        self.config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=resolve_targets(base, targets))
        for name in adapters:
            self.add_adapter(name)
        self.layers = [m for m in base.modules() if isinstance(m, BaseTunerLayer)]
        self.active: str | None = None
        self.activate(None)  # at rest the base is the teacher
        self.checkpointing = self._make_checkpointing_adapter_aware()
        self.compile_blocks = False  # train.compile with checkpointing: compile each checkpointed block (Roles.compile)

    def add_adapter(self, name: str) -> None:
        """Inject LoRA adapter `name` (B = 0: the base's output is unchanged) with trainable fp32 weights."""
        from peft import inject_adapter_in_model

        placement = torch.device("meta") if self.on_meta else contextlib.nullcontext()
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings(), placement:
            torch.manual_seed(self.seed)  # the same initial LoRA weights on every rank and in every run
            warnings.filterwarnings("ignore", "Already found a `peft_config`")  # several adapters are the point
            inject_adapter_in_model(self.config, self.base, adapter_name=name)
        for p in self.adapter_weights(name).values():
            p.data = p.data.float()  # fp32 master weights, also on a bf16/fp16 base
            p.requires_grad_(True)

    def adapter_weights(self, adapter: str) -> dict[str, nn.Parameter]:
        """Adapter `adapter`'s weights, keyed as in peft's `get_peft_model_state_dict(base, adapter_name=adapter)`."""
        return adapter_weights(self.base, adapter)

    def activate(self, adapter: str | None) -> None:
        """Route every LoRA layer through `adapter`, or through none (None: the base alone, the teacher)."""
        for layer in self.layers:
            layer._disable_adapters = adapter is None
            if adapter is not None:
                layer._active_adapter = [adapter]
        self.active = adapter

    @contextlib.contextmanager
    def using(self, adapter: str | None) -> Iterator[None]:
        """`adapter` active inside the block; the previous state comes back on exit, also after an exception."""
        previous = self.active
        self.activate(adapter)
        try:
            yield
        finally:
            self.activate(previous)

    def _make_checkpointing_adapter_aware(self) -> bool:
        """Gradient checkpointing recomputes forwards during backward, after the view's call has returned: make
        each recomputation run under the adapter that was active in the original forward (diffusers and
        transformers blocks call `self._gradient_checkpointing_func(block, *args)`). True if any module checkpoints."""
        found = False
        for m in self.base.modules():
            if getattr(m, "gradient_checkpointing", False) is True:
                if not hasattr(m, "_gradient_checkpointing_func"):
                    raise TDMError(f"{type(m).__name__} uses gradient checkpointing through no "
                                   f"`_gradient_checkpointing_func`; train.roles=lora cannot route its recomputation")
                m._gradient_checkpointing_func = self._checkpoint
                found = True
        return found

    def _checkpoint(self, block, *args):
        adapter = self.active  # the adapter of the view running this forward
        if self.compile_blocks and isinstance(block, nn.Module) and block._compiled_call_impl is None:
            block.compile()  # in place: every later call of this block, checkpointed or not, runs compiled
        return torch.utils.checkpoint.checkpoint(block.__call__, *args, use_reentrant=False,
                                                 context_fn=lambda: (contextlib.nullcontext(), self.using(adapter)))


class AdapterView(nn.Module):
    """One role on a `SharedBase`: `view(x_t, t, cond)` runs the base with `adapter` active (None: the teacher).

    `parameters()` and `state_dict()` are this adapter's weights only; state-dict keys are peft's, without the
    adapter name, so a checkpoint's `student.safetensors` is the student's peft LoRA state dict. The base is
    shared, not owned: move it with `Roles.to`."""

    def __init__(self, shared: SharedBase, adapter: str | None):
        super().__init__()
        self.adapter, self.shared = adapter, shared  # a plain object: nn.Module neither registers nor walks it
        self.rebind()

    def rebind(self) -> None:
        """Find this adapter's weights in the base again (after sharding replaced its parameters)."""
        self._weights = self.shared.adapter_weights(self.adapter) if self.adapter is not None else {}

    def forward(self, x_t, t, cond):
        with self.shared.using(self.adapter):
            return self.shared.base(x_t, t, cond)

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        yield from ((prefix + name, p) for name, p in self._weights.items())

    def state_dict(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        return {name: p.detach() for name, p in self._weights.items()}

    def load_state_dict(self, state_dict: dict[str, torch.Tensor], strict: bool = True, assign: bool = False):
        missing, unexpected = self._weights.keys() - state_dict.keys(), state_dict.keys() - self._weights.keys()
        if missing or unexpected:
            raise RuntimeError(f"LoRA adapter {self.adapter!r}: missing keys {sorted(missing)[:3]}, "
                               f"unexpected keys {sorted(unexpected)[:3]}")
        with torch.no_grad():
            for name, p in self._weights.items():
                p.copy_(state_dict[name])


@dataclass
class Roles:
    teacher: nn.Module     # frozen by construction: eval mode, no trainable parameter
    student: nn.Module     # the few-step generator G
    fake_score: nn.Module | None  # tracks the student's diffused distribution (F); None when only loading
    shared: SharedBase | None = None  # the one base of the lora strategy; None for separate copies
    reward_model: nn.Module | None = None  # reward post-training's surrogate (add_reward_model); else None

    @classmethod
    def separate_copies(cls, teacher: nn.Module, initial: nn.Module) -> Roles:
        """Full fine-tuning: student and fake score are independent fp32 copies of `initial`, whatever its dtype.

        accelerate keeps no fp32 master weights: an AdamW step of lr ~1e-6 is far below bf16's resolution (8
        significant bits) and would round away, so a bf16 copy barely trains. The frozen teacher keeps its dtype;
        diffusers denoisers cast their inputs to the network's dtype, so each role runs in its own."""
        teacher = teacher.eval().requires_grad_(False)
        student = trainable_copy(initial)
        fake_score = trainable_copy(initial)
        return cls(teacher, student, fake_score)

    @classmethod
    def lora(cls, teacher: nn.Module, initial: nn.Module, rank: int = 16, alpha: float = 16.0,
             targets: tuple[str, ...] = ("attention",), seed: int = 0) -> Roles:
        """Student and fake score as LoRA adapters on `initial` (which stays in eval mode and frozen). When
        `initial` is the teacher, the teacher is its adapters-disabled view and one copy of it exists; otherwise
        (a closed-form teacher with a fitted initial network) the teacher stays as given."""
        shared = SharedBase(initial, (STUDENT, FAKE), rank, alpha, targets, seed)
        teacher = AdapterView(shared, None) if initial is teacher else teacher.eval().requires_grad_(False)
        return cls(teacher, AdapterView(shared, STUDENT), AdapterView(shared, FAKE), shared)

    @classmethod
    def from_config(cls, config: Config, backbone: Backbone, to_load: bool = False) -> Roles:
        """The strategy train.roles names, with the backbone's default LoRA targets unless train.lora_targets.
        Student and fake score start from the backbone's initial weights; under TDM-unify each separate copy
        is step-conditioned for exactly the step inputs its role is given (tdm.step_conditioning).

        `to_load`: the roles a trained student is loaded into (tdm.runs). Separate copies then make the student
        alone (no fake score: it would double the memory), in the dtype of the backbone's weights, and accept
        checkpoints written with a step embedding the student never used."""
        train, tdm = config.train, config.tdm
        if train.roles == "separate" and to_load:
            student = initial_network(backbone, tdm, STUDENT_ROLE)
            accept_earlier_layout(student)
            return cls(backbone.teacher.eval().requires_grad_(False), student, None)
        if train.roles == "separate":
            roles = cls.separate_copies(backbone.teacher, backbone.initial_weights())
            roles.student = condition_for_role(roles.student, backbone, tdm, STUDENT_ROLE)
            roles.fake_score = condition_for_role(roles.fake_score, backbone, tdm, FAKE_SCORE)
            return roles
        if tdm.step_conditioned:
            raise ConfigError("train.roles=lora keeps one shared base network, which cannot hold a step embedding "
                              "per role: TDM-unify (tdm.num_steps_set, tdm.fake_step_condition) needs "
                              "train.roles=separate")
        return cls.lora(backbone.teacher, backbone.initial_weights(), train.lora_rank, train.lora_alpha,
                        train.lora_targets or backbone.lora_targets, train.seed)

    @property
    def base_fingerprint(self) -> str | None:
        """Identifies the shared base (lora) so a checkpoint of its adapters is not loaded onto another one."""
        return self.shared.fingerprint if self.shared is not None else None

    def student_ema(self) -> nn.Module:
        """A frozen copy of the student's trainable weights for an EMA: a full copy, or a third LoRA adapter."""
        if self.shared is None:
            return copy.deepcopy(self.student).requires_grad_(False)
        self.shared.add_adapter(STUDENT_EMA)
        ema = AdapterView(self.shared, STUDENT_EMA)
        ema.load_state_dict(self.student.state_dict())
        ema.requires_grad_(False)
        return ema

    def add_reward_model(self) -> nn.Module:
        """The surrogate reward model of reward post-training (docs/reward.md 3.1), starting as the teacher, its
        reference: a third trainable LoRA adapter on the shared base (B = 0), or a trainable copy of the teacher."""
        if self.shared is None:
            self.reward_model = trainable_copy(self.teacher)
        else:
            self.shared.add_adapter(REWARD_MODEL)
            self.shared.activate(self.shared.active)  # the new adapter's layers follow the current state
            self.reward_model = AdapterView(self.shared, REWARD_MODEL)
        return self.reward_model

    def compile(self) -> None:
        """train.compile: torch.compile every network the roles call, in place (`nn.Module.compile`), so parameter
        names, state dicts and checkpoints are those of an uncompiled run.

        Shapes are compiled dynamic after the first change of a call's shapes (torch's automatic dynamic shapes),
        so sub-batches of varying size reuse one graph. On the shared LoRA base the active adapter and the grad
        mode are guarded: each (adapter, grad mode) pair the iteration uses compiles once. With gradient
        checkpointing the shared base is not compiled whole (dynamo cannot trace the adapter-aware checkpoint's
        context_fn): each block it checkpoints is, at its first checkpointed call, and the blocks' code is
        compiled once for all layers, in up to ~12 variants (adapter, grad mode, whether its input requires grad,
        strides), hence a recompile limit of at least 32 (torch's default, 8, would leave the rest eager).
        `require_compiler` first says whether a compiler works here."""
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        if self.shared is not None and self.shared.checkpointing:
            self.shared.compile_blocks, networks = True, []
        elif self.shared is not None:
            networks = [self.shared.base]
        else:
            networks = [self.student, self.fake_score]
        if not isinstance(self.teacher, AdapterView):
            networks.append(self.teacher)
        for network in networks:
            network.compile()

    def to(self, device) -> Roles:
        """Move every role (views hold no weights of their own: the shared base moves for them)."""
        for m in (self.teacher, self.student, self.fake_score, self.reward_model,
                  *([self.shared.base] if self.shared else [])):
            if m is not None:
                m.to(device)
        return self

