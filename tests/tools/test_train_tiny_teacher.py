"""tools/train_tiny_teacher.py: every stage through the launcher, export, quality check (2 steps each)."""
import json
import math

import torch

from safetensors.torch import load_file

from _tool_loader import ROOT, load_tool


def test_all_stages_export_and_check(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    tool = load_tool("train_tiny_teacher")
    # Same stages and overrides, 2 steps each; every stage but the first starts from the one before.
    monkeypatch.setattr(tool, "STAGES", [(name, 2, overrides, seed) for name, _, overrides, seed in tool.STAGES])
    export = tmp_path / "teacher"
    rc = tool.main(["--output_dir", str(tmp_path / "run"), "--export", str(export), "--eval_samples", "4",
                    "--set", "training.micro_batch_size=2", "--set", "checkpoint.every=0",
                    "--set", "training.warmup_steps=1", "--set", "training.ema.start_step=0",
                    "--json", str(tmp_path / "report.json")])
    report = json.loads((tmp_path / "report.json").read_text())
    assert rc == 1 and report["passes"] is False  # 8 steps do not make a teacher
    assert {"teacher_50", "untrained_50", "teacher_direction_gain", "fd_ratio_teacher_vs_untrained"} <= set(report)
    assert all(math.isfinite(v) for v in report["teacher_direction_gain"].values())
    for name, _, _, _ in tool.STAGES:
        steps = [json.loads(line)["step"] for line in (tmp_path / "run" / name / "log.jsonl").read_text().splitlines()]
        assert steps[-1] == 2, name
    # Stage 1 trains at text length 32; the exported teacher pads to the config's 40.
    assert json.loads((export / "config.json").read_text())["text_len"] == 40
    exported = load_file(str(export / "diffusion_pytorch_model.safetensors"))
    assert exported
    # Stage 5 starts from stage 4's teacher with only the text path refilled.
    stage4 = load_file(str(tmp_path / "run" / "stage4_teacher" / "diffusion_pytorch_model.safetensors"))
    stage5 = load_file(str(tmp_path / "run" / "stage5_init" / "diffusion_pytorch_model.safetensors"))
    assert stage4.keys() == stage5.keys()
    for k in stage4:
        assert torch.equal(stage4[k], stage5[k]) != tool.is_text_path(k), k
