"""The run's trackers (train.report_to) through accelerate: scalars, image grids and warnings.

accelerate's trackers are started at the first log, so a run that fails before it logs anything leaves no event
file or remote run behind. TensorBoard writes to <run folder>/tensorboard; the other trackers get the project
name "tdm" and the run folder's name as the run's name where they take one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import ConfigError
from .optional import require

# accelerate's tracker names -> the package each needs (pip name where it differs)
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "comet_ml": "comet_ml", "mlflow": "mlflow",
                    "aim": "aim", "clearml": "clearml", "dvclive": "dvclive", "swanlab": "swanlab",
                    "trackio": "trackio"}
PROJECT = "tdm"


def tracker_names(report_to: str) -> list[str]:
    """The trackers train.report_to names (all: every one installed; none: none). A tracker whose package is
    missing is an error with its install line."""
    from accelerate.tracking import get_available_trackers

    available = [str(t) for t in get_available_trackers()]
    value = report_to.strip()
    if value in ("none", ""):
        return []
    if value == "all":
        return available
    names = [n.strip() for n in value.split(",") if n.strip()]
    for name in names:
        if name not in TRACKER_PACKAGES:
            raise ConfigError(f"train.report_to: unknown tracker {name!r}; choose from "
                              f"{', '.join(TRACKER_PACKAGES)} (comma-separated), all or none")
        if name not in available:
            require(TRACKER_PACKAGES[name], f"train.report_to={name}")
            raise ConfigError(f"train.report_to: accelerate finds no usable {name} installation")
    return list(dict.fromkeys(names))


def _flat(tree: dict, prefix: str = "") -> dict:
    """A nested config as one level of `group.key` scalars (lists as text), as trackers store hyperparameters."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


class Trackers:
    """The main process's trackers; every method is a no-op until the first log starts them."""

    def __init__(self, accelerator, names: list[str], out_dir: Path, config: dict):
        self.accelerator, self.names, self.out_dir, self.config = accelerator, names, Path(out_dir), config
        self.started = False

    def _start(self) -> None:
        from accelerate.tracking import TensorBoardTracker

        # TensorBoard keeps its folder <run>/tensorboard: an instance, since accelerate names it after the project
        self.accelerator.log_with = [TensorBoardTracker("tensorboard", self.out_dir) if n == "tensorboard" else n
                                     for n in self.names]
        kwargs = {"wandb": {"name": self.out_dir.name}, "comet_ml": {"name": self.out_dir.name}}
        self.accelerator.init_trackers(PROJECT, config=_flat(self.config),
                                       init_kwargs={n: kwargs[n] for n in self.names if n in kwargs})
        self.started = True

    def scalars(self, values: dict[str, float], step: int) -> None:
        if not self.names:
            return
        if not self.started:
            self._start()
        self.accelerator.log(values, step=step)

    def images(self, values: dict[str, np.ndarray], step: int) -> None:
        """Log HWC uint8 images (one per tag) to every tracker that takes images."""
        if not self.names:
            return
        if not self.started:
            self._start()
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.log_images({k: v[None] for k, v in values.items()}, step=step, dataformats="NHWC")
            elif hasattr(tracker, "log_images"):
                tracker.log_images({k: [v] for k, v in values.items()}, step=step)

    def text(self, tag: str, message: str, step: int) -> None:
        """A text entry (warnings) where the tracker keeps text: TensorBoard."""
        for tracker in self.accelerator.trackers if self.started else ():
            if tracker.name == "tensorboard":
                tracker.writer.add_text(tag, message, step)

    def close(self) -> None:
        """Finish every tracker (flushes TensorBoard's event files)."""
        for tracker in self.accelerator.trackers if self.started else ():
            tracker.finish()
        self.accelerator.trackers, self.started = [], False
