"""`sponge train`: train a policy on a toy task with ReMix or on-policy GRPO.

Writes metrics.jsonl, metrics.csv, curves.png and a checkpoint under --out; --resume continues a
run from its checkpoint. The default policy is a tiny GPT-2 built in code with a short supervised
warm start; --model loads any local Hugging Face causal LM instead (no download).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

HELP = "train a tiny model on a toy task with ReMix or GRPO"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .config import CHOICES, ReMixConfig, field_docs
    from .tasks import TASKS

    parser.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    parser.add_argument("--task", choices=sorted(TASKS), default="reverse", help="toy task")
    parser.add_argument("--algo", choices=["remix", "grpo"], default="remix",
                        help="remix = off-policy ReMix; grpo = on-policy baseline as TRL runs it "
                             "(p=0, m=1, no KL, no reincarnation, no dynamic sampling)")
    parser.add_argument("--out", type=Path, default=Path("runs/train"), help="output directory")
    parser.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint")
    parser.add_argument("--model", type=str, default=None,
                        help="local Hugging Face model directory (default: a tiny GPT-2 built in code)")
    parser.add_argument("--warm-start-steps", type=int, default=50,
                        help="supervised warm-start steps for the tiny model (so rewards are not all zero)")
    parser.add_argument("--n-layer", type=int, default=2, help="tiny model: transformer blocks")
    parser.add_argument("--n-embd", type=int, default=64, help="tiny model: hidden width")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    defaults, docs = ReMixConfig(), field_docs(ReMixConfig)
    optional_float = {"ratio_cap", "max_grad_norm", "target_kl", "reincarnate_after", "max_wall_seconds",
                      "clip_eps_high"}
    optional_int = {"reincarnate_at", "max_iterations", "checkpoint_every"}
    optional_bool = {"recompute_logprobs"}
    group = parser.add_argument_group("ReMixConfig (sponge/trainer/config.py documents each knob)")
    for f in dataclasses.fields(ReMixConfig):
        if f.name in ("progress",):
            continue
        default = getattr(defaults, f.name)
        flag = "--" + f.name.replace("_", "-")
        text = docs.get(f.name, "") or f.name.replace("_", " ")
        if f.name in optional_bool:
            group.add_argument(flag, type=_optional(_bool), default=default, metavar="BOOL|none", help=text)
        elif isinstance(default, bool):
            group.add_argument(flag, type=_bool, default=default, metavar="BOOL", help=text)
        elif f.name in optional_float or f.name in optional_int:
            kind = float if f.name in optional_float else int
            group.add_argument(flag, type=_optional(kind), default=default, metavar="VALUE|none", help=text)
        elif f.name in CHOICES:
            group.add_argument(flag, choices=CHOICES[f.name], default=default, help=text)
        else:
            group.add_argument(flag, type=type(default), default=default, help=text)


def _bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def _optional(kind):
    def parse(s: str):
        return None if s.lower() == "none" else kind(s)
    return parse


def run(args: argparse.Namespace) -> int:
    import torch

    from .config import ReMixConfig
    from .models import (
        CharTokenizer,
        TinyModelConfig,
        build_tiny_model,
        load_pretrained,
        warm_start,
    )
    from .remix import ReMixTrainer
    from .tasks import make_task

    torch.set_num_threads(args.threads)
    knobs = {f.name: getattr(args, f.name) for f in dataclasses.fields(ReMixConfig) if hasattr(args, f.name)}
    try:
        if args.algo == "grpo":
            knobs.update(replay_fraction=0.0, updates_per_batch=1, reincarnate_at=None, reincarnate_after=None,
                         dynamic_sampling=False)
            if knobs["run_name"] == "remix":
                knobs["run_name"] = "grpo"
        config = ReMixConfig(**knobs)
        task = make_task(args.task)
    except ValueError as exc:
        print(f"sponge train: {exc}")
        return 2

    if args.model:
        model, tokenizer = load_pretrained(args.model)
    else:
        tokenizer = CharTokenizer(task.alphabet)
        model = build_tiny_model(tokenizer, TinyModelConfig(n_layer=args.n_layer, n_embd=args.n_embd),
                                 seed=config.seed)
        if not args.resume and args.warm_start_steps > 0:
            warm_start(model, tokenizer, task, steps=args.warm_start_steps, seed=config.seed, progress=True)

    trainer = ReMixTrainer(model, tokenizer, task, config, output_dir=args.out)
    if args.resume:
        trainer.load_checkpoint(args.out / "checkpoint")
        print(f"resumed at policy version {trainer.version}, {trainer.rollouts_generated} rollouts")
    history = trainer.train()
    evals = [r for r in history if "eval_success" in r]
    summary = {"task": task.name, "algo": args.algo, "rollouts": trainer.rollouts_generated,
               "policy_version": trainer.version, "eval_success_start": evals[0]["eval_success"],
               "eval_success_end": evals[-1]["eval_success"],
               "eval_response_len_end": evals[-1]["eval_response_len"],
               "wall_time_s": round(trainer.wall_time, 2), "out": str(args.out)}
    print(json.dumps(summary, indent=2))
    return 0
