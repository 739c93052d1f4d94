from .load import dump_config, from_dict, load_config, preset_names, to_dict
from .schema import (
    ConditionConfig,
    DataConfig,
    DiscriminatorConfig,
    EncoderDecoderConfig,
    EngineConfig,
    GPTConfig,
    LoggingConfig,
    OptimConfig,
    QuantizerConfig,
    RunConfig,
    TrainConfig,
    TransformerModelConfig,
    VQLossConfig,
    VQModelConfig,
    batch_layout,
)

__all__ = [
    "ConditionConfig", "DataConfig", "DiscriminatorConfig", "EncoderDecoderConfig", "EngineConfig",
    "GPTConfig", "LoggingConfig", "OptimConfig", "QuantizerConfig", "RunConfig", "TrainConfig",
    "TransformerModelConfig", "VQLossConfig", "VQModelConfig",
    "batch_layout", "dump_config", "from_dict", "load_config", "preset_names", "to_dict",
]
