"""Your own task, tokenizer and model in ReMixTrainer: a fixed prompt stream, a reward on token ids,
a held-out set of your own, your optimiser, your evaluation and a wall-clock cap.

The task: answer a string of letters with it sorted ("dbca=" → "abcd"). The model: a tiny Llama
built from a config (nothing downloaded), tokenized by a Hugging Face tokenizer built offline. Runs
on a CPU in a minute or two:

    python examples/custom_task.py
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

from sponge.trainer import (
    CharTokenizer,
    HFTokenizer,
    ReMixConfig,
    ReMixTrainer,
    TinyModelConfig,
    build_tiny_model,
    warm_start,
)

ALPHABET = "abcdef="


class SortTask:
    """A task is any object with `sample` and `score` (see sponge/trainer/tasks.py)."""

    name = "sort"

    def __init__(self, tokenizer: HFTokenizer, seed: int = 0):
        rng = np.random.default_rng(seed)
        letters = np.array(list(ALPHABET[:-1]))
        # A fixed, finite prompt stream: cycled in order; the trainer's RNG is not used.
        prompts = ["".join(rng.choice(letters, size=rng.integers(3, 6))) + "=" for _ in range(4000)]
        self.train_prompts, self.held_out = prompts[:3500], prompts[3500:]
        self.stream = itertools.cycle(self.train_prompts)
        self.tok = tokenizer

    def answer(self, prompt: str) -> str:
        return "".join(sorted(prompt.rstrip("=")))

    def sample(self, rng, n):        # `rng` is the trainer's: ignored by a fixed stream
        prompts = [next(self.stream) for _ in range(n)]
        return prompts, [self.answer(p) for p in prompts]

    def score(self, prompts, generation):
        """Reward on token ids: 1 for the exact answer (eos included), else the share of positions
        right. `generation.response_tokens` are the ids the policy emitted."""
        out = np.zeros(len(prompts), dtype=np.float32)
        for i, (p, ids) in enumerate(zip(prompts, generation.response_tokens)):
            target = self.tok.encode_response(self.answer(p))
            hits = sum(a == b for a, b in zip(target, ids))
            out[i] = 1.0 if list(ids) == target else 0.5 * hits / max(len(target), len(ids))
        return out

    def success(self, prompts, responses):
        return np.array([r == self.answer(p) for p, r in zip(prompts, responses)], dtype=np.float32)


def main() -> None:
    torch.set_num_threads(2)
    chars = CharTokenizer(ALPHABET)
    tokenizer = HFTokenizer(chars.to_hf(), skip_special_tokens=False)   # the reward may see special tokens
    task = SortTask(tokenizer)
    model = build_tiny_model(chars, TinyModelConfig(arch="llama", n_embd=64, n_layer=2), seed=0)
    warm_start(model, tokenizer, task, steps=60, seed=0)

    def evaluate(trainer: ReMixTrainer) -> dict:
        """Our own held-out evaluation: greedy exact match on our held-out prompts."""
        prompts = task.held_out[:200]
        gen = trainer.generator.generate(trainer.policy, [tokenizer.encode_prompt(p) for p in prompts],
                                         trainer.config.max_new_tokens, temperature=0.0, seed=0)
        return {"eval_success": float(task.success(prompts, gen.responses).mean())}

    config = ReMixConfig(rollout_budget=2400, max_new_tokens=7, replay_pool="curated", eval_every=5,
                         max_wall_seconds=120, run_name="sort", progress=True)
    trainer = ReMixTrainer(
        model, tokenizer, task, config,
        eval_fn=evaluate,                                                   # replaces the default evaluation
        optimizer=lambda params: torch.optim.AdamW(params, lr=3e-4, weight_decay=0.01),
    )
    history = trainer.train()
    evals = [r["eval_success"] for r in history if "eval_success" in r]
    print(f"held-out exact match {evals[0]:.3f} → {evals[-1]:.3f} after {trainer.rollouts_generated} rollouts "
          f"({trainer.wall_time:.0f} s, {len(trainer.collapses)} collapses, "
          f"{trainer.rollouts_saved:.0f} rollouts saved by dynamic sampling)")


if __name__ == "__main__":
    main()
