"""README.md of an export: a Hugging Face model card (YAML header, the sampling recipe, the loading code)."""

from __future__ import annotations

import json
import re
from pathlib import Path

LICENSE_PLACEHOLDER = "other"  # the hub's id for "see the card"; the user sets the real one (`tdm export --license`)
PIPELINE_TAGS = {"cogvideox": "text-to-video", "wan": "text-to-video"}


def _yaml(value) -> str:
    return json.dumps(value)  # JSON scalars and flow lists are YAML


def _hub_id(base: str) -> str | None:
    """`base` if it names a hub repo (the hub refuses a card whose base_model is not one), None for a local path."""
    return base if re.fullmatch(r"[\w.-]+(/[\w.-]+)?", base) and not Path(base).exists() else None


def _header(recipe: dict, license: str | None) -> str:
    tags = ["tdm", "trajectory-distribution-matching", "distillation", "few-step", recipe["family"]]
    if recipe["lora"] is not None:
        tags.append("lora")
    license_line = f"license: {_yaml(license)}" if license else \
        f"license: {LICENSE_PLACEHOLDER}  # set this: the base model's license binds its students"
    base = _hub_id(recipe["base"])
    base_line = f"base_model: {_yaml(base)}" if base else \
        f"# base_model: the hub id of {recipe['base']} (a local folder; set it before pushing)"
    lines = ["---", base_line, "library_name: diffusers", license_line,
             f"pipeline_tag: {PIPELINE_TAGS.get(recipe['family'], 'text-to-image')}", "tags:",
             *[f"- {tag}" for tag in tags], "inference:", "  parameters:",
             f"    num_inference_steps: {recipe['num_inference_steps']}",
             f"    guidance_scale: {recipe['guidance_scale']}", "---"]
    return "\n".join(lines) + "\n"


def _load_code(recipe: dict) -> str:
    lora, pipeline, denoiser = recipe["lora"], recipe["pipeline_class"], recipe["denoiser"]
    base = _yaml(recipe["base"])
    if lora is None:
        networks = {denoiser: recipe["merged_weights"], **{c: c for c in recipe.get("merged_experts", [])}}
        return "".join(f"{name} = diffusers.{recipe['denoiser_class']}.from_pretrained(\"EXPORT_DIR/{folder}\")\n"
                       for name, folder in networks.items()) + \
            f"pipe = diffusers.{pipeline}.from_pretrained({base}, " + ", ".join(f"{n}={n}" for n in networks) + ")"
    if lora["format"] in ("diffusers", "kohya"):
        experts = "".join(  # Wan 2.2 A14B: transformer_2's own LoRA
            f"pipe.load_lora_weights(\"EXPORT_DIR/{folder}\", weight_name=\"{lora['file']}\", adapter_name=\"tdm\", "
            f"load_into_{component}=True)\n" for component, folder in recipe.get("expert_loras", {}).items())
        return (f"pipe = diffusers.{pipeline}.from_pretrained({base})\n"
                f"pipe.load_lora_weights(\"EXPORT_DIR\", weight_name=\"{lora['file']}\", adapter_name=\"tdm\")\n"
                f"{experts}pipe.set_adapters([\"tdm\"], adapter_weights=[{lora['scale']}])")
    scale = "" if lora["scale"] == 1.0 else (
        f"\nfor module in pipe.{denoiser}.modules():  # the LoRA scale\n"
        f"    if hasattr(module, \"set_scale\"):\n        module.set_scale(\"tdm\", {lora['scale']})")
    return (f"from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict\n"
            f"from safetensors.torch import load_file\n\n"
            f"pipe = diffusers.{pipeline}.from_pretrained({base})  # {pipeline} has no load_lora_weights\n"
            f"inject_adapter_in_model(LoraConfig.from_pretrained(\"EXPORT_DIR\"), pipe.{denoiser}, "
            f"adapter_name=\"tdm\")\n"
            f"weights = load_file(\"EXPORT_DIR/{lora['file']}\")  # peft's layout: keys under base_model.model.\n"
            f"set_peft_model_state_dict(pipe.{denoiser}, {{k.removeprefix(\"base_model.model.\"): v "
            f"for k, v in weights.items()}}, adapter_name=\"tdm\"){scale}")


def _call(recipe: dict) -> str:
    kwargs = {"num_inference_steps": recipe["num_inference_steps"], "guidance_scale": recipe["guidance_scale"],
              **recipe["pipeline_kwargs"], **recipe["scheduler_kwargs"]}
    return "out = pipe(prompt=\"a photo of a cat\", " + ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) + ")"


def _recipe_rows(recipe: dict) -> str:
    scheduler = recipe["scheduler"]["_class_name"]
    rows = [("scheduler", f"`{scheduler}` (scheduler/scheduler_config.json)"),
            ("steps", recipe["num_inference_steps"]),
            ("student grid (tdm's time axis)", recipe["grid"]),
            *[(name, value) for name, value in recipe["scheduler_kwargs"].items()],
            ("guidance_scale", f"{recipe['guidance_scale']} " + (
                "(guidance is distilled in)" if recipe["guidance_scale"] in (0.0, 1.0) else
                "(the embedded guidance value the student was trained at; no unguided branch)")),
            ("prediction", recipe["prediction_type"])]
    if recipe["lora"] is not None:
        rows.append(("LoRA scale", recipe["lora"]["scale"]))
    if recipe.get("stock_scheduler"):
        rows.append(("no stock scheduler", recipe["stock_scheduler"]))
    return "| | |\n|---|---|\n" + "\n".join(f"| {name} | {value} |" for name, value in rows)


def model_card(recipe: dict, license: str | None = None) -> str:
    """README.md of an export: YAML header for the hub, what the model is, its sampling recipe and the code."""
    scheduler = recipe["scheduler"]["_class_name"]
    tdm_scheduler = scheduler == "TDMScheduler"
    imports = "import diffusers" + ("\nfrom tdm.scheduler import TDMScheduler  # pip install tdm" if tdm_scheduler
                                    else "")
    load_scheduler = ("TDMScheduler" if tdm_scheduler else f"diffusers.{scheduler}") + \
        ".from_pretrained(\"EXPORT_DIR\", subfolder=\"scheduler\")"
    needs = "the `tdm` package for `TDMScheduler`" if tdm_scheduler else "diffusers alone (no tdm)"
    return f"""{_header(recipe, license)}
# TDM student of `{recipe['base']}`

A {recipe['num_inference_steps']}-step student distilled from `{recipe['base']}` ({recipe['family']}) with
Trajectory Distribution Matching (Luo et al., ICCV 2025, arXiv 2503.06674) with the `tdm` toolkit. It samples
without classifier-free guidance (guidance is distilled in) on its training grid, which the exported
`{scheduler}` replays exactly inside the stock `{recipe['pipeline_class']}`. Sampling needs {needs}.

## Sampling recipe

{_recipe_rows(recipe)}

```python
{imports}

{_load_code(recipe)}
pipe.scheduler = {load_scheduler}
{_call(recipe)}
```

`EXPORT_DIR` is this folder; from the hub, `EXPORT_DIR = huggingface_hub.snapshot_download("REPO_ID")`. With tdm
installed: `tdm generate --model EXPORT_DIR --prompt "a photo of a cat" --out samples/`. `recipe.json` holds all
of the above, and `TDMScheduler`'s config (`tdm_scheduler`), which samples tdm's grid at any number of steps.
"""
