"""sponge.trainer: ReMix off-policy RL fine-tuning with GLOW-style density-ratio replay.

Public API:
- config:     `ReMixConfig` (every knob, documented; `ReMixConfig.grpo()` for the on-policy baseline)
- trainer:    `ReMixTrainer` (generate → reward → replay → m updates → version; checkpoints; guard)
- losses:     `sponge.trainer.losses` (PPO clip, decoupled PPO, Mix-PPG, KL-Convex, entropy, aggregation);
              GRPO advantages are `sponge.groups.group_advantages`
- replay:     the in-process `sponge.contract.ReplaySource` pools (`FIFOReplayPool`, `RandomReplayPool`,
              `CuratedReplayPool`, `DiverseReplayPool`), `ReplaySampler`,
              `draw_groups`, `rollouts_table`; the density ratios and off-policy corrections (TIS, MIS,
              IcePop, geometric mask) in `sponge.trainer.density_ratio`
- guard:      `CollapseGuard`
- generators: `Generator`, `TransformersGenerator`, `VLLMGenerator` (lazy, optional extra)
- tasks:      `ReverseTask`, `AdditionTask`, `make_task`
- models:     `CharTokenizer`, `build_tiny_model`, `warm_start`, `load_pretrained`, `response_logprobs`
"""

from . import density_ratio, losses
from .config import ReMixConfig
from .generators import Generation, Generator, TransformersGenerator, VLLMGenerator
from .guard import CollapseGuard
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
    CuratedReplayPool,
    DiverseReplayPool,
    FIFOReplayPool,
    RandomReplayPool,
    ReplayDraw,
    ReplaySampler,
    ReplaySource,
    draw_groups,
    make_pool,
    rollouts_table,
)
from .tasks import AdditionTask, ReverseTask, Task, make_task

__all__ = [
    "AdditionTask",
    "CharTokenizer",
    "CollapseGuard",
    "CuratedReplayPool",
    "DiverseReplayPool",
    "FIFOReplayPool",
    "Generation",
    "Generator",
    "HFTokenizer",
    "RandomReplayPool",
    "ReMixConfig",
    "ReMixTrainer",
    "ReplayDraw",
    "ReplaySampler",
    "ReplaySource",
    "ReverseTask",
    "Task",
    "TinyModelConfig",
    "TransformersGenerator",
    "VLLMGenerator",
    "build_tiny_model",
    "density_ratio",
    "draw_groups",
    "load_pretrained",
    "losses",
    "make_pool",
    "make_task",
    "response_logprobs",
    "rollouts_table",
    "warm_start",
]
