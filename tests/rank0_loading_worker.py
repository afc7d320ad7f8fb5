"""fsdp_cpu_ram_efficient_loading's sharding step on 2 ranks (gloo): run by tests/test_fsdp.py as

    torchrun --nproc_per_node 2 tests/rank0_loading_worker.py

and exits non-zero (an assertion on some rank) when a rank's roles differ from a full load's."""

import contextlib
import gc

import torch
import torch.distributed as dist

from tdm.errors import TDMError
from tdm.roles import Roles
from tdm.sharding import FSDPSettings, rank0_state, shard_roles


class Buffered(torch.nn.Module):
    """Two sharded units and a buffer outside the state dict (as diffusers' sin-cos position embeddings)."""

    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(2))
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 8), persistent=False)

    def forward(self, x, t, cond):
        for block in self.blocks:
            x = block(x) * self.scale
        return x


def main() -> None:
    """Under torchrun (2 ranks): for both strategies, rank 0 builds the roles on real weights with nonzero LoRA B
    matrices, rank 1 on meta; once sharded with from_rank0, every rank's roles and EMA compute what unsharded ones
    built from rank 0's weights compute, and the base fingerprint is rank 0's; a network unlike rank 0's is an
    error on every rank."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))

    def build(strategy: str, meta: bool) -> Roles:
        torch.manual_seed(0)
        with torch.device("meta") if meta else contextlib.nullcontext():
            teacher = Buffered()
        roles = Roles.separate_copies(teacher, teacher) if strategy == "separate" else \
            Roles.lora(teacher, teacher, 2, 2.0, ("blocks.0", "blocks.1"))
        if roles.shared is not None and not meta:
            with torch.no_grad():
                for name, p in roles.shared.base.named_parameters():
                    if "lora_B" in name:
                        p.copy_(torch.linspace(-0.2, 0.3, p.numel()).view_as(p) * (1 + ("fake" in name)))
        return roles

    for strategy in ("lora", "separate"):
        reference, roles = build(strategy, False), build(strategy, dist.get_rank() > 0)
        ema = roles.student_ema()
        shard_roles(roles, ema, FSDPSettings(from_rank0=True), None)
        with torch.no_grad():
            for name in ("teacher", "student", "fake_score"):
                expected = getattr(reference, name)(x, None, None)
                assert torch.allclose(getattr(roles, name)(x, None, None), expected, atol=1e-6), (strategy, name)
            assert torch.allclose(ema(x, None, None), reference.student(x, None, None), atol=1e-6), strategy
        assert roles.base_fingerprint == reference.base_fingerprint, strategy
    odd = Buffered()  # rank 1's network has another shape than rank 0's: every rank stops with the error
    if dist.get_rank() > 0:
        odd.blocks[1] = torch.nn.Linear(8, 8, bias=False, device="meta")
    try:
        rank0_state(odd)
        raise AssertionError("a network unlike rank 0's was accepted")
    except TDMError as err:
        assert str(err).startswith("fsdp_config.fsdp_cpu_ram_efficient_loading: the Buffered"), err
    del reference, roles, ema  # sharded modules go before the process group (environment.md 5: exit aborts)
    gc.collect()
    dist.destroy_process_group()



if __name__ == "__main__":
    main()
