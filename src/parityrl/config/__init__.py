"""Run configuration: the schema (`schema`: every section, field and default, documented), loading
from YAML and `--set` overrides with errors that say where to fix what (`loading`), and the
generated reference (`reference`). Import the names from here."""

from parityrl.config.loading import (
    ConfigError,
    config_hash,
    deep_merge,
    format_validation_error,
    load_config,
    parse_overrides,
    read_config_mapping,
)
from parityrl.config.reference import describe_fields, reference_markdown
from parityrl.config.schema import (
    REPLAYED_SAMPLING_FIELDS,
    AssetsConfig,
    EngineConfig,
    LoggingConfig,
    ModelConfig,
    PipelineConfig,
    RaySettings,
    RunConfig,
    SamplingConfig,
    SFTConfig,
    TaskConfig,
    TrainConfig,
)

__all__ = [
    "REPLAYED_SAMPLING_FIELDS", "AssetsConfig", "ConfigError", "EngineConfig", "LoggingConfig", "ModelConfig", "PipelineConfig",
    "RaySettings", "RunConfig", "SFTConfig", "SamplingConfig", "TaskConfig", "TrainConfig", "config_hash", "deep_merge",
    "describe_fields", "format_validation_error", "load_config", "parse_overrides", "read_config_mapping", "reference_markdown",
]
