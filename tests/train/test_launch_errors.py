"""Config mistakes stop the entry point before any process group or model exists: one readable
line naming the file, the key and what was expected; exit code 2."""
import os
import subprocess
import sys

from _tiny_run import ROOT

LAUNCH = os.path.join(ROOT, "launch", "pretrain_dmd.py")
TINY = os.path.join(ROOT, "configs", "tiny_dmd2.yaml")


def run(*args):
    return subprocess.run([sys.executable, LAUNCH, *args], capture_output=True, text=True, timeout=120,
                          cwd=ROOT)


def test_unknown_override_key_is_named():
    p = run("--config", TINY, "--set", "training.lrr=1e-5")
    assert p.returncode == 2
    assert "training.lrr" in p.stderr and "training.lr" in p.stderr  # the suggestion
    assert "Traceback" not in p.stderr


def test_wrong_type_and_missing_file(tmp_path):
    p = run("--config", TINY, "--set", "training.max_steps=many")
    assert p.returncode == 2 and "training.max_steps" in p.stderr and "Traceback" not in p.stderr
    p = run("--config", str(tmp_path / "nope.yaml"))
    assert p.returncode == 2 and "nope.yaml" in p.stderr
    bad_ds = tmp_path / "ds.json"
    bad_ds.write_text("{not json")
    p = run("--config", TINY, "--ds_config", str(bad_ds))
    assert p.returncode == 2 and "ds.json" in p.stderr and "invalid JSON" in p.stderr


def test_recipes_load_with_real_paths_replaced(tmp_path):
    """The shipped recipes are valid schema v2; only their weight paths need real files."""
    from megadistill.config import load_config

    for name in ("wan2.1_t2v_1.3B_from_14B_dmd2_4step.yaml", "wan2.1_t2v_1.3B_dmd2_4step.yaml"):
        overrides = [f"models.{r}.path=null" for r in ("student", "teacher", "critic")]
        overrides += [f"models.{r}.preset=tiny" for r in ("student", "teacher", "critic")]
        overrides += ["pipeline_config.text_encoder=tiny"]
        cfg = load_config(os.path.join(ROOT, "configs", name), overrides)
        assert cfg.recipe.method == "dmd2"
        assert cfg.method_config["guidance_convention"] in ("cfg", "dmd")
