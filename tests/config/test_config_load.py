import dataclasses
import os

from megadistill.config import (EMAConfig, OptimConfig, RunConfig, config_from_dict,
                                config_to_dict, dump_config, load_config, save_config)
from megadistill.config.schema import (CheckpointConfig, LoggingConfig, OptimOverride, ParallelConfig,
                                       PipelineConfig, TrainingConfig)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_good_config_loads_typed_and_resolved(write_config, dmd2_yaml, ckpt_dirs):
    cfg = load_config(write_config(dmd2_yaml))
    assert isinstance(cfg, RunConfig)
    assert cfg.recipe.method == "dmd2"
    student, teacher, critic = (cfg.models[r] for r in ("student", "teacher", "critic"))
    assert (student.trainable, teacher.trainable, critic.trainable) == (True, False, True)
    assert student.family == "wan" and student.dtype == "bf16" and student.path is None
    assert teacher.path == ckpt_dirs["teacher_ckpt"] and critic.preset is None
    assert cfg.trainable_roles == ("student", "critic")
    t = cfg.training
    assert isinstance(t.lr, float) and t.lr == 2e-6          # YAML 1.2: 2e-6 is a number
    assert t.betas == (0.0, 0.999) and t.grad_clip == 10.0 and isinstance(t.grad_clip, float)
    assert t.ema == EMAConfig(decay=0.99, start_step=200)
    assert t.optim_for("critic") == OptimConfig(lr=4e-7, betas=(0.0, 0.999), weight_decay=0.0, grad_clip=10.0)
    assert t.optim_for("student") == OptimConfig(lr=2e-6, betas=(0.0, 0.999), weight_decay=0.0, grad_clip=10.0)
    assert cfg.pipeline_config.latent_shape == (16, 6, 8, 8)
    assert cfg.pipeline_config.flow_shift == 5.0             # default
    assert cfg.method_config["guidance"] == {"scale": 3.0, "convention": "dmd"}
    assert cfg.logging.validation_prompts == ["a red fox", "yes"]  # 'yes' stays a string
    assert cfg.data.path == ckpt_dirs["prompts"] and cfg.checkpoint.resume == "auto"
    assert cfg.parallel == ParallelConfig(tp=2, sp=2, pp=1, sequence_parallel=True)


def test_round_trip_through_saved_yaml(write_config, dmd2_yaml, tmp_path):
    cfg = load_config(write_config(dmd2_yaml))
    saved = tmp_path / "ckpt" / "config.yaml"
    save_config(cfg, saved)
    again = load_config(saved)
    assert again == cfg
    assert config_to_dict(again) == config_to_dict(cfg)
    assert not [p for p in os.listdir(saved.parent) if p.startswith(".tmp")]  # temp file renamed away
    d = config_to_dict(cfg)
    assert d["training"]["betas"] == [0.0, 0.999] and d["models"]["teacher"]["trainable"] is False
    assert config_from_dict(d) == cfg
    # strings that look like other types are quoted on the way out
    odd = dataclasses.replace(cfg, logging=dataclasses.replace(cfg.logging, validation_prompts=["1e5", "true", "null"]))
    assert load_config(write_config(dump_config(odd), "odd.yaml")) == odd


def test_defaults_of_optional_sections(write_config):
    cfg = load_config(write_config("""
        recipe: {method: finetune}
        models: {student: {preset: tiny}}
        data: {kind: synthetic}
    """))
    assert cfg.training == TrainingConfig() and cfg.parallel == ParallelConfig()
    assert cfg.pipeline_config == PipelineConfig() and cfg.logging == LoggingConfig()
    assert cfg.checkpoint == CheckpointConfig() and cfg.method_config == {}
    assert list(cfg.models) == ["student"]


def test_overrides_nested_lists_bools_null(write_config, dmd2_yaml, ckpt_dirs, tmp_path):
    new_teacher = tmp_path / "other_teacher"
    new_teacher.mkdir()
    cfg = load_config(write_config(dmd2_yaml), overrides=[
        "training.lr=1e-5",
        "training.betas=[0.5, 0.9]",
        "parallel.sequence_parallel=false",
        "parallel.activation_checkpointing=true",
        "checkpoint.resume=null",
        "training.ema=null",
        f"models.teacher.path={new_teacher}",
        "models.student.causal=true",
        "training.optim.student.grad_clip=0",
        "method_config.guidance.scale=4.0",
        "method_config.new_list=[1, 2, 3]",
        "logging.output_dir=runs/a b",
        "pipeline_config.latent_shape=[16, 9, 4, 4]",
    ])
    t = cfg.training
    assert t.lr == 1e-5 and t.betas == (0.5, 0.9) and t.ema is None
    assert cfg.parallel.sequence_parallel is False and cfg.parallel.activation_checkpointing is True
    assert cfg.checkpoint.resume is None
    assert cfg.models["teacher"].path == str(new_teacher) and cfg.models["student"].causal
    assert t.optim == {"critic": OptimOverride(lr=4e-7), "student": OptimOverride(grad_clip=0.0)}
    assert t.optim_for("student").grad_clip == 0.0
    assert cfg.method_config["guidance"] == {"scale": 4.0, "convention": "dmd"}
    assert cfg.method_config["new_list"] == [1, 2, 3]
    assert cfg.logging.output_dir == "runs/a b"
    assert cfg.pipeline_config.latent_shape == (16, 9, 4, 4)
    # a later override of the same key wins; a mapping value replaces the subtree
    cfg = load_config(write_config(dmd2_yaml), overrides=["training.lr=1", "training.lr=3e-4",
                                                         "training.ema={decay: 0.5}"])
    assert cfg.training.lr == 3e-4 and cfg.training.ema == EMAConfig(decay=0.5, start_step=0)


def test_webdataset_paths(write_config, tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    base = """
        recipe: {method: finetune}
        models: {student: {preset: tiny}}
        data: {kind: webdataset, path: PATH, num_workers: 2, shuffle_buffer: 100}
    """
    cfg = load_config(write_config(base.replace("PATH", str(shards))))
    assert cfg.data.path == str(shards) and cfg.data.num_workers == 2
    pattern = str(shards / "{00000..00009}.tar")  # brace pattern: only its directory must exist
    cfg = load_config(write_config(base.replace("PATH", f"'{pattern}'")))
    assert cfg.data.path == pattern


def test_optional_teacher_of_ode_init(write_config, ckpt_dirs):
    text = f"""
        recipe: {{method: ode_init}}
        models:
          student: {{preset: tiny, causal: true}}
          teacher: {{path: {ckpt_dirs["teacher_ckpt"]}}}
        pipeline_config: {{latent_shape: [16, 6, 4, 4], num_frame_per_block: 3}}
        data: {{kind: synthetic}}
    """
    cfg = load_config(write_config(text))
    assert set(cfg.models) == {"student", "teacher"} and cfg.models["teacher"].trainable is False


def test_reference_recipe_documents_every_key_with_its_default():
    path = os.path.join(REPO, "configs", "reference_schema_v2.yaml")
    cfg = load_config(path)
    assert cfg.training == TrainingConfig() and cfg.parallel == ParallelConfig()
    assert cfg.pipeline_config == PipelineConfig() and cfg.logging == LoggingConfig()
    assert cfg.checkpoint == CheckpointConfig() and cfg.method_config == {}
    text = open(path, encoding="utf-8").read()
    classes = [RunConfig, TrainingConfig, ParallelConfig, PipelineConfig, LoggingConfig, CheckpointConfig,
               EMAConfig, OptimOverride]
    from megadistill.config.schema import DataConfig, ModelConfig, RecipeConfig
    classes += [DataConfig, ModelConfig, RecipeConfig]
    missing = [f"{c.__name__}.{f.name}" for c in classes for f in dataclasses.fields(c) if f"{f.name}:" not in text]
    assert not missing, f"reference recipe does not document {missing}"
    assert "decay: 0.99" in text or "default 0.99" in text
