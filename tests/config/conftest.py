import textwrap

import pytest


@pytest.fixture
def write_config(tmp_path):
    """Write YAML text (dedented) to tmp_path/<name> and return its path as a string."""

    def write(text: str, name: str = "run.yaml") -> str:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
        return str(path)

    return write


@pytest.fixture
def ckpt_dirs(tmp_path):
    """Existing teacher/critic checkpoint dirs and a prompt file."""
    paths = {}
    for name in ("teacher_ckpt", "critic_ckpt"):
        (tmp_path / name).mkdir()
        paths[name] = str(tmp_path / name)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\n", encoding="utf-8")
    paths["prompts"] = str(prompts)
    return paths


@pytest.fixture
def dmd2_yaml(ckpt_dirs):
    """A complete, valid DMD2 config (text), with real paths."""
    return f"""
    recipe: {{family: wan, method: dmd2}}
    models:
      student: {{preset: tiny, dtype: bf16}}
      teacher:
        path: {ckpt_dirs["teacher_ckpt"]}
        preset: tiny
        trainable: false
      critic: {{path: {ckpt_dirs["critic_ckpt"]}}}
    parallel: {{tp: 2, sp: 2, pp: 1, sequence_parallel: true}}
    training:
      seed: 7
      max_steps: 400
      lr: 2e-6
      betas: [0.0, 0.999]
      grad_clip: 10
      lr_scheduler: cosine
      warmup_steps: 10
      optim:
        critic: {{lr: 4e-7}}
      ema: {{decay: 0.99, start_step: 200}}
    pipeline_config:
      latent_shape: [16, 6, 8, 8]
      text_len: 32
    method_config:
      generator_update_every: 5
      denoising_steps: [1000, 750, 500, 250]
      guidance: {{scale: 3.0, convention: dmd}}
    data: {{kind: prompts, path: {ckpt_dirs["prompts"]}}}
    logging:
      output_dir: out
      validation_prompts: ["a red fox", "yes"]
    checkpoint: {{every: 100, resume: auto}}
    """
