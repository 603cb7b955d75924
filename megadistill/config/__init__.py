"""Run configuration (schema v2): typed dataclasses, one YAML loader, strict checks."""
from .errors import ConfigError
from .loader import (config_from_dict, config_to_dict, dump_config, load_config, parse_override,
                     save_config)
from .schema import (METHODS, OPTIONAL_ROLES, REQUIRED_ROLES, ROLE_TRAINABLE, ROLES, CheckpointConfig,
                     DataConfig, EMAConfig, LoggingConfig, ModelConfig, OptimConfig, OptimOverride,
                     ParallelConfig, PipelineConfig, RecipeConfig, RunConfig, TrainingConfig)

__all__ = [
    "METHODS", "OPTIONAL_ROLES", "REQUIRED_ROLES", "ROLES", "ROLE_TRAINABLE", "CheckpointConfig",
    "ConfigError", "DataConfig", "EMAConfig", "LoggingConfig", "ModelConfig", "OptimConfig",
    "OptimOverride", "ParallelConfig", "PipelineConfig", "RecipeConfig", "RunConfig", "TrainingConfig",
    "config_from_dict", "config_to_dict", "dump_config", "load_config", "parse_override", "save_config",
]
