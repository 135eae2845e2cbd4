"""ReMixConfig: every knob of the ReMix trainer, documented where it is declared.

Defaults take ε = 0.2 from the ReMix paper; the rest are chosen from measurements (see "Defaults"
below), including more reuse than the paper's mix (p = 0.4, N = 2, m = 2).
`ReMixConfig.grpo()` gives the on-policy GRPO baseline as TRL runs it (p = 0, m = 1, no KL term, no
reincarnation, no dynamic sampling), which the policy loss reduces to exactly.

Defaults, and why (measured in bench/sample_efficiency.py, the README's training section):
- learning_rate 3e-4 with gradient clipping at 1.0: 1e-3 (the old default, tuned on the tiny GPT-2
  trained from scratch) collapsed a warm-started tiny Llama on an unseen task; 1e-4 is TRL's and is
  safe but slow on the toy models; 3e-4 plus the per-update KL stop (`target_kl`) held on every
  task, model and seed tried.
- target_kl 0.05: the second and later updates on a batch are skipped once the policy has moved this
  far (k3 estimate against the proximal policy): the "74% of tokens clipped on the second update"
  failure is exactly a second update taken after the first already left the trust region.
- kl_coef 0: TRL's GRPO and DAPO run without a KL term; KL-Convex (ReMix) stays available (β > 0).
- policy_loss "decoupled" with correction "tis" (token-level truncated IS, cap 2): the behaviour →
  proximal weight π_k/π_b is truncated instead of entering the ratio raw (ReMix's Mix-PPG puts it in
  the ratio untruncated; "mix_ppg" keeps that form).
- replay_fraction 0.5, replay_window 4, 2 passes × 2 minibatches (updates_per_batch 2, minibatches 2;
  the paper: 0.4, 2, 2 full-batch passes) with step_kl_target 0.001: per generated rollout 8× on-policy
  GRPO's gradient steps (the paper's mix 3.2×). More reuse pays where learning is bound by steps
  (`reverse`: 5.1× fewer rollouts than GRPO to its level, the paper's mix 2.3×) and hurts where it is
  bound by noise (`reverse_mixed`, where even GRPO does about as well at a third of the learning
  rate): at 3e-4 one step moved the tiny Llama there ~4.6× further than the GPT-2 on `reverse` (the
  paper's mix at a constant rate: median step KL 0.0063 vs 0.0014), and at a constant rate the mix
  ended well below GRPO; the adaptive rate takes the step down there and leaves `reverse` alone. Minibatches take the same gradient steps as four
  full-batch passes for 0.59–0.65× their compute per rollout, and did as well (bench/results/
  sample_efficiency.md and its raw runs). One pass (`updates_per_batch` 1) is the other side of the trade:
  level with GRPO on `reverse_mixed` and 1.39× TRL's time per generated rollout (the defaults 1.95×), but
  2.7× rather than 4.3× on `reverse`; a run bound by noise rather than steps should take it.
- reincarnation at half the rollout budget (`reincarnate_after=0.5`) rather than at a fixed version
  30: a fixed T switched replay off after the first 2% of a 64k-rollout run.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass
from typing import Literal

__all__ = ["CHOICES", "ReMixConfig"]



@dataclass
class ReMixConfig:
    """Every knob of the ReMix trainer: batch shape, replay, off-policy correction, losses, schedule, guard."""

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
    #: p: fraction of each batch's responses drawn from replay (ReMix paper: 0.4). 0 = on-policy.
    replay_fraction: float = 0.5
    #: N: replay only rollouts from the last N policy versions (ReMix paper: 2).
    replay_window: int = 4
    #: m: passes over each batch (update-to-data ratio; ReMix paper: 2, on-policy: 1); the
    #: passes after the first stop early once the policy leaves the trust region (target_kl).
    updates_per_batch: int = 2
    #: Split each pass over a batch into this many minibatches, a gradient step each (PPO's
    #: minibatches): m passes then take m × minibatches steps for about the compute of m
    #: full-batch steps (plus one no-grad pass scoring π_k for replayed rows). 1 = full batch.
    minibatches: int = 2
    #: ε: clip half-width of the policy ratio (below 1; and above unless clip_eps_high is set).
    clip_eps: float = 0.2
    #: Upper clip half-width ("clip-higher", DAPO); None = clip_eps.
    clip_eps_high: float | None = None
    #: "decoupled": PPO clip of π_θ/π_k around 1, times the correction weight of π_k/π_behaviour
    #: (AReaL/verl); "mix_ppg": ReMix's clip of π_θ/π_behaviour around c = π_k/π_behaviour.
    policy_loss: Literal["decoupled", "mix_ppg"] = "decoupled"
    #: Where replay comes from: "fifo" (every signal group of the window), "random" (a random
    #: subset of pool_capacity groups of the window), "curated" (groups chosen by learning signal,
    #: diversity and staleness through sponge.selectors' dynamic selector) or "diverse" (dedupe +
    #: farthest point, no selector).
    replay_pool: Literal["fifo", "random", "curated", "diverse"] = "fifo"
    #: Draw replay as whole GRPO groups ("group") or as single rollouts ("rollout").
    replay_unit: Literal["group", "rollout"] = "group"
    #: Curated/random/selector pool size (groups for "curated" and "random", rollouts otherwise).
    pool_capacity: int = 16
    #: Curated pool: weight λ of the learning-signal term (group reward std) against diversity.
    curation_quality_weight: float = 4.0
    #: Curated pool: a group's draw weight is multiplied by this per policy version of staleness.
    curation_staleness_decay: float = 0.7
    #: Drop the fresh groups whose rewards are all equal (no GRPO signal) from the update and fill
    #: their slots with replayed groups that have signal (DAPO's dynamic sampling, without
    #: generating more). Rollouts this saves are counted in `ds_rollouts_saved`.
    dynamic_sampling: bool = True

    # --- off-policy corrections --------------------------------------------------------------
    #: Per-token correction of the behaviour → proximal gap w = π_k/π_behaviour (replayed rows,
    #: and fresh rows when their log-probs are recomputed): "none" (w as is), "tis" (token-level
    #: truncation to [correction_low, correction_high]), "seq_tis" (sequence-level truncation),
    #: "mis" (sequence-level mask: rows whose sequence ratio leaves [low, high] get weight 0),
    #: "icepop" (token mask: tokens whose w leaves [low, high] get weight 0), "geo_mask"
    #: (sequence mask on the geometric-mean token ratio).
    correction: Literal["none", "tis", "seq_tis", "mis", "icepop", "geo_mask"] = "tis"
    #: Lower bound of the correction (truncation floor, or mask below).
    correction_low: float = 0.0
    #: Upper bound of the correction (truncation cap, or mask above). TRL's default mask cap is 3.
    correction_high: float = 2.0
    #: Recompute the fresh rows' log-probs with the trainer (proximal π_k) and correct the
    #: generator → trainer gap with `correction`. None = only when the generator is not the
    #: in-process TransformersGenerator (whose log-probs are the trainer's own) or bf16 is on.
    recompute_logprobs: bool | None = None

    # --- density-ratio replay sampling (GLOW-style) --------------------------------------------
    #: "uniform" (draw uniformly; the correction acts in the loss), "resample" (draw ∝ truncated
    #: sequence ratio), "weight" (uniform draw, ratio as a self-normalised loss weight).
    replay_sampling: Literal["uniform", "resample", "weight"] = "uniform"
    #: "sequence" (exact product of token ratios) or "geometric" (per-token mean in log space).
    ratio_mode: Literal["sequence", "geometric"] = "geometric"
    #: Fixed truncation C of the draw ratios; None = schedule clip(γ·K, cap_min, cap_max).
    ratio_cap: float | None = None
    #: γ of the truncation schedule (K = policy versions among the candidates).
    ratio_cap_gamma: float = 1.0
    #: Smallest truncation the schedule gives.
    ratio_cap_min: float = 2.0
    #: Largest truncation the schedule gives.
    ratio_cap_max: float = 10.0
    #: Draw probability factor decay^(staleness − 1); 1 = uniform over the window.
    recency_decay: float = 1.0

    # --- KL-Convex constraint, entropy, reincarnation ----------------------------------------
    #: β: weight of the KL-Convex term. 0 (default, as TRL's GRPO) switches it and its two
    #: reference forwards off.
    kl_coef: float = 0.0
    #: λ(t) = max(1 − decrement·ceil(max(t − hold, 0)/every), floor): weight on KL to π_base.
    lambda_hold: int = 50
    #: λ schedule: versions between decrements.
    lambda_every: int = 10
    #: λ schedule: decrement.
    lambda_decrement: float = 0.1
    #: λ schedule: floor.
    lambda_floor: float = 0.5
    #: c: entropy bonus coefficient (loss −= c·H).
    entropy_coef: float = 0.0
    #: T: reincarnate at this policy version (π_base ← current policy, replay stops). None = use
    #: reincarnate_after.
    reincarnate_at: int | None = None
    #: Reincarnate once this fraction of rollout_budget has been generated (None = never, unless
    #: reincarnate_at is set). Scales with the run instead of a fixed step.
    reincarnate_after: float | None = 0.5
    #: Full-batch gradient steps per batch after reincarnation (plain on-policy GRPO: 1; minibatches
    #: no longer apply).
    updates_after_reincarnation: int = 1
    #: Restart λ's clock at reincarnation (choice; the paper leaves it open).
    restart_lambda_clock: bool = True

    # --- optimisation ------------------------------------------------------------------------
    #: Learning rate.
    learning_rate: float = 3e-4
    #: Optimiser when none is passed to the trainer: "adam", "adamw" or "sgd".
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    #: Weight decay (adamw, sgd).
    weight_decay: float = 0.0
    #: Gradient-norm clip (None = off).
    max_grad_norm: float | None = 1.0
    #: Skip the remaining updates on a batch once the mean k3 KL(π_k ‖ π_θ) on it exceeds this
    #: (None = always take all m). Guards against a second update outside the trust region.
    target_kl: float | None = 0.05
    #: Adapt the learning rate so that one gradient step moves the policy by about this much (mean
    #: k3 KL(π_k ‖ π_θ) after a batch's first update; needs m ≥ 2): above twice it the rate is
    #: divided by 1.5, below half multiplied by 1.5, never above the rate the optimiser started with
    #: (halved by each collapse rollback). None = constant.
    step_kl_target: float | None = 0.001
    #: "token_mean" or "seq_mean" loss aggregation.
    loss_aggregation: Literal["token_mean", "seq_mean"] = "token_mean"
    #: Divide group-centred rewards by the group std (GRPO); False keeps only the mean baseline.
    scale_advantages: bool = True

    # --- collapse guard ----------------------------------------------------------------------
    #: Collapse when the policy's mean token entropy falls below this fraction of its first value.
    collapse_entropy_floor: float = 0.05
    #: Collapse when the training reward's running mean falls below this fraction of its best.
    collapse_reward_floor: float = 0.3
    #: Collapse when the largest token ratio π_θ/π_k in an update exceeds this.
    collapse_ratio_max: float = 100.0
    #: What a detected collapse does: "warn" (log and record), "stop" (end training), "rollback"
    #: (restore the last healthy weights and halve the learning rate).
    collapse_action: Literal["warn", "stop", "rollback"] = "rollback"

    # --- evaluation, logging, reproducibility -----------------------------------------------
    #: Evaluate on the held-out set every this many iterations (and at the start and end).
    eval_every: int = 5
    #: Held-out prompts (when the task provides its own held-out set through eval_set).
    eval_size: int = 256
    #: Temperature for evaluation (0 = greedy; 1.0 = sampled Pass@1).
    eval_temperature: float = 0.0
    #: Stop once this many rollouts have been generated (the x-axis of every plot).
    rollout_budget: int = 6000
    #: Optional cap on iterations (None = until the budget is spent).
    max_iterations: int | None = None
    #: Optional wall-clock cap on train() in seconds (None = none).
    max_wall_seconds: float | None = None
    #: Save a checkpoint every this many iterations into the output directory (None = only at the end).
    checkpoint_every: int | None = None
    #: Seed of the trainer's RNG (prompts, replay draws, sampling) and of torch.
    seed: int = 0

    # --- device ------------------------------------------------------------------------------
    #: Where the policy, its frozen references and every tensor of an update live: "auto" (the
    #: first CUDA device when torch sees one, else the CPU), "cpu", "cuda" or "cuda:N".
    device: str = "auto"
    #: Run the policy's forward passes (scoring, updates, in-process generation) under bf16
    #: autocast; log-softmax, losses, master weights and the optimiser stay float32. Off by
    #: default: bf16 logits move token log-probs by ~1e-2, so with it on the fresh rows' log-probs
    #: are recomputed (see recompute_logprobs) and the correction absorbs the kernel gap.
    bf16: bool = False
    #: Run name written into each rollout's run_id and the metrics.
    run_name: str = "remix"
    #: Show a tqdm progress bar.
    progress: bool = True

    def __post_init__(self) -> None:
        checks = [
            (0 <= self.replay_fraction < 1, "replay_fraction must be in [0, 1)"),
            (self.replay_window >= 1, "replay_window must be >= 1"),
            (self.updates_per_batch >= 1, "updates_per_batch must be >= 1"),
            (self.minibatches >= 1, "minibatches must be >= 1"),
            (self.group_size >= 2, "group_size must be >= 2 (GRPO needs a group)"),
            (self.prompts_per_step >= 1, "prompts_per_step must be >= 1"),
            (self.max_new_tokens >= 1, "max_new_tokens must be >= 1"),
            (self.clip_eps > 0, "clip_eps must be > 0"),
            (self.clip_eps_high is None or self.clip_eps_high > 0, "clip_eps_high must be > 0"),
            (self.pool_capacity >= 1, "pool_capacity must be >= 1"),
            (0 < self.curation_staleness_decay <= 1, "curation_staleness_decay must be in (0, 1]"),
            (self.curation_quality_weight >= 0, "curation_quality_weight must be >= 0"),
            (0 <= self.correction_low < 1 < self.correction_high,
             "need 0 <= correction_low < 1 < correction_high"),
            (self.kl_coef >= 0, "kl_coef must be >= 0"),
            (self.temperature > 0, "temperature must be > 0 for training rollouts"),
            (self.eval_temperature >= 0, "eval_temperature must be >= 0"),
            (self.rollout_budget > 0, "rollout_budget must be > 0"),
            (self.eval_every >= 1, "eval_every must be >= 1"),
            (self.learning_rate > 0, "learning_rate must be > 0"),
            (self.target_kl is None or self.target_kl > 0, "target_kl must be > 0 or None"),
            (self.step_kl_target is None or self.step_kl_target > 0, "step_kl_target must be > 0 or None"),
            (self.reincarnate_after is None or 0 < self.reincarnate_after <= 1,
             "reincarnate_after must be in (0, 1] or None"),
            (self.max_wall_seconds is None or self.max_wall_seconds > 0, "max_wall_seconds must be > 0"),
            (re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device) is not None,
             f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}"),
        ]
        checks += [(getattr(self, name) in allowed, f"{name} must be one of {', '.join(map(repr, allowed))}")
                   for name, allowed in CHOICES.items()]
        bad = [msg for ok, msg in checks if not ok]
        if bad:
            raise ValueError("invalid ReMixConfig: " + "; ".join(bad))

    @classmethod
    def grpo(cls, **overrides) -> ReMixConfig:
        """On-policy GRPO as TRL runs it: no replay, one update per batch, no KL term, no
        reincarnation, no dynamic sampling (zero-variance groups stay in the batch)."""
        base = {"replay_fraction": 0.0, "updates_per_batch": 1, "minibatches": 1, "reincarnate_at": None,
                "step_kl_target": None, "reincarnate_after": None, "kl_coef": 0.0, "dynamic_sampling": False, "run_name": "grpo"}
        base.update(overrides)
        return cls(**base)

    @property
    def eps_high(self) -> float:
        return self.clip_eps if self.clip_eps_high is None else self.clip_eps_high

    def replace(self, **changes) -> ReMixConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


#: Allowed values of every string knob, from their Literal types (__post_init__ checks them).
CHOICES: dict[str, tuple[str, ...]] = {
    name: typing.get_args(hint) for name, hint in typing.get_type_hints(ReMixConfig).items()
    if typing.get_origin(hint) is Literal}
