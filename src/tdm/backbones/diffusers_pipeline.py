"""Finding a stock diffusers pipeline before a family loads it: the optional import of diffusers (with the extra to
install), the check that a pipeline folder is of the family's class, and the folder itself for a hub id."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ConfigError
from ..optional import require


def import_diffusers():
    """The diffusers module, or a clear error saying which extra to install (peft: the student and fake score are
    LoRA adapters; transformers: the text encoders)."""
    diffusers, *_ = (require(module, "a diffusers teacher", install="'tdm[diffusers]'")
                     for module in ("diffusers", "peft", "transformers"))
    return diffusers


class OtherFamilyPipeline(ConfigError):
    """The teacher is a pipeline of another family (`found`: its class name); the registry names the family."""

    def __init__(self, message: str, found: str | None):
        super().__init__(message)
        self.found = found


def check_pipeline_class(source: str, pipeline_class: str, family: str, revision: str | None = None) -> None:
    """Refuse a pipeline of another family (its model_index.json `_class_name`) before loading it: diffusers would
    load the components the `family`'s `pipeline_class` knows and the run would fail at its first iteration."""
    found = import_diffusers().DiffusionPipeline.load_config(source, revision=revision).get("_class_name")
    if found != pipeline_class:
        raise OtherFamilyPipeline(f"backbone.teacher: {source} is a {found}, but backbone.name={family} "
                                  f"expects a {pipeline_class}", found)


def pipeline_folder(pipeline_class: str, source: str, **load) -> Path:
    """A local pipeline folder as is; a hub id downloaded (or found in the hub cache) as `from_pretrained` of
    `pipeline_class` would, without the components `load` sets to None."""
    if Path(source).is_dir():
        return Path(source)
    return Path(getattr(import_diffusers(), pipeline_class).download(source, **load))


def check_local_parts(source: str, parts: list[str], family: str) -> None:
    """A local pipeline folder holds each component of `parts` (those about to load): otherwise diffusers fails on
    a file it does not name the component of."""
    folder = Path(source)
    if not (folder / "model_index.json").is_file():
        return  # a hub id, or not a pipeline folder: from_pretrained says why
    index = json.loads((folder / "model_index.json").read_text())
    for part in parts:
        if (index.get(part) or [None])[0] is None or not (folder / part).is_dir():
            raise ConfigError(f"backbone.teacher: {source} has no {part} (the {family} pipeline encodes prompts "
                              f"with it; save the pipeline with it, or cache every prompt first: tdm cache-prompts)")
