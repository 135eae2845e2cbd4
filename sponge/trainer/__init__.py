"""sponge.trainer: ReMix off-policy RL fine-tuning with GLOW-style density-ratio replay.

Public API:
- config:     `ReMixConfig` (every knob, documented; `ReMixConfig.grpo()` for the on-policy baseline)
- trainer:    `ReMixTrainer` (generate → reward → replay → m updates → version; checkpoints; hooks)
- losses:     `sponge.trainer.losses` (GRPO advantages, PPO clip, Mix-PPG, KL-Convex, entropy, aggregation)
- sampler:    `ReplaySampler`, `ReplaySource`, `FIFOReplayPool`, `DiverseReplayPool`, `rollouts_table`
              and the density-ratio functions in `sponge.trainer.density_ratio`
- generators: `Generator`, `TransformersGenerator`, `VLLMGenerator` (lazy, optional extra)
- tasks:      `ReverseTask`, `AdditionTask`, `make_task`
- models:     `CharTokenizer`, `build_tiny_model`, `warm_start`, `load_pretrained`, `response_logprobs`
"""

from . import density_ratio, losses
from .config import ReMixConfig
from .generators import Generation, Generator, TransformersGenerator, VLLMGenerator
from .models import (
    CharTokenizer,
    HFTokenizer,
    TinyModelConfig,
    build_tiny_model,
    load_pretrained,
    response_logprobs,
    warm_start,
)
from .remix import ReMixTrainer
from .replay import (
    DiverseReplayPool,
    FIFOReplayPool,
    ReplayDraw,
    ReplaySampler,
    ReplaySource,
    SelectorReplayPool,
    rollouts_table,
)
from .tasks import AdditionTask, ReverseTask, Task, make_task

__all__ = [
    "AdditionTask",
    "CharTokenizer",
    "DiverseReplayPool",
    "FIFOReplayPool",
    "Generation",
    "Generator",
    "HFTokenizer",
    "ReMixConfig",
    "ReMixTrainer",
    "ReplayDraw",
    "ReplaySampler",
    "ReplaySource",
    "ReverseTask",
    "SelectorReplayPool",
    "Task",
    "TinyModelConfig",
    "TransformersGenerator",
    "VLLMGenerator",
    "build_tiny_model",
    "density_ratio",
    "load_pretrained",
    "losses",
    "make_task",
    "response_logprobs",
    "rollouts_table",
    "warm_start",
]
