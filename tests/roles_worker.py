"""A short digits distillation whose optimiser steps are audited: which roles did each step move?

Imported by tests/test_roles.py, and run by it under torchrun, where every rank writes its own record:

    torchrun --nproc_per_node 2 tests/roles_worker.py OUT [GROUP.KEY=VALUE ...]
"""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from tdm.config import load_config
from tdm.files import write_text_atomic
from tdm.trainer import Trainer

SMALL = ["train.batch_size=8", "train.log_every=1", "train.eval_every=0", "train.ema_decay=0.9",
         "optim.generator_lr=1e-3", "optim.fake_lr=5e-3"]


def probe_input():
    """A fixed digits input (x_t, t, labels incl. the null class) on which the teacher's output is compared."""
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    return x, torch.tensor([999.0, 700.0, 300.0, 20.0]), torch.tensor([0, 3, 7, 10])


def role_weights(trainer) -> dict[str, dict[str, torch.Tensor]]:
    """Each trainable role's weights, and `base`: the teacher network's own weights (without LoRA weights)."""
    base = {k: v for k, v in trainer.backbone.teacher.state_dict().items() if "lora_" not in k}
    return {"student": trainer.student.state_dict(), "fake_score": trainer.fake_score.state_dict(), "base": base}


def _copy(weights):
    return {role: {k: v.detach().clone() for k, v in sd.items()} for role, sd in weights.items()}


def _moved(before, after) -> list[str]:
    return sorted(role for role in before if any(not torch.equal(v, after[role][k]) for k, v in before[role].items()))


def audited_training(trainer) -> dict:
    """Train, recording the roles each optimiser step moved and the teacher's output on `probe_input` before
    and after; the hooks are torch's own optimiser step hooks, so the trainer runs unmodified."""
    steps, snapshot = [], {}
    for role, optimizer in (("fake_score", trainer.opt_f), ("student", trainer.opt_g)):
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the torch optimiser
        inner.register_step_pre_hook(lambda *_: snapshot.update(_copy(role_weights(trainer))))
        inner.register_step_post_hook(
            lambda *_, role=role: steps.append([role, _moved(snapshot, role_weights(trainer))]))
    with torch.no_grad():
        teacher_before = trainer.teacher(*probe_input())
    trainer.train()
    with torch.no_grad():
        teacher_after = trainer.teacher(*probe_input())
    return {"steps": steps, "teacher_before": teacher_before, "teacher_after": teacher_after}


def main(out: str, overrides: list[str]) -> None:
    torch.set_num_threads(1)
    trainer = Trainer(load_config("digits-demo", [*SMALL, *overrides]), out)
    start = _copy(role_weights(trainer))
    record = audited_training(trainer)
    rank = trainer.accelerator.process_index
    end = role_weights(trainer)
    tensors = {"teacher_before": record["teacher_before"], "teacher_after": record["teacher_after"],
               **{f"start/{role}/{k}": v for role in ("student", "fake_score") for k, v in start[role].items()},
               **{f"end/{role}/{k}": v.contiguous() for role in ("student", "fake_score", "base")
                  for k, v in end[role].items()}}
    save_file(tensors, str(Path(out) / f"rank{rank}.safetensors"))
    write_text_atomic(Path(out) / f"rank{rank}.json", json.dumps({"steps": record["steps"]}))
    trainer.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
