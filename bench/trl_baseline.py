"""TRL's GRPOTrainer as a baseline on sponge's toy tasks: the same task, model, warm start, batch
(prompts × group size), learning rate and held-out evaluation as a sponge run, with TRL's own
training loop. Optional: needs `trl` (`pip install trl==1.16.0 torch==2.13.0` on one line).

    from bench.trl_baseline import run_trl
    history = run_trl(model, tokenizer, task, config, eval_prompts)   # config: a ReMixConfig

The history has the records a `ReMixTrainer` history has for the benchmark: rollouts, wall_time,
step_s, reward_mean, response_len, and at each evaluation eval_success / eval_response_len, measured
by the same function (greedy, `sponge.trainer.TransformersGenerator`, `task.success`).
"""

from __future__ import annotations

import logging
import tempfile
import time
import warnings

import numpy as np
import torch

from sponge.trainer import ReMixConfig, TransformersGenerator


def trl_available() -> bool:
    try:
        import trl  # noqa: F401
        return True
    except Exception:  # noqa: BLE001 - any import failure means: no TRL baseline
        return False


def evaluate(model, tokenizer, task, eval_prompts: list[str], max_new_tokens: int, temperature: float,
             seed: int) -> dict:
    """Held-out success exactly as ReMixTrainer.evaluate computes it."""
    tokens = [tokenizer.encode_prompt(p) for p in eval_prompts]
    with torch.no_grad():
        gen = TransformersGenerator(tokenizer).generate(model, tokens, max_new_tokens, temperature, seed=seed)
    return {"eval_success": float(np.mean(task.success(eval_prompts, gen.responses))),
            "eval_response_len": float(np.mean([len(r) for r in gen.response_tokens]))}


def run_trl(model, tokenizer, task, config: ReMixConfig, eval_prompts: list[str]) -> list[dict]:
    """Train `model` in place with TRL's GRPOTrainer for config.rollout_budget rollouts.

    Mapped from the sponge config: prompts_per_step × group_size rollouts per step (one generation
    batch per optimiser step), group_size = num_generations, max_new_tokens, temperature,
    learning_rate, max_grad_norm, clip_eps, seed; β = 0 (TRL's default); every other knob is
    TRL's default (loss_type "dapo", scale_rewards "group", Adam(W) with no decay, constant lr)."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl import GRPOConfig, GRPOTrainer

    for name in ("transformers", "trl", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    cfg = config
    per_step = cfg.prompts_per_step * cfg.group_size
    steps = -(-cfg.rollout_budget // per_step)
    rng = np.random.default_rng(cfg.seed)
    prompts, _ = task.sample(rng, steps * cfg.prompts_per_step)
    dataset = Dataset.from_dict({"prompt": prompts})

    def reward(prompts, completions, **_):
        return [float(r) for r in task.reward(list(prompts), list(completions))]

    history: list[dict] = []
    clock = {"wall": 0.0, "t0": 0.0}

    def record_eval(step: int, extra: dict) -> None:
        was_training = model.training
        model.eval()
        ev = evaluate(model, tokenizer, task, eval_prompts, cfg.max_new_tokens, cfg.eval_temperature,
                      cfg.seed + 1_000_003)
        model.train(was_training)   # TRL files its step metrics under "eval" while the model is in eval mode
        history.append({"iteration": step, "rollouts": step * per_step, "wall_time": clock["wall"], **extra, **ev})

    class Hooks(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            clock["t0"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            dt = time.perf_counter() - clock["t0"]
            clock["wall"] += dt
            rec = {"step_s": dt}
            step = state.global_step
            if step % cfg.eval_every == 0 or step == steps:
                record_eval(step, rec)
            else:
                history.append({"iteration": step, "rollouts": step * per_step, "wall_time": clock["wall"], **rec})

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and history:   # TRL logs the step's reward and completion length after the step
                history[-1].setdefault("reward_mean", logs.get("reward", float("nan")))
                history[-1].setdefault("response_len", logs.get("completions/mean_length", float("nan")))

    with tempfile.TemporaryDirectory() as out:
        args = GRPOConfig(
            output_dir=out, per_device_train_batch_size=per_step, num_generations=cfg.group_size,
            max_completion_length=cfg.max_new_tokens, temperature=cfg.temperature, learning_rate=cfg.learning_rate,
            lr_scheduler_type="constant", warmup_steps=0, beta=0.0, epsilon=cfg.clip_eps, max_steps=steps,
            max_grad_norm=cfg.max_grad_norm if cfg.max_grad_norm is not None else 0.0, seed=cfg.seed,
            logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, bf16=False,
            dataloader_num_workers=0, disable_tqdm=True, shuffle_dataset=False)
        trainer = GRPOTrainer(model=model, reward_funcs=[reward], args=args, train_dataset=dataset,
                              processing_class=tokenizer.to_hf(), callbacks=[Hooks()])
        for quiet in (PrinterCallback, ProgressCallback):
            trainer.remove_callback(quiet)
        record_eval(0, {})
        history[0]["reward_mean"] = float("nan")
        trainer.train()
    model.eval()
    return history
