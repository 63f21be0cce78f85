"""Typed configuration for a whole run.

YAML in, validated by pydantic, unknown keys rejected with the closest valid key
suggested. Every field carries one line of documentation. The config is never
mutated after validation: code that needs a derived value computes it.

`inputs` holds the sections a run starts from, `training` those of how it learns and is
judged, `schema` the whole Config and its cross-section checks, `loading` YAML and --set.
"""

from .inputs import (
    DataConfig,
    EnvConfig,
    GenerationConfig,
    KLConfig,
    LoraConfig,
    ModelConfig,
    RewardTerm,
    RolloutConfig,
)
from .loading import build_config, deep_merge, dump_config, format_validation_error, load_config, parse_set, read_yaml
from .schema import Config
from .training import AlgorithmConfig, DynaConfig, EvalConfig, LogConfig, PlannerConfig, TrainConfig

__all__ = [
    "AlgorithmConfig", "Config", "DataConfig", "DynaConfig", "EnvConfig", "EvalConfig",
    "GenerationConfig", "KLConfig", "LogConfig", "LoraConfig", "ModelConfig", "PlannerConfig", "RewardTerm",
    "RolloutConfig", "TrainConfig", "build_config", "deep_merge", "dump_config", "format_validation_error",
    "load_config", "parse_set", "read_yaml",
]
