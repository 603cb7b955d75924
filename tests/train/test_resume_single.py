"""Stop at step k, resume, and every later loss equals the uninterrupted run (one process)."""
import json

from megadistill.config import config_from_dict
from megadistill.train.builder import build_run
from megadistill.train.checkpoint import list_checkpoints
from megadistill.train.trainer import Trainer

from _tiny_run import tiny_dmd2_dict


def run(output_dir, max_steps, resume=None):
    cfg = config_from_dict(tiny_dmd2_dict(output_dir, max_steps=max_steps))
    trainer = Trainer(build_run(cfg), output_dir, resume=resume, progress=False)
    return dict(trainer.fit())


def test_resume_is_exact(tmp_path):
    full = run(tmp_path / "full", 8)
    first = run(tmp_path / "split", 4)
    assert [p.name for p in list_checkpoints(tmp_path / "split")] == ["step_00000004"]
    second = run(tmp_path / "split", 8, resume="auto")
    assert sorted(first) == [0, 1, 2, 3] and sorted(second) == [4, 5, 6, 7]
    for step in range(8):
        got = (first if step < 4 else second)[step]
        assert got == full[step], (step, got, full[step])
    # generator steps happened (interval 2) and were logged
    assert "generator_loss" in full[4] and "generator_loss" not in full[5]
    lines = (tmp_path / "full" / "log.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == list(range(1, 9))


def test_partial_checkpoint_is_ignored(tmp_path):
    run(tmp_path / "r", 4)
    partial = tmp_path / "r" / "checkpoints" / "step_00000006.tmp"
    partial.mkdir()
    (partial / "student.safetensors").write_bytes(b"truncated")
    resumed = run(tmp_path / "r", 6, resume="auto")
    assert sorted(resumed) == [4, 5]
