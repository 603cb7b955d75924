"""A non-finite loss skips the update on every role and is counted; after N in a row the run stops
with a clear message and a checkpoint."""
import math

import pytest
import torch

from megadistill.config import config_from_dict
from megadistill.train.builder import build_run
from megadistill.train.checkpoint import list_checkpoints
from megadistill.train.trainer import NonFiniteError, Trainer

from _tiny_run import tiny_dmd2_dict


def test_nonfinite_steps_are_skipped_then_the_run_stops(tmp_path, monkeypatch):
    d = tiny_dmd2_dict(tmp_path, max_steps=20, every=0)
    d["training"]["max_nonfinite_steps"] = 3
    run = build_run(config_from_dict(d))
    student = run.bundle["student"].module
    before = {k: v.clone() for k, v in student.state_dict().items()}
    critic_before = {k: v.clone() for k, v in run.bundle["critic"].module.state_dict().items()}

    # Poison the data: every prompt's text states become NaN, so every loss is NaN.
    encode = run.adapter.encode_prompts
    monkeypatch.setattr(run.adapter, "encode_prompts",
                        lambda prompts: {k: v * float("nan") for k, v in encode(prompts).items()})
    trainer = Trainer(run, tmp_path, progress=False)
    with pytest.raises(NonFiniteError, match="3 consecutive steps"):
        trainer.fit()
    assert trainer.skipped_total == 3 and trainer.step == 3
    for k, v in student.state_dict().items():
        assert torch.equal(v, before[k]), k  # no update was applied
    for k, v in run.bundle["critic"].module.state_dict().items():
        assert torch.equal(v, critic_before[k]), k
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000003"]
    assert all(math.isnan(logs["critic_loss"]) for _, logs in trainer.history)
