"""ReMixConfig: every knob of the ReMix trainer, documented where it is declared.

Defaults follow the ReMix paper where it publishes a value (p = 0.4, N = 2, m = 2, the λ schedule
50/10/0.1/0.5, ε = 0.2) and are otherwise sized for the toy tasks on a CPU. `ReMixConfig.grpo()`
gives the on-policy GRPO baseline (p = 0, m = 1, no reincarnation), which the Mix-PPG loss reduces
to exactly.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass
class ReMixConfig:
    # --- batch shape -------------------------------------------------------------------------
    #: Prompts per training batch (fresh + replayed-equivalent). With replay on, only
    #: round((1 − p)·prompts_per_step) prompts are generated fresh each iteration.
    prompts_per_step: int = 16
    #: Responses sampled per prompt (the GRPO group).
    group_size: int = 8
    #: Longest response in tokens (the end-of-sequence token counts).
    max_new_tokens: int = 8
    #: Sampling temperature for training rollouts (log-probs are taken at this temperature).
    temperature: float = 1.0

    # --- Mix-PPG (off-policy mixing) ---------------------------------------------------------
    #: p: fraction of each batch's responses drawn from replay (ReMix: 0.4). 0 = on-policy.
    replay_fraction: float = 0.4
    #: N: replay only rollouts from the last N policy versions (ReMix: 2).
    replay_window: int = 2
    #: m: gradient steps on each batch (update-to-data ratio; ReMix: 2, on-policy: 1).
    updates_per_batch: int = 2
    #: ε: clip half-width around the centre c = π_k/π_{k−i} (1 for fresh samples).
    clip_eps: float = 0.2
    #: Where replay comes from: "fifo" (the whole window), "diverse" (window curated by dedupe,
    #: dropping zero-advantage rollouts and greedy farthest-point) or "selector" (window curated by
    #: sponge.selectors' fully dynamic submodular selector, inserts and deletes as the window moves).
    replay_pool: str = "fifo"
    #: Curated pool size (diverse and selector pools).
    pool_capacity: int = 128

    # --- density-ratio replay sampling (GLOW-style) --------------------------------------------
    #: "uniform" (plain ReMix FIFO), "resample" (draw ∝ truncated ratio), "weight" (uniform draw,
    #: ratio as self-normalised loss weight).
    replay_sampling: str = "uniform"
    #: "sequence" (exact product of token ratios) or "geometric" (per-token mean in log space).
    ratio_mode: str = "sequence"
    #: Fixed truncation C of the density ratios; None = schedule clip(γ·K, cap_min, cap_max).
    ratio_cap: float | None = None
    ratio_cap_gamma: float = 1.0
    ratio_cap_min: float = 2.0
    ratio_cap_max: float = 10.0
    #: Draw probability factor decay^(staleness − 1); 1 = uniform over the window.
    recency_decay: float = 1.0

    # --- KL-Convex constraint, entropy, reincarnation ----------------------------------------
    #: β: weight of the KL-Convex term. 0 switches it (and its reference forwards) off.
    kl_coef: float = 0.01
    #: λ(t) = max(1 − decrement·ceil(max(t − hold, 0)/every), floor): weight on KL to π_base.
    lambda_hold: int = 50
    lambda_every: int = 10
    lambda_decrement: float = 0.1
    lambda_floor: float = 0.5
    #: c: entropy bonus coefficient (loss −= c·H).
    entropy_coef: float = 0.0
    #: T: at this policy version, π_base ← current policy and replay stops (None = never).
    reincarnate_at: int | None = 30
    #: Gradient steps per batch after reincarnation (plain on-policy GRPO: 1).
    updates_after_reincarnation: int = 1
    #: Restart λ's clock at reincarnation (choice; the paper leaves it open).
    restart_lambda_clock: bool = True

    # --- optimisation ------------------------------------------------------------------------
    #: Adam learning rate.
    learning_rate: float = 1e-3
    #: Gradient-norm clip (None = off).
    max_grad_norm: float | None = 1.0
    #: "token_mean" or "seq_mean" loss aggregation.
    loss_aggregation: str = "token_mean"
    #: Divide group-centred rewards by the group std (GRPO); False keeps only the mean baseline.
    scale_advantages: bool = True

    # --- evaluation, logging, reproducibility -----------------------------------------------
    #: Evaluate on the held-out set every this many iterations (and at the start and end).
    eval_every: int = 5
    #: Held-out prompts.
    eval_size: int = 256
    #: Temperature for evaluation (1.0 = sampled Pass@1; 0 = greedy).
    eval_temperature: float = 1.0
    #: Stop once this many rollouts have been generated (the x-axis of every plot).
    rollout_budget: int = 6000
    #: Optional cap on iterations (None = until the budget is spent).
    max_iterations: int | None = None
    #: Save a checkpoint every this many iterations into the output directory (None = only at the end).
    checkpoint_every: int | None = None
    seed: int = 0
    #: Run name written into each rollout's run_id and the metrics.
    run_name: str = "remix"
    #: Show a tqdm progress bar.
    progress: bool = True

    def __post_init__(self) -> None:
        checks = [
            (0 <= self.replay_fraction < 1, "replay_fraction must be in [0, 1)"),
            (self.replay_window >= 1, "replay_window must be >= 1"),
            (self.updates_per_batch >= 1, "updates_per_batch must be >= 1"),
            (self.group_size >= 2, "group_size must be >= 2 (GRPO needs a group)"),
            (self.prompts_per_step >= 1, "prompts_per_step must be >= 1"),
            (self.max_new_tokens >= 1, "max_new_tokens must be >= 1"),
            (self.clip_eps > 0, "clip_eps must be > 0"),
            (self.replay_pool in ("fifo", "diverse", "selector"),
             "replay_pool must be 'fifo', 'diverse' or 'selector'"),
            (self.replay_sampling in ("uniform", "resample", "weight"),
             "replay_sampling must be 'uniform', 'resample' or 'weight'"),
            (self.ratio_mode in ("sequence", "geometric"), "ratio_mode must be 'sequence' or 'geometric'"),
            (self.loss_aggregation in ("token_mean", "seq_mean"),
             "loss_aggregation must be 'token_mean' or 'seq_mean'"),
            (self.kl_coef >= 0, "kl_coef must be >= 0"),
            (self.temperature > 0, "temperature must be > 0 for training rollouts"),
            (self.rollout_budget > 0, "rollout_budget must be > 0"),
            (self.eval_every >= 1, "eval_every must be >= 1"),
        ]
        bad = [msg for ok, msg in checks if not ok]
        if bad:
            raise ValueError("invalid ReMixConfig: " + "; ".join(bad))

    @classmethod
    def grpo(cls, **overrides) -> ReMixConfig:
        """On-policy GRPO: no replay, one update per batch, no reincarnation."""
        base = {"replay_fraction": 0.0, "updates_per_batch": 1, "reincarnate_at": None, "run_name": "grpo"}
        base.update(overrides)
        return cls(**base)

    def replace(self, **changes) -> ReMixConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
