"""Sample efficiency of ReMix against on-policy GRPO at toy scale (the ReMix paper's claim).

One toy task, one tiny model (warm-started once per seed, the same start for every method), the
same rollout budget and the same seeds for three methods:

    grpo            on-policy GRPO (p = 0, m = 1)
    remix_fifo      ReMix: p = 0.4 replay from the last N = 2 versions (uniform), m = 2, reincarnation at T
    remix_curated   ReMix drawing replay by truncated density ratios (SIR) from a diversity-curated pool
                    (sponge.selectors' dynamic submodular selector when importable, else the simple
                    dedupe + farthest-point pool)

Reports rollouts needed to reach a target held-out success rate (median and spread over seeds),
final success, response length and wall time, and plots every run against cumulative rollouts.

    .venv/bin/python bench/sample_efficiency.py                      # default: ~5-15 min on 2 cores
    .venv/bin/python bench/sample_efficiency.py --seeds 5 --budget 20000 --target 0.6
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from sponge.trainer import (
    CharTokenizer,
    ReMixConfig,
    ReMixTrainer,
    build_tiny_model,
    make_task,
    warm_start,
)
from sponge.trainer.metrics import plot_runs


def selector_available() -> bool:
    try:
        from sponge.selectors import DynamicSelector, FacilityLocation  # noqa: F401
        return True
    except Exception:  # noqa: BLE001 - any import failure means: use the simple pool
        return False


def method_configs(args, pool: str) -> dict[str, ReMixConfig]:
    common = {"rollout_budget": args.budget, "eval_every": args.eval_every, "eval_size": args.eval_size,
                  "prompts_per_step": args.prompts_per_step, "group_size": args.group_size,
                  "learning_rate": args.lr, "kl_coef": args.kl_coef, "progress": False}
    remix = {"replay_fraction": 0.4, "replay_window": 2, "updates_per_batch": 2, "reincarnate_at": args.reincarnate_at}
    return {
        "grpo": ReMixConfig.grpo(run_name="grpo", **common),
        "remix_fifo": ReMixConfig(run_name="remix_fifo", replay_pool="fifo", replay_sampling="uniform",
                                  **remix, **common),
        "remix_curated": ReMixConfig(run_name="remix_curated", replay_pool=pool, replay_sampling="resample",
                                     pool_capacity=args.pool_capacity, **remix, **common),
    }


def rollouts_to_target(history: list[dict], target: float) -> float:
    for r in history:
        if "eval_success" in r and r["eval_success"] >= target:
            return float(r["rollouts"])
    return math.inf


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--task", default="reverse", choices=["reverse", "add"])
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..S-1")
    p.add_argument("--budget", type=int, default=8000, help="rollouts per run")
    p.add_argument("--target", type=float, default=0.5, help="held-out success rate to reach")
    p.add_argument("--eval-every", type=int, default=4, help="iterations between held-out evaluations")
    p.add_argument("--eval-size", type=int, default=256)
    p.add_argument("--prompts-per-step", type=int, default=16)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--kl-coef", type=float, default=0.01)
    p.add_argument("--reincarnate-at", type=int, default=50, help="T (policy versions)")
    p.add_argument("--pool-capacity", type=int, default=128)
    p.add_argument("--pool", choices=["auto", "selector", "diverse"], default="auto",
                   help="curated pool: the dynamic selector (auto when importable) or the simple one")
    p.add_argument("--warm-start-steps", type=int, default=50)
    p.add_argument("--methods", default="grpo,remix_fifo,remix_curated")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    pool = args.pool if args.pool != "auto" else ("selector" if selector_available() else "diverse")
    configs = method_configs(args, pool)
    methods = [m.strip() for m in args.methods.split(",")]
    unknown = set(methods) - set(configs)
    if unknown:
        p.error(f"unknown method(s) {sorted(unknown)}; choose from {sorted(configs)}")
    task = make_task(args.task)
    tok = CharTokenizer(task.alphabet)
    print(f"task={task.name} seeds={args.seeds} budget={args.budget} target={args.target} "
          f"curated pool={pool} (selector importable: {selector_available()})", flush=True)

    runs: dict[str, list[dict]] = {}
    results: dict[str, list[dict]] = {m: [] for m in methods}
    for seed in range(args.seeds):
        start = build_tiny_model(tok, seed=seed)
        warm_start(start, tok, task, steps=args.warm_start_steps, seed=seed)
        for method in methods:
            cfg = configs[method].replace(seed=seed)
            trainer = ReMixTrainer(copy.deepcopy(start), tok, task, cfg)
            t0 = time.perf_counter()
            history = trainer.train()
            wall = time.perf_counter() - t0
            runs[f"{method}/{seed}"] = history
            last = [r for r in history if "eval_success" in r][-1]
            res = {"seed": seed, "rollouts_to_target": rollouts_to_target(history, args.target),
                   "start_success": history[0]["eval_success"], "final_success": last["eval_success"],
                   "final_response_len": last["eval_response_len"], "wall_s": wall,
                   "rollouts": trainer.rollouts_generated, "updates": trainer.version}
            results[method].append(res)
            print(f"  seed {seed} {method:14s} to-target={res['rollouts_to_target']:>7} "
                  f"start={res['start_success']:.3f} final={res['final_success']:.3f} "
                  f"len={res['final_response_len']:.2f} wall={wall:.1f}s", flush=True)

    summary = {}
    for method, rs in results.items():
        reach = [r["rollouts_to_target"] for r in rs]
        summary[method] = {
            "median_rollouts_to_target": statistics.median(reach),
            "min_rollouts_to_target": min(reach), "max_rollouts_to_target": max(reach),
            "seeds_reaching_target": sum(math.isfinite(x) for x in reach),
            "final_success_mean": float(np.mean([r["final_success"] for r in rs])),
            "final_success_std": float(np.std([r["final_success"] for r in rs])),
            "final_response_len_mean": float(np.mean([r["final_response_len"] for r in rs])),
            "wall_s_median": statistics.median(r["wall_s"] for r in rs),
        }
    base = summary.get("grpo", {}).get("median_rollouts_to_target")
    for method, s in summary.items():
        med = s["median_rollouts_to_target"]
        s["speedup_vs_grpo"] = (base / med) if base and math.isfinite(base) and math.isfinite(med) else None

    lines = [(f"task `{task.name}`, {args.seeds} seeds, budget {args.budget} rollouts, target held-out "
             f"success {args.target}, curated pool: `{pool}`"), "",
             ("| method | rollouts to target: median [min, max] (seeds reaching) | × fewer than GRPO "
             "| final success (mean ± std) | final response len | wall s (median) |"),
             "|---|---|---|---|---|---|"]
    for method, s in summary.items():
        fmt = lambda x: "not reached" if not math.isfinite(x) else f"{x:.0f}"
        speed = "—" if s["speedup_vs_grpo"] is None else f"{s['speedup_vs_grpo']:.2f}×"
        lines.append(f"| {method} | {fmt(s['median_rollouts_to_target'])} [{fmt(s['min_rollouts_to_target'])}, "
                     f"{fmt(s['max_rollouts_to_target'])}] ({s['seeds_reaching_target']}/{args.seeds}) | {speed} "
                     f"| {s['final_success_mean']:.3f} ± {s['final_success_std']:.3f} "
                     f"| {s['final_response_len_mean']:.2f} | {s['wall_s_median']:.1f} |")
    table = "\n".join(lines)
    print("\n" + table)

    args.out.mkdir(parents=True, exist_ok=True)
    png = plot_runs(runs, args.out / "sample_efficiency.png", target=args.target,
                    title=f"{task.name}: GRPO vs ReMix ({args.seeds} seeds, same rollout budget)")
    payload = {"command": "python bench/sample_efficiency.py " + " ".join(sys.argv[1:] if argv is None else argv),
               "args": {k: str(v) for k, v in vars(args).items()}, "pool": pool, "summary": summary,
               "runs": results}
    (args.out / "sample_efficiency.json").write_text(json.dumps(payload, indent=2, default=str))
    (args.out / "sample_efficiency.md").write_text(table + "\n")
    print(f"\nwrote {png}, {args.out / 'sample_efficiency.json'}, {args.out / 'sample_efficiency.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
