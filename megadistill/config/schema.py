"""Typed schema (v2) of a run config: one dataclass per YAML section.

Field metadata carries what the loader checks beyond the type: ``ge``/``gt``/``le``/``lt`` bounds
(applied to every element of a list or tuple). A field without a default is required.
``configs/reference_schema_v2.yaml`` documents every key with its default.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Literal, Optional, Tuple

METHODS = ("dmd2", "finetune", "self_forcing", "ode_init")
ROLES = ("student", "teacher", "critic")

# Roles each method needs, and the ones it may take in addition.
REQUIRED_ROLES = {
    "dmd2": ("student", "teacher", "critic"),
    "self_forcing": ("student", "teacher", "critic"),
    "finetune": ("student",),
    "ode_init": ("student",),
}
OPTIONAL_ROLES = {
    "ode_init": ("teacher",),  # generates ODE trajectories online when no trajectory data is given
}
# The student and critic are trained, the teacher is a frozen reference, in every method.
ROLE_TRAINABLE = {"student": True, "teacher": False, "critic": True}

Method = Literal["dmd2", "finetune", "self_forcing", "ode_init"]
DType = Literal["fp32", "bf16", "fp16"]
LRScheduler = Literal["constant", "cosine", "linear"]
DataKind = Literal["prompts", "webdataset", "synthetic"]
PipelineSchedule = Literal["interleaved", "sequential"]
# Settings of the synthetic blob world (megadistill.data.synthetic.SyntheticVideoWorld) a run may
# change under ``data.world``; its shape comes from pipeline_config.latent_shape. Its ``seed``
# (default 0, the world of the shipped tiny teacher) is the dataset's, not training.seed: a run's
# seed changes which clips are drawn, never what the clips look like.
SYNTHETIC_WORLD_KEYS = ("seed", "blob_sigma", "amplitude_range", "travel_range", "margin", "background_std",
                        "background_smoothness", "noise_std")
SYNTHETIC_WORLD_SEED = 0


def _f(default=dataclasses.MISSING, *, factory=dataclasses.MISSING, **bounds):
    return field(default=default, default_factory=factory, metadata=bounds)


@dataclass(frozen=True)
class RecipeConfig:
    method: Method
    family: str = "wan"


@dataclass(frozen=True)
class ModelConfig:
    """One role. ``family`` defaults to ``recipe.family``, ``trainable`` to the role's rule."""

    family: Optional[str] = None
    path: Optional[str] = None      # checkpoint dir/file; made absolute, must exist
    preset: Optional[str] = None    # named shape (e.g. "tiny", "wan2.1-t2v-1.3b"); random init without path
    trainable: Optional[bool] = None
    dtype: DType = "fp32"
    causal: bool = False            # block-causal student (self-forcing / ODE-init of a causal student)
    # Under a ZeRO-3 DeepSpeed config: partition this role's weights over the data-parallel group
    # (default). A frozen role may set false to stay whole on every GPU: more memory, but no
    # all-gather of its weights at every forward.
    zero3_partition: bool = True
    # Critic only: add DMD2's realism classifier on its last hidden states (the GAN term of dmd2,
    # method_config.gan_generator_weight / gan_critic_weight). Its weights live in the critic's
    # training state only; they are not part of the model's checkpoint format.
    realism_head: bool = False


@dataclass(frozen=True)
class ParallelConfig:
    tp: int = _f(1, ge=1)
    sp: int = _f(1, ge=1)
    pp: int = _f(1, ge=1)
    sequence_parallel: bool = False         # Megatron sequence parallel inside the TP group
    activation_checkpointing: bool = False
    # pp > 1 only: the schedule engine's order of the op graph on the stages, and the number of
    # equal microbatches a step's batch is split into (null: training.micro_batch_size, one
    # sample each; must divide it).
    pipeline_schedule: PipelineSchedule = "interleaved"
    microbatches: Optional[int] = _f(None, ge=1)


@dataclass(frozen=True)
class OptimConfig:
    """Resolved optimizer settings of one trainable role (see ``TrainingConfig.optim_for``)."""

    lr: float
    betas: Tuple[float, float]
    weight_decay: float
    grad_clip: float


@dataclass(frozen=True)
class OptimOverride:
    """Per-role optimizer settings; ``null`` keeps the value of ``training``."""

    lr: Optional[float] = _f(None, gt=0)
    betas: Optional[Tuple[float, float]] = _f(None, ge=0, lt=1)
    weight_decay: Optional[float] = _f(None, ge=0)
    grad_clip: Optional[float] = _f(None, ge=0)


@dataclass(frozen=True)
class EMAConfig:
    decay: float = _f(0.99, gt=0, lt=1)
    start_step: int = _f(0, ge=0)


@dataclass(frozen=True)
class TrainingConfig:
    seed: int = _f(0, ge=0)
    max_steps: int = _f(1000, ge=1)
    micro_batch_size: int = _f(1, ge=1)
    gradient_accumulation_steps: int = _f(1, ge=1)
    lr: float = _f(1e-5, gt=0)
    betas: Tuple[float, float] = _f((0.9, 0.999), ge=0, lt=1)
    weight_decay: float = _f(0.0, ge=0)
    grad_clip: float = _f(1.0, ge=0)        # max global grad norm; 0 disables clipping
    lr_scheduler: LRScheduler = "constant"
    warmup_steps: int = _f(0, ge=0)
    max_nonfinite_steps: int = _f(10, ge=0)  # consecutive skipped non-finite steps before abort
    optim: Dict[str, OptimOverride] = _f(factory=dict)  # keyed by trainable role
    ema: Optional[EMAConfig] = None          # null: no EMA of the student

    def optim_for(self, role: str) -> OptimConfig:
        """Optimizer settings of ``role``: its override where set, else the training default."""
        o = self.optim.get(role, OptimOverride())
        pick = lambda mine, default: default if mine is None else mine  # noqa: E731
        return OptimConfig(lr=pick(o.lr, self.lr), betas=pick(o.betas, self.betas),
                           weight_decay=pick(o.weight_decay, self.weight_decay),
                           grad_clip=pick(o.grad_clip, self.grad_clip))


@dataclass(frozen=True)
class PipelineConfig:
    latent_shape: Tuple[int, int, int, int] = _f((16, 21, 60, 104), ge=1)  # [C, F, H, W]
    text_len: int = _f(512, ge=1)
    num_frame_per_block: int = _f(3, ge=1)   # latent frames per causal block
    flow_shift: float = _f(5.0, gt=0)
    num_train_timesteps: int = _f(1000, ge=1)
    local_attn_size: int = _f(-1, ge=-1)     # causal attention window in frames; -1 = unlimited
    sink_size: int = _f(0, ge=0)             # attention-sink frames kept by a local window
    # Text encoder turning prompts into text states: a folder (diffusers text_encoder + tokenizer,
    # or Wan's native files), or "tiny" / "tiny-positional" (optionally ":SEED") for a deterministic
    # tiny UMT5 + sentencepiece encoder the project builds itself (tests, synthetic recipes; the
    # shipped tiny teacher reads "tiny-positional").
    text_encoder: Optional[str] = None


@dataclass(frozen=True)
class DataConfig:
    kind: DataKind
    path: Optional[str] = None  # prompts: text file, one prompt a line; webdataset: dir/shard pattern
    num_workers: int = _f(0, ge=0)
    shuffle_buffer: int = _f(0, ge=0)
    world: Dict[str, Any] = _f(factory=dict)  # synthetic only: SYNTHETIC_WORLD_KEYS overrides


@dataclass(frozen=True)
class LoggingConfig:
    output_dir: str = "outputs"
    tensorboard: bool = True
    log_every: int = _f(10, ge=1)
    validation_every: int = _f(0, ge=0)          # 0: no validation
    validation_prompts: List[str] = _f(factory=list)
    sample_steps: Optional[int] = _f(None, ge=1)  # null: the method's own step list
    # dmd2 on synthetic data: after the last step, print the quality report (FD, adherence,
    # temporal error of teacher 50 / 4 steps and the student; docs/QUALITY.md) on this many clips.
    quality_samples: int = _f(0, ge=0)


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = _f(1000, ge=0)       # 0: only at the end
    keep_last: int = _f(2, ge=0)      # 0: keep all
    resume: Optional[str] = None      # null | auto (latest in output_dir) | checkpoint path


@dataclass(frozen=True)
class RunConfig:
    recipe: RecipeConfig
    models: Dict[str, ModelConfig]
    data: DataConfig
    parallel: ParallelConfig = _f(factory=ParallelConfig)
    training: TrainingConfig = _f(factory=TrainingConfig)
    pipeline_config: PipelineConfig = _f(factory=PipelineConfig)
    method_config: Dict[str, Any] = _f(factory=dict)  # validated by the method
    logging: LoggingConfig = _f(factory=LoggingConfig)
    checkpoint: CheckpointConfig = _f(factory=CheckpointConfig)

    @property
    def trainable_roles(self) -> Tuple[str, ...]:
        return tuple(r for r in ROLES if r in self.models and self.models[r].trainable)
