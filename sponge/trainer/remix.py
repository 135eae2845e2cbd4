"""The ReMix trainer (Liang, Tang et al. 2025), GRPO flavour, readable top to bottom.

One iteration at policy version k (`ReMixTrainer.step`):

    1. generate   fresh prompts × group_size responses from π_k (fewer prompts while replay is on)
    2. reward     the task's verifiable reward; GRPO group-relative advantages
    3. replay     draw p/(1−p) × (fresh responses) rollouts of π_{k−1..k−N} from the replay source,
                  with truncated density-ratio weights (GLOW); then offer the fresh batch to it
    4. update     m gradient steps on  Mix-PPG − c·H + β·KL-Convex  over fresh + replayed tokens
    5. version    k ← k + 1; report it (hook); at k = T reincarnate: π_base ← π_k, replay off

With replay_fraction = 0 and updates_per_batch = 1 this is exactly GRPO (`ReMixConfig.grpo()`).
The KL-Convex term holds π_base and π_{k−1} as frozen copies of the weights (choice).
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from .config import ReMixConfig
from .generators import Generator, TransformersGenerator
from .losses import (
    aggregate,
    group_advantages,
    kl_convex,
    kl_convex_lambda,
    mix_ppg_loss,
)
from .metrics import MetricsLog, plot_runs
from .models import response_logprobs
from .replay import (
    DiverseReplayPool,
    FIFOReplayPool,
    ReplaySampler,
    ReplaySource,
    SelectorReplayPool,
    padded_list_column,
    rollouts_table,
)

__all__ = ["ReMixTrainer"]


class ReMixTrainer:
    """Trains `model` on `task` with ReMix (or GRPO, see `ReMixConfig.grpo`).

    Hooks: `on_policy_version(version)` after every update (the engine evicts stale rollouts),
    `on_rollouts(table)` with every freshly generated batch as an Arrow table in the rollout
    record schema (to publish to Kafka). `replay_source` defaults to the pool the config names.
    """

    def __init__(self, model, tokenizer, task, config: ReMixConfig, *, generator: Generator | None = None,
                 replay_source: ReplaySource | None = None, output_dir: str | Path | None = None,
                 on_policy_version: Callable[[int], None] | None = None,
                 on_rollouts: Callable[[pa.Table], None] | None = None):
        self.config, self.task, self.tokenizer = config, task, tokenizer
        self.policy = model
        self.generator = generator or TransformersGenerator(tokenizer)
        self.replay = replay_source or _make_pool(config)
        self.sampler = ReplaySampler(config.replay_sampling, config.ratio_mode, config.ratio_cap,
                                     config.ratio_cap_gamma, config.ratio_cap_min, config.ratio_cap_max,
                                     config.recency_decay)
        self.on_policy_version, self.on_rollouts = on_policy_version, on_rollouts
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.log = MetricsLog(self.output_dir)

        torch.manual_seed(config.seed)
        self.optimizer = torch.optim.Adam(self.policy.parameters(), lr=config.learning_rate)
        # Frozen references for KL-Convex: π_base (reset at reincarnation) and π_{k−1}.
        self.base = _frozen_copy(model) if config.kl_coef > 0 else None
        self.prev = _frozen_copy(model) if config.kl_coef > 0 else None

        self.rng = np.random.default_rng(config.seed)
        self.version = 0            # policy version = updates applied so far
        self.rollouts_generated = 0
        self.replay_on = config.replay_fraction > 0
        self.lambda_clock_start = 0
        self.reincarnated_at: int | None = None
        self.history: list[dict] = []
        self.wall_time = 0.0
        self.eval_prompts, _ = task.eval_set(config.eval_size)

    # ------------------------------------------------------------------ one iteration
    def step(self) -> dict:
        cfg, tok = self.config, self.tokenizer
        t0 = time.perf_counter()
        policy_version = self.version
        replay_on = self.replay_on  # reincarnation at the end of this step must not relabel it

        # 1. generate: fewer fresh prompts while replay fills a fraction p of the batch.
        n_prompts = cfg.prompts_per_step
        if self.replay_on:
            n_prompts = max(1, round((1 - cfg.replay_fraction) * cfg.prompts_per_step))
        prompts, _ = self.task.sample(self.rng, n_prompts)
        prompts = [p for p in prompts for _ in range(cfg.group_size)]
        group = np.repeat(np.arange(n_prompts), cfg.group_size)
        prompt_tokens = [tok.encode_prompt(p) for p in prompts]
        gen = self.generator.generate(self.policy, prompt_tokens, cfg.max_new_tokens, cfg.temperature,
                                      seed=int(self.rng.integers(2**62)))
        n_fresh = len(prompts)
        self.rollouts_generated += n_fresh

        # 2. reward and GRPO advantages (group = the responses to one prompt).
        rewards = self.task.reward(prompts, gen.responses)
        advantages = group_advantages(torch.from_numpy(rewards), torch.from_numpy(group),
                                      scale=cfg.scale_advantages).numpy()
        tag = f"{cfg.run_name}-s{cfg.seed}-v{policy_version}"
        fresh = rollouts_table(
            rollout_ids=[f"{tag}-{i}" for i in range(n_fresh)],
            prompt_ids=[f"{tag}-p{g}" for g in group], prompts=prompts, responses=gen.responses,
            prompt_tokens=gen.prompt_tokens, response_tokens=gen.response_tokens,
            behavior_logprobs=gen.logprobs, rewards=rewards, policy_version=policy_version,
            advantages=advantages, run_id=cfg.run_name)
        if self.on_rollouts is not None:
            self.on_rollouts(fresh.drop_columns(["advantage"]))

        # 3. replay from earlier versions, corrected by truncated density ratios.
        draw = None
        if self.replay_on:
            n_replay = round(cfg.replay_fraction / (1 - cfg.replay_fraction) * n_fresh)
            draw = self.sampler.draw(self.replay.candidates(policy_version), n_replay,
                                     self._score_current, policy_version, self.rng)
            self.replay.add(fresh)  # after drawing: a batch never replays itself

        # Assemble the batch: fresh rows first, then replayed rows.
        all_prompts = list(gen.prompt_tokens)
        all_responses = list(gen.response_tokens)
        width = max(max((len(r) for r in all_responses), default=1), 1)
        behavior = padded_list_column(fresh.column("behavior_logprobs"), 0.0, width)[0]
        adv = advantages
        weights = np.ones(n_fresh, dtype=np.float32)
        if draw is not None:
            all_prompts += draw.table.column("prompt_tokens").to_pylist()
            all_responses += draw.table.column("response_tokens").to_pylist()
            width = max(width, draw.logp_current.shape[1])
            behavior = padded_list_column(fresh.column("behavior_logprobs"), 0.0, width)[0]
            behavior = np.concatenate(
                [behavior, padded_list_column(draw.table.column("behavior_logprobs"), 0.0, width)[0]])
            adv = np.concatenate([advantages, draw.advantages])
            weights = np.concatenate([weights, draw.weights])
        logp_behavior = torch.from_numpy(behavior)
        # Clip centre numerator log π_k: equal to the behaviour log-probs for fresh rows (c = 1
        # exactly, so no replay + one update is exactly PPO/GRPO), scored for replayed rows.
        logp_k = logp_behavior.clone()
        if draw is not None:
            logp_k[n_fresh:, : draw.logp_current.shape[1]] = draw.logp_current
        adv_t, weights_t = torch.from_numpy(adv.astype(np.float32)), torch.from_numpy(weights)

        # References for KL-Convex, scored once per batch.
        lam = kl_convex_lambda(policy_version - self.lambda_clock_start, cfg.lambda_hold, cfg.lambda_every,
                               cfg.lambda_decrement, cfg.lambda_floor)
        if cfg.kl_coef > 0:
            with torch.no_grad():
                logp_base = self._score(self.base, all_prompts, all_responses, width)[0]
                logp_prev = self._score(self.prev, all_prompts, all_responses, width)[0]
            snapshot = {k: v.detach().clone() for k, v in self.policy.state_dict().items()}

        # 4. m gradient steps on the same batch.
        m = cfg.updates_per_batch if self.reincarnated_at is None else cfg.updates_after_reincarnation
        self.policy.train()
        stats = {"loss": 0.0, "pg_loss": 0.0, "kl": 0.0, "entropy": 0.0, "ratio_mean": 0.0,
                 "ratio_max": 0.0, "clip_frac": 0.0}
        for _ in range(m):
            scores = response_logprobs(self.policy, all_prompts, all_responses, tok.pad_token_id,
                                       cfg.temperature, with_entropy=True)
            logp, mask = _pad_to(scores.logprobs, width), _pad_to(scores.mask, width)
            entropy = _pad_to(scores.entropy, width)
            pg = mix_ppg_loss(logp, logp_behavior, logp_k, adv_t, mask, cfg.clip_eps)
            per_token = pg - cfg.entropy_coef * entropy
            kl = torch.zeros_like(pg)
            if cfg.kl_coef > 0:
                kl = kl_convex(logp, logp_base, logp_prev, mask, lam)
                per_token = per_token + cfg.kl_coef * kl
            loss = aggregate(per_token, mask, cfg.loss_aggregation, weights_t)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(self.policy.parameters(), cfg.max_grad_norm)
            self.optimizer.step()
            with torch.no_grad():
                ratio = torch.exp(logp - logp_behavior)[mask.bool()]
                centre = torch.exp(logp_k - logp_behavior)[mask.bool()]
                stats["loss"] += loss.item() / m
                stats["pg_loss"] += aggregate(pg, mask, cfg.loss_aggregation, weights_t).item() / m
                stats["kl"] += aggregate(kl, mask).item() / m
                stats["entropy"] += aggregate(entropy, mask).item() / m
                stats["ratio_mean"] += ratio.mean().item() / m
                stats["ratio_max"] = max(stats["ratio_max"], ratio.max().item())
                stats["clip_frac"] += ((ratio - centre).abs() > cfg.clip_eps).float().mean().item() / m
        self.policy.eval()

        # 5. new policy version; π_{k−1} ← π_k; reincarnation at T.
        if cfg.kl_coef > 0:
            self.prev.load_state_dict(snapshot)
        self.version += 1
        if self.on_policy_version is not None:
            self.on_policy_version(self.version)
        if cfg.reincarnate_at is not None and self.version == cfg.reincarnate_at and self.reincarnated_at is None:
            self.reincarnate()

        self.wall_time += time.perf_counter() - t0
        record = {
            "iteration": self.version, "policy_version": self.version, "rollouts": self.rollouts_generated,
            "n_fresh": n_fresh, "n_replay": 0 if draw is None else draw.table.num_rows,
            "reward_mean": float(rewards.mean()),
            "success_train": float(self.task.success(prompts, gen.responses).mean()),
            "response_len": float(np.mean([len(r) for r in gen.response_tokens])),
            "lambda": lam, "updates": m, "replay_on": replay_on, "wall_time": self.wall_time,
            **stats,
        }
        if draw is not None:
            s = draw.stats
            record.update({"replay_ess_raw": s["ess_raw"], "replay_ess_truncated": s["ess_truncated"],
                           "replay_clip_fraction": s["clip_fraction"], "replay_clipped_mass": s["clipped_mass"],
                           "replay_mean_raw_weight": s["mean_raw_weight"], "replay_cap": s["cap"],
                           "replay_candidates": s["candidates"], "replay_mean_staleness": s["mean_staleness"],
                           "replay_staleness_hist": s["staleness_hist"]})
        return record

    # ------------------------------------------------------------------ the loop
    def train(self) -> list[dict]:
        """Iterate until the rollout budget (or max_iterations) is spent; returns the history."""
        from tqdm.auto import tqdm

        cfg = self.config
        if not self.history:
            self._record(self._evaluated({"iteration": 0, "policy_version": 0, "rollouts": 0,
                                          "wall_time": 0.0}))
        bar = tqdm(total=cfg.rollout_budget, initial=min(self.rollouts_generated, cfg.rollout_budget),
                   desc=cfg.run_name, unit="rollout", disable=not cfg.progress, leave=False)
        while self.rollouts_generated < cfg.rollout_budget and (
                cfg.max_iterations is None or self.version < cfg.max_iterations):
            before = self.rollouts_generated
            record = self.step()
            done = self.rollouts_generated >= cfg.rollout_budget or (
                cfg.max_iterations is not None and self.version >= cfg.max_iterations)
            if self.version % cfg.eval_every == 0 or done:
                record = self._evaluated(record)
            self._record(record)
            bar.update(min(self.rollouts_generated, cfg.rollout_budget) - min(before, cfg.rollout_budget))
            bar.set_postfix(reward=f"{record['reward_mean']:.2f}", len=f"{record['response_len']:.1f}",
                            ratio=f"{record['ratio_mean']:.2f}/{record['ratio_max']:.1f}",
                            eval=f"{self._last_eval():.2f}", v=self.version)
            if cfg.checkpoint_every and self.output_dir and self.version % cfg.checkpoint_every == 0:
                self.save_checkpoint(self.output_dir / "checkpoint")
        bar.close()
        if self.output_dir is not None:
            self.log.write_csv(self.history)
            plot_runs({cfg.run_name: self.history}, self.output_dir / "curves.png",
                      title=f"{cfg.run_name} on {self.task.name}")
            self.save_checkpoint(self.output_dir / "checkpoint")
        return self.history

    def reincarnate(self) -> None:
        """Policy reincarnation: π_base ← current policy, replay off (on-policy from here)."""
        if self.base is not None:
            self.base.load_state_dict(self.policy.state_dict())
        self.replay_on = False
        self.replay.clear()
        if self.config.restart_lambda_clock:
            self.lambda_clock_start = self.version
        self.reincarnated_at = self.version

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Held-out success rate and response length (fixed prompts and sampling seed)."""
        cfg = self.config
        tokens = [self.tokenizer.encode_prompt(p) for p in self.eval_prompts]
        gen = self.generator.generate(self.policy, tokens, cfg.max_new_tokens, cfg.eval_temperature,
                                      seed=cfg.seed + 1_000_003)
        return {"eval_success": float(self.task.success(self.eval_prompts, gen.responses).mean()),
                "eval_reward": float(self.task.reward(self.eval_prompts, gen.responses).mean()),
                "eval_response_len": float(np.mean([len(r) for r in gen.response_tokens]))}

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, directory: str | Path) -> Path:
        """Everything needed to resume bit-for-bit: weights, optimiser, references, counters, RNG,
        replay pool (Arrow IPC) and history."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {
            "policy": self.policy.state_dict(), "optimizer": self.optimizer.state_dict(),
            "base": None if self.base is None else self.base.state_dict(),
            "prev": None if self.prev is None else self.prev.state_dict(),
            "version": self.version, "rollouts_generated": self.rollouts_generated,
            "replay_on": self.replay_on, "lambda_clock_start": self.lambda_clock_start,
            "reincarnated_at": self.reincarnated_at, "rng": self.rng.bit_generator.state,
            "history": self.history, "wall_time": self.wall_time, "config": self.config.to_dict(),
        }
        tmp = directory / "state.pt.tmp"
        torch.save(state, tmp)
        tmp.replace(directory / "state.pt")
        table = getattr(self.replay, "table", None)
        pool_path = directory / "replay.arrow"
        if table is not None:
            with pa.OSFile(str(pool_path) + ".tmp", "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
                w.write_table(table)
            Path(str(pool_path) + ".tmp").replace(pool_path)
        elif pool_path.exists():
            pool_path.unlink()
        (directory / "config.json").write_text(json.dumps(self.config.to_dict(), indent=2))
        return directory

    def load_checkpoint(self, directory: str | Path) -> None:
        """Restore a checkpoint written by `save_checkpoint` into this trainer."""
        directory = Path(directory)
        path = directory / "state.pt"
        if not path.exists():
            raise FileNotFoundError(f"no checkpoint at {str(path)!r}")
        state = torch.load(path, weights_only=False)
        self.policy.load_state_dict(state["policy"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.base is not None and state["base"] is not None:
            self.base.load_state_dict(state["base"])
            self.prev.load_state_dict(state["prev"])
        self.version, self.rollouts_generated = state["version"], state["rollouts_generated"]
        self.replay_on, self.lambda_clock_start = state["replay_on"], state["lambda_clock_start"]
        self.reincarnated_at, self.history = state["reincarnated_at"], state["history"]
        self.wall_time = state["wall_time"]
        self.rng.bit_generator.state = state["rng"]
        pool_path = directory / "replay.arrow"
        if hasattr(self.replay, "restore"):
            self.replay.restore(pa.ipc.open_file(str(pool_path)).read_all() if pool_path.exists() else None)

    # ------------------------------------------------------------------ helpers
    def _score(self, model, prompts, responses, width):
        s = response_logprobs(model, prompts, responses, self.tokenizer.pad_token_id, self.config.temperature)
        return _pad_to(s.logprobs, width), _pad_to(s.mask, width)

    @torch.no_grad()
    def _score_current(self, prompts, responses):
        s = response_logprobs(self.policy, prompts, responses, self.tokenizer.pad_token_id,
                              self.config.temperature)
        return s.logprobs, s.mask

    def _evaluated(self, record: dict) -> dict:
        return {**record, **self.evaluate()}

    def _record(self, record: dict) -> None:
        self.history.append(record)
        self.log.append(record)

    def _last_eval(self) -> float:
        for r in reversed(self.history):
            if "eval_success" in r:
                return r["eval_success"]
        return float("nan")


def _make_pool(config: ReMixConfig) -> ReplaySource:
    if config.replay_pool == "diverse":
        return DiverseReplayPool(config.replay_window, config.pool_capacity)
    if config.replay_pool == "selector":
        return SelectorReplayPool(config.replay_window, config.pool_capacity, seed=config.seed)
    return FIFOReplayPool(config.replay_window)


def _frozen_copy(model):
    ref = copy.deepcopy(model)
    ref.eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def _pad_to(x: torch.Tensor, width: int) -> torch.Tensor:
    if x.shape[1] >= width:
        return x[:, :width]
    return torch.nn.functional.pad(x, (0, width - x.shape[1]))
