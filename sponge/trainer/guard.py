"""Collapse detection for RL fine-tuning: says when a run has fallen over, and why.

Collapse, as it shows in the logs of runs that fell over (issue "The payoff", lr 1e-3 on a tiny
Llama): the policy's entropy drops to near zero (it emits one answer for everything), the
training reward falls far below what the run had reached, or the token ratios π_θ/π_k blow up
within one batch's updates. `CollapseGuard.check(record)` looks at one step's record and returns
the reason, or None; the trainer logs it, records it in the metrics and acts on it
(`ReMixConfig.collapse_action`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

__all__ = ["CollapseGuard"]


@dataclass
class CollapseGuard:
    #: Collapse when entropy < entropy_floor × the first step's entropy.
    entropy_floor: float = 0.05
    #: Collapse when the reward's running mean < reward_floor × its best running mean (once the
    #: best is at least `min_reward`, so a run that never learned is not called collapsed).
    reward_floor: float = 0.3
    #: Largest token ratio π_θ/π_k allowed within one batch's updates.
    ratio_max: float = 100.0
    #: Running-mean weight of each new step's reward.
    reward_alpha: float = 0.2
    #: See reward_floor.
    min_reward: float = 0.05
    #: Steps before the reward test applies (the running mean needs a few to settle).
    warmup_steps: int = 5
    state: dict = field(default_factory=lambda: {"entropy0": None, "reward_ema": None, "reward_best": 0.0,
                                                 "steps": 0})

    def check(self, record: dict) -> str | None:
        """The reason this step looks collapsed, or None. Updates the running statistics."""
        s = self.state
        s["steps"] += 1
        loss, entropy, reward = record.get("loss"), record.get("entropy"), record.get("reward_mean")
        if loss is not None and not math.isfinite(loss):
            return f"non-finite loss {loss}"
        if record.get("ratio_max", 0.0) > self.ratio_max:
            return f"token ratio π_θ/π_k reached {record['ratio_max']:.3g} (> {self.ratio_max:g})"
        if entropy is not None and record.get("updates", 1) > 0:
            if s["entropy0"] is None:
                s["entropy0"] = entropy
            elif s["entropy0"] > 0 and entropy < self.entropy_floor * s["entropy0"]:
                return (f"entropy fell to {entropy:.4f} (< {self.entropy_floor:g} × the first step's "
                        f"{s['entropy0']:.4f})")
        if reward is not None:
            ema = reward if s["reward_ema"] is None else (1 - self.reward_alpha) * s["reward_ema"] + \
                self.reward_alpha * reward
            s["reward_ema"] = ema
            if s["steps"] > self.warmup_steps:
                if s["reward_best"] >= self.min_reward and ema < self.reward_floor * s["reward_best"]:
                    return (f"training reward's running mean fell to {ema:.3f} (< {self.reward_floor:g} × "
                            f"its best {s['reward_best']:.3f})")
                s["reward_best"] = max(s["reward_best"], ema)
        return None

    def reset_reward(self) -> None:
        """After a rollback: the running mean restarts (the best is kept)."""
        self.state["reward_ema"] = None
        self.state["steps"] = 0
