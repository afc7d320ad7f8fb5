"""Building a teacher's network on the meta device: its shapes and dtypes from its config, no weights read.

Under FSDP with `fsdp_cpu_ram_efficient_loading: true`, ranks > 0 build the backbone inside `denoiser_on_meta()`:
the loaders that honour it (the diffusers families, digits) build the network to be sharded on the meta device and
load everything else (text encoders, VAE config, classifier) as usual; tdm.sharding then shards the roles and
sends rank 0's weights into every rank's shards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

from torch import nn

_ON_META: ContextVar[bool] = ContextVar("tdm_denoiser_on_meta", default=False)


@contextlib.contextmanager
def denoiser_on_meta(enabled: bool = True) -> Iterator[None]:
    """Inside (when `enabled`), backbone loaders build their denoising network on the meta device."""
    token = _ON_META.set(enabled)
    try:
        yield
    finally:
        _ON_META.reset(token)


def denoiser_on_meta_requested() -> bool:
    """Whether the backbone being built should put its denoising network on the meta device."""
    return _ON_META.get()


def on_meta(module: nn.Module) -> bool:
    """Whether any parameter or buffer of `module` is on the meta device (holds no data)."""
    return any(t.is_meta for t in (*module.parameters(), *module.buffers()))
