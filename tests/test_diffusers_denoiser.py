"""diffusers-denoiser: a bare UNet2DModel or DiTTransformer2DModel from a save_pretrained folder (tiny models built
from config), trained, reported and exported; the end-of-run report never measures FD in latents."""

from __future__ import annotations

import pytest
import torch

from tdm.config import BackboneConfig, from_dict
from tdm.errors import ConfigError, TDMError
from tdm.registry import build_backbone

diffusers = pytest.importorskip("diffusers")


def tiny_unet(num_class_embeds: int | None = 5):
    torch.manual_seed(0)
    return diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                                 block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
                                 num_class_embeds=num_class_embeds)


def scheduler(prediction: str = "epsilon"):
    return diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type=prediction)


def config(folder, **backbone) -> dict:
    return {"backbone": {"name": "diffusers-denoiser", "teacher": str(folder), **backbone},
            "tdm": {"num_steps": 2, "guidance_scale": 2.0},
            "train": {"iterations": 2, "batch_size": 4, "log_every": 1},
            "eval": {"num_samples": 8, "teacher_steps": [4], "student_steps": [2]}}


def test_a_class_conditional_unet_trains_reports_with_inception_and_exports(tmp_path, inception_file, monkeypatch):
    from tdm.evaluate.run_report import evaluate_distillation, report_features, write_report
    from tdm.export import ExportError, load_pipeline
    from tdm.network_export import export_network
    from tdm.trainer import Trainer

    folder = tmp_path / "unet"
    unet = tiny_unet()
    unet.save_pretrained(folder)
    scheduler("v_prediction").save_pretrained(folder)  # scheduler_config.json next to config.json
    backbone = build_backbone(BackboneConfig(name="diffusers-denoiser", teacher=str(folder)))
    assert backbone.sample_shape == (3, 8, 8) and backbone.is_image and backbone.prediction.value == "v_prediction"
    assert backbone.null_condition(2).tolist() == [4, 4]  # the last class embedding: unconditional
    assert backbone.evaluation_conditions(6).tolist() == [0, 1, 2, 3, 0, 1]
    x, t, labels = torch.randn(2, 3, 8, 8), torch.tensor([10.0, 900.0]), torch.tensor([1, 4])
    with torch.no_grad():
        assert torch.equal(backbone.teacher(x, t, labels), unet(x, t, class_labels=labels).sample)

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # no Inception file anywhere: FD is skipped
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr("tdm.evaluate.run_report.DEFAULT_CLIP_FEATURES", str(tmp_path / "no-clip-here"))
    assert report_features(backbone, "cpu")[0] is None
    cfg = from_dict(config(folder))
    trainer = Trainer(cfg, tmp_path / "run")
    trainer.train()
    monkeypatch.setenv("TDM_INCEPTION", str(inception_file))
    result = evaluate_distillation(trainer)
    assert result["features"]["name"] == "inception" and "fd_teacher4" in result["rows"][0]
    write_report(tmp_path / "run", result, trainer.history, trainer.backbone, "tdm distill")
    report = (tmp_path / "run" / "report.md").read_text()
    assert "Inception-v3 pool features" in report and "raw latents" not in report and "floor row" not in report

    student = trainer.student_for_sampling()
    out = export_network(trainer.backbone, cfg.backbone.__dict__, student, tmp_path / "export", tdm_config=cfg.tdm)
    exported = diffusers.UNet2DModel.from_pretrained(out / "unet")
    assert (out / "scheduler" / "scheduler_config.json").is_file()
    with pytest.raises(ExportError, match="a network export of a diffusers-denoiser teacher, without a stock pipeline"):
        load_pipeline(out)
    with torch.no_grad():
        assert torch.equal(exported(x, t, class_labels=labels).sample, student(x, t, labels))
    trainer.close()


def test_a_dit_from_a_pipeline_folder_drops_its_variance_and_the_report_skips_fd_in_latents(tmp_path):
    from tdm.evaluate.run_report import report_features

    torch.manual_seed(0)
    dit = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                          num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    dit.save_pretrained(tmp_path / "pipe" / "transformer")
    scheduler().save_pretrained(tmp_path / "pipe" / "scheduler")
    backbone = build_backbone(BackboneConfig(name="diffusers-denoiser", teacher=str(tmp_path / "pipe")))
    assert backbone.sample_shape == (4, 8, 8) and not backbone.is_image and backbone.null_condition(1).item() == 10
    x, t, labels = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 900.0]), torch.tensor([3, 10])
    with torch.no_grad():
        assert torch.equal(backbone.teacher(x, t, labels), dit(x, t, class_labels=labels).sample[:, :4])
    features, info = report_features(backbone, "cpu")
    assert features is None and "latents without a decoder" in info["description"]


def test_an_unconditional_unet_and_one_line_errors(tmp_path):
    folder = tmp_path / "unet"
    tiny_unet(None).save_pretrained(folder)
    with pytest.raises(ConfigError, match="holds no scheduler_config.json .*backbone.scheduler"):
        build_backbone(BackboneConfig(name="diffusers-denoiser", teacher=str(folder)))
    scheduler().save_pretrained(tmp_path / "sched")
    backbone = build_backbone(BackboneConfig(name="diffusers-denoiser", teacher=str(folder),
                                             scheduler=str(tmp_path / "sched")))
    assert not backbone.teacher.conditional and backbone.sample_conditions(3, torch.Generator()).tolist() == [0] * 3
    for bad, message in ((dict(teacher=str(tmp_path / "none")), "is not a folder"),
                         (dict(teacher=str(tmp_path / "sched")), "holds no config.json"),
                         (dict(teacher=str(folder), prompts="p.txt"), "backbone.prompts: diffusers-denoiser")):
        with pytest.raises(ConfigError, match=message):
            build_backbone(BackboneConfig(name="diffusers-denoiser", **bad))


def test_the_report_on_a_pipeline_teacher_uses_inception_else_clip_or_says_why_not(tiny_dirs, tiny_clip,
                                                                                   inception_file, tmp_path,
                                                                                   monkeypatch):
    from tdm.evaluate import run_report
    from tdm.evaluate.harness import feature_space
    from tiny_diffusers import load_backbone

    backbone = load_backbone("sd15", tiny_dirs["sd15"])
    latents = torch.randn(2, *backbone.sample_shape)
    monkeypatch.delenv("TDM_INCEPTION", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(run_report, "DEFAULT_CLIP_FEATURES", str(tmp_path / "no-clip-here"))
    features, info = run_report.report_features(backbone, "cpu")
    assert features is None and "FID Inception network" in info["description"]  # never FD in latents
    assert "no CLIP model" in info["description"]
    monkeypatch.setattr(run_report, "DEFAULT_CLIP_FEATURES", str(tiny_clip))  # a CLIP model on this machine
    features, info = run_report.report_features(backbone, "cpu")
    assert info["name"] == "clip" and features(latents).shape == (2, 16)  # decoded, then CLIP's image embeddings
    assert torch.equal(features(latents), feature_space("clip", backbone, None, "cpu", str(tiny_clip))[0](latents))
    with pytest.raises(TDMError, match="--features clip needs --clip-model"):
        feature_space("clip", backbone, None, "cpu")
    monkeypatch.setenv("TDM_INCEPTION", str(inception_file))
    features, info = run_report.report_features(backbone, "cpu")
    assert info["name"] == "inception" and features(latents).shape == (2, 16)  # decoded, then Inception's
