"""Export the student of a teacher without a stock text-to-image pipeline: the toys, a backbone of your own
(`backbone.name: module:Name`) or a bare diffusers denoiser.

An export folder holds:
  network.safetensors            the student network's weights (LoRA merged), for your own network class; or
  unet/ or transformer/          a diffusers network's `save_pretrained` folder (a bare diffusers denoiser)
  scheduler/scheduler_config.json  the scheduler that replays the student's grid (diffusers teachers only)
  recipe.json                    the backbone config that rebuilds the teacher in tdm, the grid, the prediction
  README.md                      what it is and how to load it
The folder is written under a temporary name and renamed into place, as `tdm.export` does.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

from safetensors.torch import save_file
from torch import nn

from .backbones.base import Backbone
from .core.algorithm import TDMConfig, make_grid
from .export import RECIPE_FILE, _fsync_tree, _lora_layers, _move_into_place, merged_copy, student_network
from .files import write_text_atomic
from .roles import AdapterView

NETWORK_FILE = "network.safetensors"


def plain_student(student_model: nn.Module, lora_scale: float = 1.0) -> nn.Module:
    """The student's network without adapters: a LoRA role's base with its adapter merged at `lora_scale`, or the
    network itself."""
    network = student_network(student_model)
    if isinstance(student_model, AdapterView) and _lora_layers(network, student_model.adapter):
        return merged_copy(network, student_model.adapter, lora_scale)
    return network


def export_network(backbone: Backbone, backbone_config: dict, student_model: nn.Module, out_dir: str | Path, *,
                   tdm_config: TDMConfig, lora_scale: float = 1.0, overwrite: bool = False) -> Path:
    """Write the student's weights (a LoRA student merged at `lora_scale`), the scheduler (when the backbone has
    a diffusers one) and the recipe under `out_dir`; `backbone_config` is the run's `backbone` group, which
    rebuilds the teacher."""
    grid = make_grid(tdm_config, backbone.schedule)
    network = plain_student(student_model, lora_scale)
    out = Path(out_dir)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if hasattr(network, "save_pretrained"):  # a diffusers network: its own folder format
            weights = getattr(backbone, "denoiser_name", "denoiser")
            network.save_pretrained(tmp / weights)
        else:
            weights = NETWORK_FILE
            save_file({k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}, tmp / weights)
        teacher_scheduler = getattr(backbone, "scheduler", None)  # the teacher's diffusers scheduler, if any
        scheduler = None
        if teacher_scheduler is not None:
            from .scheduler import TDMScheduler

            scheduler = TDMScheduler.for_student(teacher_scheduler, grid, tdm_config.total_steps)
            scheduler.save_config(tmp / "scheduler")
        recipe = {
            "tdm_export": 1,
            "family": backbone.name,
            "backbone": backbone_config,
            "network_class": f"{type(network).__module__}.{type(network).__qualname__}",
            "weights": weights,
            "tdm_scheduler": None if scheduler is None else dict(scheduler.config),  # as saved in scheduler/
            "num_inference_steps": grid.num_steps,
            "grid": list(grid.timesteps),
            "prediction_type": backbone.prediction.value,
            "guidance_scale": 1.0,
            "sample_shape": list(backbone.sample_shape),
            "tdm": {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(tdm_config).items()},
        }
        write_text_atomic(tmp / RECIPE_FILE, json.dumps(recipe, indent=2) + "\n")
        write_text_atomic(tmp / "README.md", network_card(recipe))
        _fsync_tree(tmp)
        _move_into_place(tmp, out, overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def network_card(recipe: dict) -> str:
    """README.md of a network export: what it holds and how to load the weights."""
    if recipe["weights"] == NETWORK_FILE:
        load = (f"network = {recipe['network_class'].rpartition('.')[2]}(...)  # your class, built as the teacher\n"
                f"network.load_state_dict(safetensors.torch.load_file(\"EXPORT_DIR/{NETWORK_FILE}\"))")
    else:
        load = (f"network = diffusers.{recipe['network_class'].rpartition('.')[2]}.from_pretrained("
                f"\"EXPORT_DIR/{recipe['weights']}\")")
        if recipe["tdm_scheduler"]:
            load += "\nscheduler = tdm.scheduler.TDMScheduler.from_pretrained(\"EXPORT_DIR\", subfolder=\"scheduler\")"
    return f"""# TDM student ({recipe['family']})

A {recipe['num_inference_steps']}-step student distilled with Trajectory Distribution Matching (Luo et al., ICCV
2025, arXiv 2503.06674) by the `tdm` toolkit. It samples without guidance on its training grid {recipe['grid']}
({recipe['prediction_type']} prediction), samples of shape {recipe['sample_shape']}.

```python
{load}
```

`recipe.json` holds the teacher's backbone config (`backbone`), which rebuilds it in tdm, and the grid.
"""
