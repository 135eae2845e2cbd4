"""`sponge train`: train a policy on a toy task with ReMix or on-policy GRPO.

Writes metrics.jsonl, metrics.csv, curves.png and a checkpoint under --out; --resume continues a
run from its checkpoint. The default policy is a tiny GPT-2 built in code with a short supervised
warm start; --model loads any local Hugging Face causal LM instead (no download). Every knob of
`TrainCommand` and `ReMixConfig` is a flag, a SPONGE_* variable and a config-file key
(`sponge.config`).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .config import ReMixConfig

HELP = "train a tiny model on a toy task with ReMix or GRPO"


@dataclass
class TrainCommand:
    """What `sponge train` runs: the task, the model, where to write, and the trainer's own config."""

    #: toy task with a verifiable reward
    task: Literal["reverse", "reverse_mixed", "add"] = "reverse"
    #: remix = off-policy ReMix; grpo = the on-policy baseline as TRL runs it (p=0, m=1, no KL, no
    #: reincarnation, no dynamic sampling)
    algo: Literal["remix", "grpo"] = "remix"
    #: output directory (metrics, curves, checkpoint)
    out: str = "runs/train"
    #: continue from <out>/checkpoint
    resume: bool = False
    #: local Hugging Face causal LM directory (default: a tiny GPT-2 built in code; nothing is downloaded)
    model: str | None = None
    #: supervised warm-start steps for the tiny model (so rewards are not all zero)
    warm_start_steps: int = 50
    #: tiny model: transformer blocks
    n_layer: int = 2
    #: tiny model: hidden width
    n_embd: int = 64
    #: torch CPU threads
    threads: int = 2
    remix: ReMixConfig = field(default_factory=ReMixConfig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from sponge.config import add_flags

    parser.description = __doc__.split("\n\n")[0]
    add_flags(parser, TrainCommand)


def run(args: argparse.Namespace) -> int:
    import dataclasses

    import torch

    from sponge.config import ConfigError, load

    from .models import CharTokenizer, TinyModelConfig, build_tiny_model, load_pretrained, warm_start
    from .remix import ReMixTrainer
    from .tasks import make_task

    try:
        command: TrainCommand = load(TrainCommand, args)
        config = command.remix
        if command.algo == "grpo":
            config = ReMixConfig.grpo(**{k: v for k, v in dataclasses.asdict(config).items()
                                         if k not in _GRPO_FIXED and v != getattr(ReMixConfig(), k)})
        task = make_task(command.task)
    except (ConfigError, ValueError) as exc:
        print(f"sponge train: error: {exc}")
        return 2
    torch.set_num_threads(command.threads)
    out = Path(command.out)
    if command.model:
        model, tokenizer = load_pretrained(command.model)
    else:
        tokenizer = CharTokenizer(task.alphabet)
        model = build_tiny_model(tokenizer, TinyModelConfig(n_layer=command.n_layer, n_embd=command.n_embd),
                                 seed=config.seed)
        if not command.resume and command.warm_start_steps > 0:
            warm_start(model, tokenizer, task, steps=command.warm_start_steps, seed=config.seed, progress=True)

    trainer = ReMixTrainer(model, tokenizer, task, config, output_dir=out)
    if command.resume:
        trainer.load_checkpoint(out / "checkpoint")
        print(f"resumed at policy version {trainer.version}, {trainer.rollouts_generated} rollouts")
    history = trainer.train()
    evals = [r for r in history if "eval_success" in r]
    summary = {"task": task.name, "algo": command.algo, "rollouts": trainer.rollouts_generated,
               "policy_version": trainer.version,
               "eval_success_start": evals[0]["eval_success"] if evals else None,
               "eval_success_end": evals[-1]["eval_success"] if evals else None,
               "eval_response_len_end": evals[-1].get("eval_response_len") if evals else None,
               "wall_time_s": round(trainer.wall_time, 2), "out": str(out)}
    print(json.dumps(summary, indent=2))
    return 0


#: What `--algo grpo` fixes (ReMixConfig.grpo); every other knob keeps what the user set.
_GRPO_FIXED = ("replay_fraction", "updates_per_batch", "reincarnate_at", "reincarnate_after", "kl_coef",
               "dynamic_sampling")
