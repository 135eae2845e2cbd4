"""The ReMix trainer (Liang, Tang et al. 2025), GRPO flavour, readable top to bottom.

One iteration at policy version k (`ReMixTrainer.step`):

    1. generate   fresh prompts × group_size responses from π_k (fewer prompts while replay is on)
    2. reward     the task's verifiable reward; GRPO advantages within each group (sponge.groups)
    3. replay     draw p/(1−p) × (fresh responses) rollouts of π_{k−1..k−N} from the replay source,
                  as whole groups; with dynamic sampling, also as many as the fresh groups without
                  signal (all rewards equal) that leave the batch; then send the fresh batch to it
    4. update     up to m gradient steps on  policy loss − c·H + β·KL-Convex  over fresh + replayed
                  tokens, each token weighted by its off-policy correction of π_k/π_behaviour;
                  the later steps are skipped once KL(π_k ‖ π_θ) passes target_kl
    5. version    k ← k + 1; report it to the source; reincarnate when due: π_base ← π_k, replay off
    6. guard      collapse check (entropy, reward, ratios): warn, stop or roll back

With replay_fraction = 0, updates_per_batch = 1 and no dynamic sampling this is exactly GRPO
(`ReMixConfig.grpo()`). The trainer talks to its replay source only through the
`sponge.contract.ReplaySource` protocol.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from sponge.contract import ReplaySource, tokenizer_fingerprint
from sponge.files import atomic_write
from sponge.groups import group_advantages, has_signal

from .config import ReMixConfig
from .density_ratio import correction_diagnostics, correction_weights, token_log_ratios
from .generators import Generator, TransformersGenerator
from .guard import CollapseGuard
from .losses import (
    aggregate,
    decoupled_ppo_loss,
    kl_convex,
    kl_convex_lambda,
    kl_k3,
    mix_ppg_loss,
)
from .metrics import MetricsLog, plot_runs
from .models import resolve_device, response_logprobs
from .replay import ReplaySampler, make_pool, padded_list_column, rollouts_table

__all__ = ["ReMixTrainer"]

OptimizerArg = torch.optim.Optimizer | Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer] | None


class ReMixTrainer:
    """Trains `model` on `task` with ReMix (or GRPO, see `ReMixConfig.grpo`).

    Choices a custom setup makes (all optional; examples/custom_task.py shows them together):
      replay_source  any `sponge.contract.ReplaySource` (default: the in-process pool the config
                     names; none for on-policy GRPO without dynamic sampling)
      optimizer      a torch optimiser over model.parameters(), or a function params → optimiser
                     (default: config.optimizer at config.learning_rate)
      eval_prompts   the held-out prompts (default: task.eval_set(config.eval_size), which never
                     draws from the training stream; [] = no evaluation)
      eval_fn        trainer → dict of metrics, replacing the default evaluation (greedy at
                     config.eval_temperature, task.success on eval_prompts)
      fingerprint    names the token ids of the rollouts for the source (default: computed from
                     the tokenizer's vocabulary)
      on_rollouts, on_policy_version   observers of each fresh batch (Arrow, record schema) and each
                     new version, beside the replay source (which gets send/report_version itself)
    """

    def __init__(self, model, tokenizer, task, config: ReMixConfig, *, generator: Generator | None = None,
                 replay_source: ReplaySource | None = None, output_dir: str | Path | None = None,
                 optimizer: OptimizerArg = None, eval_prompts: list[str] | None = None,
                 eval_fn: Callable[[ReMixTrainer], dict] | None = None, fingerprint: str | None = None,
                 on_policy_version: Callable[[int], None] | None = None,
                 on_rollouts: Callable[[pa.Table], None] | None = None):
        self.config, self.task, self.tokenizer = config, task, tokenizer
        # One device for the policy, its frozen references (copied from it below) and every
        # tensor of an update; forwards under bf16 autocast when asked (losses stay float32).
        self.device = resolve_device(config.device)
        self.policy = model.to(self.device)
        self.generator = generator or TransformersGenerator(tokenizer, bf16=config.bf16)
        wants_pool = config.replay_fraction > 0 or config.dynamic_sampling
        self.replay = replay_source if replay_source is not None else (make_pool(config) if wants_pool else None)
        self.sampler = ReplaySampler(config.replay_sampling, config.ratio_mode, config.ratio_cap,
                                     config.ratio_cap_gamma, config.ratio_cap_min, config.ratio_cap_max,
                                     config.recency_decay)
        self.on_policy_version, self.on_rollouts = on_policy_version, on_rollouts
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.log = MetricsLog(self.output_dir)
        self.recompute = (config.recompute_logprobs if config.recompute_logprobs is not None
                          else config.bf16 or not isinstance(self.generator, TransformersGenerator))

        torch.manual_seed(config.seed)
        self.optimizer = _make_optimizer(optimizer, self.policy, config)
        # Frozen references for KL-Convex: π_base (reset at reincarnation) and π_{k−1}.
        self.base = _frozen_copy(model) if config.kl_coef > 0 else None
        self.prev = _frozen_copy(model) if config.kl_coef > 0 else None

        self.rng = np.random.default_rng(config.seed)
        self.run_id = f"{config.run_name}-s{config.seed}"
        self.fingerprint = fingerprint or _fingerprint(tokenizer)
        # The source says where this run continues from (0 for a new run).
        self.version = self.replay.register(self.run_id, self.fingerprint) if self.replay is not None else 0
        self.rollouts_generated = 0
        self.rollouts_saved = 0.0       # dynamic sampling: generations a regenerate-until-full loop would need
        self.signal_rate = 0.5          # running share of fresh rollouts whose group has signal
        self.replay_on = config.replay_fraction > 0
        self.lambda_clock_start = 0
        self.reincarnated_at: int | None = None
        self.history: list[dict] = []
        self.wall_time = 0.0
        self.guard = CollapseGuard(config.collapse_entropy_floor, config.collapse_reward_floor,
                                   config.collapse_ratio_max)
        self.collapses: list[dict] = []
        self._healthy: deque = deque(maxlen=2)   # rollback points: the older one predates the decline
        self.eval_fn = eval_fn
        if eval_prompts is not None:
            self.eval_prompts = list(eval_prompts)
        elif hasattr(task, "eval_set"):
            self.eval_prompts = list(task.eval_set(config.eval_size)[0])
        else:
            self.eval_prompts = []

    # ------------------------------------------------------------------ one iteration
    def step(self) -> dict:
        cfg, tok = self.config, self.tokenizer
        t0 = time.perf_counter()
        version = self.version
        replay_on = self.replay_on  # reincarnation at the end of this step must not relabel it

        # 1. generate: fewer fresh prompts while replay fills a fraction p of the batch.
        n_prompts = cfg.prompts_per_step
        if replay_on:
            n_prompts = max(1, round((1 - cfg.replay_fraction) * cfg.prompts_per_step))
        prompts, _ = self.task.sample(self.rng, n_prompts)
        prompts = [p for p in prompts for _ in range(cfg.group_size)]
        group = np.repeat(np.arange(n_prompts), cfg.group_size)
        prompt_tokens = [tok.encode_prompt(p) for p in prompts]
        gen = self.generator.generate(self.policy, prompt_tokens, cfg.max_new_tokens, cfg.temperature,
                                      seed=int(self.rng.integers(2**62)))
        n_fresh = len(prompts)
        self.rollouts_generated += n_fresh
        t_gen = time.perf_counter() - t0

        # 2. reward and GRPO advantages (group = the responses to one prompt).
        rewards = np.asarray(self.task.score(prompts, gen), dtype=np.float32)
        advantages = group_advantages(rewards, group, scale=cfg.scale_advantages)
        signal = has_signal(rewards, group)
        tag = f"{self.run_id}-v{version}"
        fresh = rollouts_table(
            rollout_ids=[f"{tag}-{i}" for i in range(n_fresh)],
            prompt_ids=[f"{tag}-p{g}" for g in group], prompts=prompts, responses=gen.responses,
            prompt_tokens=gen.prompt_tokens, response_tokens=gen.response_tokens,
            behavior_logprobs=gen.logprobs, rewards=rewards, policy_version=version, run_id=self.run_id)

        # 3. replay (whole groups), then offer the fresh batch: a batch never replays itself.
        n_replay = round(cfg.replay_fraction / (1 - cfg.replay_fraction) * n_fresh) if replay_on else 0
        n_fill = int((~signal).sum()) if cfg.dynamic_sampling else 0
        draw = None
        if self.replay is not None and n_replay + n_fill > 0:
            candidates = self.replay.candidates(version, unit=cfg.replay_unit)
            # Uniform draws need no ratios to choose rows: π_k of the drawn rows then comes from the
            # first update's forward instead of a scoring pass.
            score = None if self.sampler.mode == "uniform" else self._score_current
            draw = self.sampler.draw(candidates, n_replay + n_fill, score, version, self.rng,
                                     unit=cfg.replay_unit)
        if self.replay is not None:
            self.replay.send(fresh)
        if self.on_rollouts is not None:
            self.on_rollouts(fresh)
        n_drawn = 0 if draw is None else draw.table.num_rows
        self.signal_rate = 0.9 * self.signal_rate + 0.1 * float(signal.mean())
        filled = min(max(0, n_drawn - n_replay), n_fill)
        saved = filled / max(self.signal_rate, 1.0 / n_fresh)
        self.rollouts_saved += saved

        # Assemble the batch: fresh rows (with signal, under dynamic sampling) first, then replayed rows.
        keep = np.flatnonzero(signal) if cfg.dynamic_sampling else np.arange(n_fresh)
        batch_prompts = [gen.prompt_tokens[i] for i in keep]
        batch_responses = [gen.response_tokens[i] for i in keep]
        behavior_col = fresh.column("behavior_logprobs").combine_chunks().take(pa.array(keep))
        adv = advantages[keep]
        row_weights = np.ones(len(keep), dtype=np.float32)
        if draw is not None:
            batch_prompts += draw.table.column("prompt_tokens").to_pylist()
            batch_responses += draw.table.column("response_tokens").to_pylist()
            behavior_col = pa.concat_arrays([behavior_col, draw.table.column("behavior_logprobs").combine_chunks()
                                             .cast(behavior_col.type)])
            adv = np.concatenate([adv, draw.advantages])
            row_weights = np.concatenate([row_weights, draw.weights])
        n_rows, n_kept = len(batch_prompts), len(keep)
        stats = {"loss": 0.0, "pg_loss": 0.0, "kl": 0.0, "entropy": float("nan"), "ratio_mean": 1.0,
                 "ratio_max": 1.0, "clip_frac": 0.0, "approx_kl": 0.0}
        lam = kl_convex_lambda(version - self.lambda_clock_start, cfg.lambda_hold, cfg.lambda_every,
                               cfg.lambda_decrement, cfg.lambda_floor)
        # After reincarnation the update is plain on-policy GRPO: m' full-batch steps.
        m, minibatches = ((cfg.updates_per_batch, cfg.minibatches) if self.reincarnated_at is None
                          else (cfg.updates_after_reincarnation, 1))
        updates_done = 0
        t_update = time.perf_counter()
        if n_rows:
            width = max(max((len(r) for r in batch_responses), default=1), 1)
            behavior_np, lengths = padded_list_column(behavior_col, 0.0, width)
            dev = self.device
            logp_behavior = torch.from_numpy(behavior_np).to(dev)
            mask = torch.from_numpy((np.arange(width)[None, :] < lengths[:, None]).astype(np.float32)).to(dev)
            # Proximal log π_k: the trainer's own for replayed rows and, when recomputing, for fresh
            # rows; else the generator's (then the fresh weight is exactly 1). Rows not scored at the
            # draw take it from the first update's forward, which runs at π_k (no extra forward).
            logp_prox = logp_behavior.clone()
            from_forward = np.zeros(n_rows, dtype=bool)
            from_forward[:n_kept] = self.recompute
            if draw is not None:
                if draw.logp_current is not None:
                    logp_prox[n_kept:] = _pad_to(draw.logp_current, width)
                else:
                    from_forward[n_kept:] = True
            from_forward_t = torch.from_numpy(from_forward).to(dev)
            adv_t = torch.from_numpy(adv.astype(np.float32)).to(dev)
            weights_t = torch.from_numpy(row_weights).to(dev)

            def corrections() -> torch.Tensor:
                log_ratio = token_log_ratios(logp_prox, logp_behavior, mask)
                w = correction_weights(cfg.correction, log_ratio, mask, cfg.correction_low, cfg.correction_high)
                if cfg.policy_loss == "mix_ppg":   # the ratio carries π_k/π_b itself: only masks apply
                    w = (w > 0).to(mask.dtype) * mask
                if self.recompute and n_kept:
                    stats.update(_prefixed("fresh_is_", correction_diagnostics(
                        log_ratio[:n_kept], w[:n_kept], mask[:n_kept])))
                if draw is not None:
                    stats.update(_prefixed("replay_is_", correction_diagnostics(
                        log_ratio[n_kept:], w[n_kept:], mask[n_kept:])))
                return w

            is_weights = None if from_forward.any() else corrections()

            if cfg.kl_coef > 0:  # references for KL-Convex, scored once per batch
                with torch.no_grad():
                    logp_base = self._score(self.base, batch_prompts, batch_responses, width)
                    logp_prev = self._score(self.prev, batch_prompts, batch_responses, width)
                snapshot = {k: v.detach().clone() for k, v in self.policy.state_dict().items()}

            # 4. up to m passes over the same batch, each one gradient step on the whole batch or one per
            # minibatch. A minibatch step after the first no longer runs at π_k, so with minibatches the
            # rows that take π_k from a forward are scored first (no gradient).
            if minibatches > 1 and is_weights is None:
                with torch.no_grad(), self._autocast():
                    scored = response_logprobs(self.policy, batch_prompts, batch_responses, tok.pad_token_id,
                                               cfg.temperature)
                logp_prox = torch.where(from_forward_t[:, None], _pad_to(scored.logprobs, width), logp_prox)
                is_weights = corrections()
            update_rows = [part for _ in range(m) for part in (
                [np.arange(n_rows)] if minibatches == 1 else
                np.array_split(self.rng.permutation(n_rows), minibatches)) if len(part)]
            self.policy.train()
            totals = {"loss": 0.0, "pg_loss": 0.0, "kl": 0.0, "entropy": 0.0, "ratio_mean": 0.0, "clip_frac": 0.0}
            ratio_max, approx_kl, step_kl = 1.0, 0.0, None
            for j, rows in enumerate(update_rows):
                whole = len(rows) == n_rows   # the batch in its own order
                with self._autocast():
                    scores = response_logprobs(
                        self.policy, batch_prompts if whole else [batch_prompts[i] for i in rows],
                        batch_responses if whole else [batch_responses[i] for i in rows], tok.pad_token_id,
                        cfg.temperature, with_entropy=True)
                logp, entropy = _pad_to(scores.logprobs, width), _pad_to(scores.entropy, width)
                if is_weights is None:   # first update over the whole batch: this forward is π_k
                    logp_prox = torch.where(from_forward_t[:, None], logp.detach(), logp_prox)
                    is_weights = corrections()
                index = None if whole else torch.from_numpy(rows).to(dev)
                rows_of = (lambda t: t) if whole else (lambda t, i=index: t[i])
                prox, w, adv_j, mask_j, weights_j = map(rows_of, (logp_prox, is_weights, adv_t, mask, weights_t))
                with torch.no_grad():
                    approx_kl = float(aggregate(kl_k3(logp.detach(), prox, mask_j), mask_j))
                if j == 1:
                    step_kl = approx_kl   # how far one gradient step moved the policy
                if j > 0 and cfg.target_kl is not None and approx_kl > cfg.target_kl:
                    break   # the policy already left the trust region on this batch
                if cfg.policy_loss == "decoupled":
                    pg = decoupled_ppo_loss(logp, prox, w, adv_j, mask_j, cfg.clip_eps, cfg.eps_high)
                else:
                    pg = w * mix_ppg_loss(logp, rows_of(logp_behavior), prox, adv_j, mask_j, cfg.clip_eps,
                                          cfg.eps_high)
                per_token = pg
                if cfg.entropy_coef:
                    per_token = per_token - cfg.entropy_coef * entropy
                kl = torch.zeros_like(pg)
                if cfg.kl_coef > 0:
                    kl = kl_convex(logp, rows_of(logp_base), rows_of(logp_prev), mask_j, lam)
                    per_token = per_token + cfg.kl_coef * kl
                loss = aggregate(per_token, mask_j, cfg.loss_aggregation, weights_j)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(self.policy.parameters(), cfg.max_grad_norm)
                self.optimizer.step()
                updates_done += 1
                with torch.no_grad():
                    on = mask_j.bool()
                    ratio = torch.exp(logp - prox)[on]
                    clip = ((ratio < 1 - cfg.clip_eps) | (ratio > 1 + cfg.eps_high)).float().mean()
                    # One copy to the host for all of the update's statistics, not one per figure.
                    (loss_v, pg_v, kl_v, ent_v, rmean_v, clip_v, rmax_v) = torch.stack([
                        loss.detach(), aggregate(pg, mask_j, cfg.loss_aggregation, weights_j),
                        aggregate(kl, mask_j), aggregate(entropy, mask_j), ratio.mean(), clip, ratio.max()]).tolist()
                    totals["loss"] += loss_v
                    totals["pg_loss"] += pg_v
                    totals["kl"] += kl_v
                    totals["entropy"] += ent_v
                    totals["ratio_mean"] += rmean_v
                    totals["clip_frac"] += clip_v
                    ratio_max = max(ratio_max, rmax_v)
            self.policy.eval()
            stats.update({k: v / max(updates_done, 1) for k, v in totals.items()})
            stats.update({"ratio_max": ratio_max, "approx_kl": approx_kl, "step_kl": step_kl})
            if cfg.step_kl_target is not None and step_kl is not None:
                for group in self.optimizer.param_groups:   # each group's own rate is its ceiling
                    ceiling = group.setdefault("lr_ceiling", group["lr"])
                    group["lr"] = adapt_learning_rate(group["lr"], step_kl, cfg.step_kl_target, ceiling)
            if cfg.kl_coef > 0:
                self.prev.load_state_dict(snapshot)
        t_update = time.perf_counter() - t_update

        # 5. new policy version; reincarnation when due.
        self.version += 1
        if self.replay is not None:
            self.replay.report_version(self.version)
        if self.on_policy_version is not None:
            self.on_policy_version(self.version)
        if self.reincarnated_at is None and self._reincarnation_due():
            self.reincarnate()

        self.wall_time += time.perf_counter() - t0
        record = {
            "iteration": self.version, "policy_version": self.version, "rollouts": self.rollouts_generated,
            "n_fresh": n_fresh, "n_replay": n_drawn, "n_batch": n_rows,
            "reward_mean": float(rewards.mean()),
            "success_train": float(self.task.success(prompts, gen.responses).mean()),
            "response_len": float(np.mean([len(r) for r in gen.response_tokens])),
            "lambda": lam, "updates": updates_done, "learning_rate": self.optimizer.param_groups[0]["lr"],
            "replay_on": replay_on, "wall_time": self.wall_time,
            "step_s": time.perf_counter() - t0, "generate_s": t_gen, "update_s": t_update,
            "ds_zero_var_groups": int((~signal).sum() // cfg.group_size), "ds_filled_rows": int(filled),
            "ds_rollouts_saved": float(saved), "rollouts_saved_total": float(self.rollouts_saved),
            **stats,
        }
        if draw is not None:
            s = draw.stats
            record.update({"replay_ess_raw": s["ess_raw"], "replay_ess_truncated": s["ess_truncated"],
                           "replay_clip_fraction": s["clip_fraction"], "replay_clipped_mass": s["clipped_mass"],
                           "replay_mean_raw_weight": s["mean_raw_weight"], "replay_cap": s["cap"],
                           "replay_candidates": s["candidates"], "replay_candidate_groups": s["candidate_groups"],
                           "replay_mean_staleness": s["mean_staleness"],
                           "replay_staleness_hist": s["staleness_hist"],
                           "replay_reward_mean": float(np.mean(draw.table.column("reward").to_numpy())),
                           "replay_abs_adv": float(np.abs(draw.advantages).mean())})
        # 6. collapse guard.
        reason = self.guard.check(record) if updates_done else None
        if reason is not None:
            record["collapse"] = reason
            self._on_collapse(reason, record)
        return record

    # ------------------------------------------------------------------ the loop
    def train(self) -> list[dict]:
        """Iterate until the rollout budget, max_iterations or max_wall_seconds is spent (or a
        collapse stops the run, with collapse_action "stop"); returns the history."""
        from tqdm.auto import tqdm

        cfg = self.config
        started = time.perf_counter()
        if cfg.max_iterations is not None and self.version >= cfg.max_iterations:
            # A run resumed from the replay service (same run_name and seed) that already got there.
            print(f"sponge.trainer: run {self.run_id} is at policy version {self.version}, which max_iterations "
                  f"({cfg.max_iterations}) already reaches: nothing to train (another run_name starts a new run)",
                  file=sys.stderr)
        if not self.history:
            self._record(self._evaluated({"iteration": 0, "policy_version": self.version, "rollouts": 0,
                                          "wall_time": 0.0}))
        # Counted in steps when a step limit is set (the run ends there, whatever the rollout budget).
        by_step = bool(cfg.max_iterations)
        bar = (tqdm(total=cfg.max_iterations, initial=min(self.version, cfg.max_iterations), unit="step",
                    desc=cfg.run_name, disable=not cfg.progress, leave=False) if by_step else
               tqdm(total=cfg.rollout_budget, initial=min(self.rollouts_generated, cfg.rollout_budget),
                    desc=cfg.run_name, unit="rollout", disable=not cfg.progress, leave=False))
        self._stop = False
        while not self._done(started):
            before = self.rollouts_generated
            if self.version % cfg.eval_every == 0 and "collapse" not in (self.history[-1] if self.history else {}):
                self._healthy.append(self._snapshot())
            record = self.step()
            if self.version % cfg.eval_every == 0 or self._done(started):
                record = self._evaluated(record)
            self._record(record)
            bar.update(1 if by_step else
                       min(self.rollouts_generated, cfg.rollout_budget) - min(before, cfg.rollout_budget))
            bar.set_postfix(reward=f"{record['reward_mean']:.2f}", len=f"{record['response_len']:.1f}",
                            ratio=f"{record['ratio_mean']:.2f}/{record['ratio_max']:.1f}",
                            eval=f"{self._last_eval():.2f}", v=self.version)
            if cfg.checkpoint_every and self.output_dir and self.version % cfg.checkpoint_every == 0:
                self.save_checkpoint(self.output_dir / "checkpoint")
        bar.close()
        if self.output_dir is not None:
            self.log.write_csv(self.history)
            plot_runs({cfg.run_name: self.history}, self.output_dir / "curves.png",
                      title=f"{cfg.run_name} on {getattr(self.task, 'name', type(self.task).__name__)}")
            self.save_checkpoint(self.output_dir / "checkpoint")
        return self.history

    def _done(self, started: float) -> bool:
        cfg = self.config
        return (self._stop or self.rollouts_generated >= cfg.rollout_budget
                or (cfg.max_iterations is not None and self.version >= cfg.max_iterations)
                or (cfg.max_wall_seconds is not None and time.perf_counter() - started >= cfg.max_wall_seconds))

    def _reincarnation_due(self) -> bool:
        cfg = self.config
        if cfg.reincarnate_at is not None:
            return self.version >= cfg.reincarnate_at
        if cfg.reincarnate_after is not None:
            return self.rollouts_generated >= cfg.reincarnate_after * cfg.rollout_budget
        return False

    def reincarnate(self) -> None:
        """Policy reincarnation: π_base ← current policy, replay off (on-policy from here; dynamic
        sampling may still fill groups without signal from what the source holds afterwards)."""
        if self.base is not None:
            self.base.load_state_dict(self.policy.state_dict())
        self.replay_on = False
        if self.replay is not None:
            self.replay.clear()
        if self.config.restart_lambda_clock:
            self.lambda_clock_start = self.version
        self.reincarnated_at = self.version

    def _on_collapse(self, reason: str, record: dict) -> None:
        action = self.config.collapse_action
        event = {"policy_version": self.version, "rollouts": self.rollouts_generated, "reason": reason,
                 "action": action}
        if action == "rollback" and self._healthy:
            state = self._healthy[0]
            self.policy.load_state_dict(state["policy"])
            self.optimizer.load_state_dict(state["optimizer"])
            for group in self.optimizer.param_groups:
                group["lr"] *= 0.5
                if "lr_ceiling" in group:   # the adaptive rate must not climb back over the halving
                    group["lr_ceiling"] *= 0.5
            self._healthy.clear()
            self.guard.reset_reward()
            event["learning_rate"] = self.optimizer.param_groups[0]["lr"]
            record["collapse_lr"] = event["learning_rate"]
        elif action == "stop":
            self._stop = True
        self.collapses.append(event)
        print(f"sponge.trainer: collapse detected at version {self.version} "
              f"({self.rollouts_generated} rollouts): {reason}; action: {action}", file=sys.stderr)

    def _snapshot(self) -> dict:
        return {"policy": {k: v.detach().clone() for k, v in self.policy.state_dict().items()},
                "optimizer": copy.deepcopy(self.optimizer.state_dict())}

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Held-out metrics: `eval_fn(trainer)` when given, else success rate, reward and response
        length on eval_prompts (fixed sampling seed, config.eval_temperature; 0 = greedy)."""
        if self.eval_fn is not None:
            return dict(self.eval_fn(self))
        if not self.eval_prompts:
            return {}
        cfg = self.config
        tokens = [self.tokenizer.encode_prompt(p) for p in self.eval_prompts]
        gen = self.generator.generate(self.policy, tokens, cfg.max_new_tokens, cfg.eval_temperature,
                                      seed=cfg.seed + 1_000_003)
        return {"eval_success": float(np.mean(self.task.success(self.eval_prompts, gen.responses))),
                "eval_reward": float(np.mean(self.task.score(self.eval_prompts, gen))),
                "eval_response_len": float(np.mean([len(r) for r in gen.response_tokens]))}

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, directory: str | Path) -> Path:
        """Everything needed to resume bit-for-bit: weights, optimiser, references, counters, RNG,
        the replay source's state_dict and the history."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {
            "policy": self.policy.state_dict(), "optimizer": self.optimizer.state_dict(),
            "base": None if self.base is None else self.base.state_dict(),
            "prev": None if self.prev is None else self.prev.state_dict(),
            "version": self.version, "rollouts_generated": self.rollouts_generated,
            "rollouts_saved": self.rollouts_saved, "signal_rate": self.signal_rate,
            "replay_on": self.replay_on, "lambda_clock_start": self.lambda_clock_start,
            "reincarnated_at": self.reincarnated_at, "rng": self.rng.bit_generator.state,
            "history": self.history, "wall_time": self.wall_time, "config": self.config.to_dict(),
            "guard": copy.deepcopy(self.guard.state), "collapses": self.collapses,
            "source": None if self.replay is None else self.replay.state_dict(),
        }
        atomic_write(directory / "state.pt", lambda tmp: torch.save(state, tmp))
        atomic_write(directory / "config.json", json.dumps(self.config.to_dict(), indent=2).encode())
        return directory

    def load_checkpoint(self, directory: str | Path) -> None:
        """Restore a checkpoint written by `save_checkpoint` into this trainer."""
        path = Path(directory) / "state.pt"
        if not path.exists():
            raise FileNotFoundError(f"no checkpoint at {str(path)!r}")
        state = torch.load(path, weights_only=False, map_location="cpu")   # loads onto any device
        self.policy.load_state_dict(state["policy"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.base is not None and state["base"] is not None:
            self.base.load_state_dict(state["base"])
            self.prev.load_state_dict(state["prev"])
        self.version, self.rollouts_generated = state["version"], state["rollouts_generated"]
        self.rollouts_saved, self.signal_rate = state["rollouts_saved"], state["signal_rate"]
        self.replay_on, self.lambda_clock_start = state["replay_on"], state["lambda_clock_start"]
        self.reincarnated_at, self.history = state["reincarnated_at"], state["history"]
        self.wall_time, self.collapses = state["wall_time"], state["collapses"]
        self.guard.state = state["guard"]
        self.rng.bit_generator.state = state["rng"]
        if self.replay is not None and state["source"] is not None:
            self.replay.load_state_dict(state["source"])

    # ------------------------------------------------------------------ helpers
    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.bf16)

    def _score(self, model, prompts, responses, width) -> torch.Tensor:
        with self._autocast():
            s = response_logprobs(model, prompts, responses, self.tokenizer.pad_token_id, self.config.temperature)
        return _pad_to(s.logprobs, width)

    @torch.no_grad()
    def _score_current(self, prompts, responses):
        with self._autocast():
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


def adapt_learning_rate(lr: float, step_kl: float, target: float, lr_max: float, factor: float = 1.5,
                        span: float = 30.0) -> float:
    """The next learning rate from how far one gradient step moved the policy (the k3 KL after a
    batch's first update): divided by `factor` above 2× `target`, multiplied below ½×, kept within
    [lr_max / span, lr_max] (the adaptive PPO schedule of rl_games, with the configured rate as the
    ceiling: it only takes the step down where the same rate moves a policy further)."""
    if step_kl > 2.0 * target:
        lr /= factor
    elif step_kl < 0.5 * target:
        lr *= factor
    return float(min(max(lr, lr_max / span), lr_max))


def _make_optimizer(optimizer: OptimizerArg, model, config: ReMixConfig) -> torch.optim.Optimizer:
    if isinstance(optimizer, torch.optim.Optimizer):
        return optimizer
    params = list(model.parameters())
    if optimizer is not None:
        return optimizer(params)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    return torch.optim.Adam(params, lr=config.learning_rate, weight_decay=config.weight_decay)


def _fingerprint(tokenizer) -> str:
    try:
        return tokenizer_fingerprint(tokenizer)
    except TypeError:   # a tokenizer without a vocabulary to hash: name its class (pass fingerprint=)
        return f"{type(tokenizer).__module__}.{type(tokenizer).__qualname__}"


def _prefixed(prefix: str, stats: dict) -> dict:
    return {prefix + k: v for k, v in stats.items()}


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

