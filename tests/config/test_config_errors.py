"""Every class of bad input raises ConfigError naming the file, the key path and what was expected."""
import os
import re

import pytest

from megadistill.config import ConfigError, load_config, parse_override

GOOD = """
recipe: {method: dmd2}
models:
  student: {preset: tiny}
  teacher: {preset: tiny}
  critic: {preset: tiny}
data: {kind: synthetic}
"""


def _error(path, overrides=()):
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides=overrides)
    err = info.value
    text = str(err)
    assert "\n" not in text and "Traceback" not in text and len(text) < 400, text
    assert os.path.basename(path) in text, text
    return err, text


def _edit(base: str, old: str, new: str) -> str:
    assert old in base
    return base.replace(old, new)


@pytest.mark.parametrize("yaml_text, key, expected", [
    # unknown keys, with the closest valid key
    (GOOD + "training: {lrr: 1e-5}\n", "training.lrr", "did you mean 'lr'"),
    (GOOD + "trainig: {lr: 1e-5}\n", "trainig", "did you mean 'training'"),
    (_edit(GOOD, "critic: {preset: tiny}", "critc: {preset: tiny}"), "models.critc", "did you mean 'critic'"),
    (_edit(GOOD, "student: {preset: tiny}", "student: {preset: tiny, dtyp: bf16}"), "models.student.dtyp",
     "did you mean 'dtype'"),
    (GOOD + "training: {log_every: 5}\n", "training.log_every", "lives at logging.log_every"),
    # wrong types
    (GOOD + "training: {max_steps: ten}\n", "training.max_steps", "expected an integer"),
    (GOOD + "training: {micro_batch_size: 1.5}\n", "training.micro_batch_size", "expected an integer"),
    (GOOD + "parallel: {tp: true}\n", "parallel.tp", "expected an integer"),
    (GOOD + "training: {lr: fast}\n", "training.lr", "expected a number"),
    (GOOD + "training: {lr: null}\n", "training.lr", "got null, expected a number"),
    (_edit(GOOD, "teacher: {preset: tiny}", "teacher: {preset: tiny, trainable: yes}"),
     "models.teacher.trainable", "expected true or false"),
    (GOOD + "training: {betas: [0.9]}\n", "training.betas", "expected a list of 2 numbers"),
    (GOOD + "training: {lr_scheduler: cosin}\n", "training.lr_scheduler", "did you mean 'cosine'"),
    (_edit(GOOD, "student: {preset: tiny}", "student: {preset: tiny, dtype: bfloat16}"),
     "models.student.dtype", "one of 'fp32', 'bf16', 'fp16'"),
    (GOOD + "method_config: [1, 2]\n", "method_config", "expected a mapping"),
    (GOOD + "logging: {validation_prompts: a cat}\n", "logging.validation_prompts", "expected a list of strings"),
    (GOOD + "training:\n", "training", "expected a mapping (write {} for an empty one)"),
    (_edit(GOOD, "recipe: {method: dmd2}", "recipe: {method: dmd}"), "recipe.method", "did you mean 'dmd2'"),
    # values out of range
    (GOOD + "training: {lr: -1e-5}\n", "training.lr", "expected a value > 0"),
    (GOOD + "training: {betas: [0.9, 1.0]}\n", "training.betas[1]", "expected a value < 1"),
    (GOOD + "parallel: {sp: 0}\n", "parallel.sp", "expected a value >= 1"),
    (GOOD + "training: {warmup_steps: 50, max_steps: 10}\n", "training.warmup_steps", "at most training.max_steps"),
    # missing sections and roles
    ("models: {student: {preset: tiny}}\ndata: {kind: synthetic}\n", "recipe", "missing required section"),
    ("recipe: {method: finetune}\nmodels: {student: {preset: tiny}}\n", "data", "missing required section"),
    ("recipe: {family: wan}\nmodels: {student: {preset: tiny}}\ndata: {kind: synthetic}\n", "recipe.method",
     "missing required key"),
    (_edit(GOOD, "  critic: {preset: tiny}\n", ""), "models.critic",
     "method dmd2 needs models.student, models.teacher, models.critic"),
    (_edit(_edit(GOOD, "dmd2", "self_forcing"), "  teacher: {preset: tiny}\n", ""), "models.teacher",
     "method self_forcing needs"),
    (_edit(GOOD, "dmd2", "finetune"), "models.teacher", "method finetune does not use a teacher"),
    ("recipe: {method: ode_init}\nmodels: {teacher: {preset: tiny}}\ndata: {kind: synthetic}\n",
     "models.student", "method ode_init needs models.student"),
    # role rules
    (_edit(GOOD, "teacher: {preset: tiny}", "teacher: {preset: tiny, trainable: true}"),
     "models.teacher.trainable", "frozen reference"),
    (_edit(GOOD, "critic: {preset: tiny}", "critic: {dtype: bf16}"), "models.critic", "neither path nor preset"),
    (_edit(GOOD, "dmd2", "self_forcing"), "models.student.causal", "expected true"),
    (_edit(GOOD, "student: {preset: tiny}", "student: {preset: tiny, causal: true}")
     + "pipeline_config: {latent_shape: [16, 7, 4, 4]}\n", "pipeline_config.num_frame_per_block", "whole blocks"),
    # dmd2's GAN term and the critic's realism head go together
    (GOOD + "method_config: {gan_critic_weight: 0.01}\n", "models.critic.realism_head", "set models.critic"),
    (_edit(GOOD, "critic: {preset: tiny}", "critic: {preset: tiny, realism_head: true}"),
     "models.critic.realism_head", "set both or neither"),
    (_edit(GOOD, "student: {preset: tiny}", "student: {preset: tiny, realism_head: true}"),
     "models.student.realism_head", "only the critic"),
    (_edit(GOOD, "critic: {preset: tiny}", "critic: {preset: tiny, realism_head: true}")
     + "method_config: {gan_critic_weight: 0.01}\nparallel: {sp: 2}\n", "models.critic.realism_head",
     "tp, sp and pp 1"),
    (GOOD + "training: {optim: {teacher: {lr: 1e-5}}}\n", "training.optim.teacher", "no trainable role"),
    (GOOD + "training: {optim: {critic: {gradclip: 1}}}\n", "training.optim.critic.gradclip",
     "did you mean 'grad_clip'"),
    # paths
    (_edit(GOOD, "teacher: {preset: tiny}", "teacher: {path: /nonexistent/wan/teacher}"),
     "models.teacher.path", "does not exist"),
    (_edit(GOOD, "{kind: synthetic}", "{kind: prompts}"), "data.path", "needs a path"),
    (_edit(GOOD, "{kind: synthetic}", "{kind: prompts, path: /nonexistent/prompts.txt}"), "data.path",
     "does not exist"),
    (_edit(GOOD, "{kind: synthetic}", "{kind: synthetic, path: /tmp}"), "data.path", "takes no path"),
    (_edit(GOOD, "{kind: synthetic}", "{kind: synthetic, world: {speed: 2}}"), "data.world", "unknown setting"),
    (_edit(GOOD, "{kind: synthetic}", "{kind: synthetic, world: {seed: -1}}"), "data.world.seed", "integer >= 0"),
    (_edit(GOOD, "{kind: synthetic}", "{kind: synthetic, world: {seed: 1.5}}"), "data.world.seed", "integer >= 0"),
    (_edit(GOOD, "{kind: synthetic}", "{kind: prompts, path: /tmp, world: {margin: 0.5}}"), "data.world",
     "only synthetic data"),
    (GOOD + "checkpoint: {resume: /nonexistent/ckpt}\n", "checkpoint.resume", "null, auto or an existing"),
    # the end-of-run quality report
    ("recipe: {method: finetune}\nmodels: {student: {preset: tiny}}\ndata: {kind: synthetic}\n"
     "logging: {quality_samples: 8}\n", "logging.quality_samples", "dmd2 run on synthetic"),
    (GOOD + "logging: {quality_samples: 1}\n", "logging.quality_samples", "at least 2 clips"),
    (GOOD + "parallel: {pp: 2}\nlogging: {quality_samples: 8}\n", "logging.quality_samples", "holds a slice"),
    (GOOD + "parallel: {tp: 2}\nlogging: {quality_samples: 8}\n", "logging.quality_samples", "holds a slice"),
])
def test_bad_config(write_config, yaml_text, key, expected):
    err, text = _error(write_config(yaml_text))
    assert err.key == key, text
    assert f": {key}: " in text and expected in text, text


def test_error_names_the_line_of_the_key(write_config):
    path = write_config(_edit(GOOD, "teacher: {preset: tiny}", "teacher:\n    preset: tiny\n    trainable: maybe"))
    err, text = _error(path)
    # line 6 of the file holds 'trainable: maybe'
    assert text.startswith(f"{path}, line 6: models.teacher.trainable: got 'maybe' (a string), expected true or false")


def test_bad_yaml_shows_line_and_column(write_config):
    path = write_config("recipe: {method: dmd2\nmodels:\n  student: [\n")
    err, text = _error(path)
    assert re.search(rf"^{re.escape(path)}, line \d+, column \d+: invalid YAML: ", text), text
    path = write_config("recipe:\n  method: dmd2\n   family: wan\n", "indent.yaml")
    _, text = _error(path)
    assert "line 3, column" in text and "invalid YAML" in text


def test_duplicate_keys_are_rejected_with_their_line(write_config):
    path = write_config(GOOD + "training: {lr: 1e-5}\ntraining: {lr: 2e-5}\n")
    _, text = _error(path)
    assert "line 8, column 1" in text and "duplicate key 'training'" in text


def test_not_a_mapping_empty_file_and_missing_file(write_config, tmp_path):
    _, text = _error(write_config("- a\n- b\n"))
    assert "must be a mapping" in text
    _, text = _error(write_config(""))
    assert "recipe: missing required section" in text
    _, text = _error(str(tmp_path / "nope.yaml"))
    assert "config file not found" in text


@pytest.mark.parametrize("override, expected", [
    ("training.lr", "bad override syntax; expected KEY.PATH=VALUE"),
    ("=1e-5", "bad override key ''"),
    ("training..lr=1", "bad override key"),
    ("training.lr=", "override has no value; write null"),
    ("training.betas=[0.9, 0.99", "cannot parse value"),
])
def test_bad_override_syntax(write_config, override, expected):
    path = write_config(GOOD)
    _, text = _error(path, [override])
    assert f"(override {override!r})" in text and expected in text, text


@pytest.mark.parametrize("override, key, expected", [
    ("training.lr=abc", "training.lr", "got 'abc' (a string), expected a number"),
    ("training.lr.value=1", "training.lr.value", "cannot set a key inside training.lr"),
    ("models.teacher={path: /nonexistent/x}", "models.teacher.path", "does not exist"),
    ("training.ema.decay=1.5", "training.ema.decay", "expected a value < 1"),
    ("parallel.tpp=2", "parallel.tpp", "did you mean 'tp'"),
    ("trainig.lr=1", "trainig", "did you mean 'training'"),
    ("data={kind: webdataset, path: '/nonexistent/{000..009}.tar'}", "data.path",
     "directory of shard pattern '/nonexistent/{000..009}.tar' does not exist"),
])
def test_override_errors_name_the_override(write_config, override, key, expected):
    path = write_config(GOOD + "training: {lr: 1e-5}\n")
    err, text = _error(path, [override])
    assert err.key == key and f"(override {override!r})" in text and expected in text, text


def test_parse_override_values():
    assert parse_override("a.b=1e-5") == ("a.b", 1e-5)
    assert parse_override("a=[1, 2.5, x]") == ("a", [1, 2.5, "x"])
    assert parse_override("a= true ") == ("a", True)
    assert parse_override("a=yes") == ("a", "yes")
    assert parse_override("a=null") == ("a", None)
    assert parse_override("a=010") == ("a", 10)
    assert parse_override("a=0x10") == ("a", 16)
    assert parse_override("a=2024-01-01") == ("a", "2024-01-01")
    assert parse_override("a=x=y") == ("a", "x=y")
