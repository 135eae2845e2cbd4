"""A control for the long run in bench/results/long64k: on-policy GRPO whose learning rate steps down
once, at a fraction of the budget, to the rate ReMix's adaptive schedule settles at.

ReMix reincarnates at half the budget and then trains on-policy at whatever rate its adaptive schedule
(`step_kl_target`) had reached; GRPO keeps its rate. This separates what replay bought from what a rate
that drops at half the budget buys. Same setup, seeds, warm starts and held-out evaluation as
`bench/sample_efficiency.py` (it reuses that bench's warm-start cache and `method_config`).

    python bench/lr_step_control.py                       # reverse_mixed, 64k rollouts, 5 seeds (~5 min)
    python bench/lr_step_control.py --seeds 2 --budget 8000
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bench.sample_efficiency as se


def run_seed(job: dict) -> dict:
    """GRPO on one seed, its rate set to `low_lr` once `step_at` × budget rollouts are generated."""
    import torch

    torch.set_num_threads(1)
    from sponge.trainer import ReMixTrainer

    setup, seed = job["setup"], job["seed"]
    task, tok, model = se.warm_started(setup, seed, job["cache"])   # the bench's shared warm start
    args = argparse.Namespace(budget=job["budget"], eval_every=job["eval_every"], eval_size=job["eval_size"],
                              lr=None, curated_window=None)
    cfg = se.method_config("grpo", args, setup, seed)
    trainer: ReMixTrainer | None = None

    def step_down(_version: int) -> None:
        if trainer.rollouts_generated >= job["step_at"] * job["budget"]:
            for group in trainer.optimizer.param_groups:
                group["lr"] = job["low_lr"]

    trainer = ReMixTrainer(model, tok, task, cfg, eval_prompts=task.eval_set(cfg.eval_size)[0],
                           on_policy_version=step_down)
    history = trainer.train()
    keep = ("rollouts", "wall_time", "eval_success", "learning_rate")
    return {"setup": setup, "method": "grpo", "seed": seed, "label": "grpo_lr_step",
            "history": [{k: h[k] for k in keep if k in h} for h in history], "collapses": []}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--setup", default="reverse_mixed", choices=sorted(se.SETUPS))
    p.add_argument("--seeds", type=int, default=5, help="seeds 0..S-1")
    p.add_argument("--budget", type=int, default=64000, help="rollouts generated per run")
    p.add_argument("--eval-every", type=int, default=10, help="iterations between held-out evaluations")
    p.add_argument("--eval-size", type=int, default=256, help="held-out prompts")
    p.add_argument("--step-at", type=float, default=0.5, help="fraction of the budget where the rate steps down")
    p.add_argument("--low-lr", type=float, default=5e-5, help="the rate after the step")
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel (one torch thread each)")
    p.add_argument("--out", type=Path, default=Path("bench/results/long64k"))
    args = p.parse_args(argv)

    cache = Path(tempfile.gettempdir()) / "sponge_bench_warm_start"
    cache.mkdir(parents=True, exist_ok=True)
    jobs = [{"setup": args.setup, "seed": s, "budget": args.budget, "eval_every": args.eval_every,
             "eval_size": args.eval_size, "step_at": args.step_at, "low_lr": args.low_lr, "cache": str(cache)}
            for s in range(args.seeds)]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(run_seed, jobs))
    fractions = (0.25, 0.5, 0.75, 1.0)
    command = "python bench/lr_step_control.py " + " ".join(sys.argv[1:] if argv is None else argv)
    lines = [f"`{command}` ({args.seeds} seeds, {time.perf_counter() - t0:.0f} s)", "",
             (f"GRPO on {args.setup}, learning rate stepped down to {args.low_lr:g} at {args.step_at:g} of "
              f"{args.budget} rollouts: held-out success"), "",
             "| seed | " + " | ".join(f"@{f:.0%}" for f in fractions) + " |", "|---|" + "---|" * len(fractions)]
    for r in results:
        at = [se.success_at(r["history"], f * args.budget) for f in fractions]
        lines.append(f"| {r['seed']} | " + " | ".join(f"{x:.3f}" for x in at) + " |")
    lines.append("| mean | " + " | ".join(
        f"{np.mean([se.success_at(r['history'], f * args.budget) for r in results]):.3f}" for f in fractions) + " |")
    report = "\n".join(lines)
    print(report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lr_step_control.md").write_text(report + "\n")
    (args.out / "lr_step_control_runs.json").write_text(json.dumps(results))
    print(f"\nwrote {args.out / 'lr_step_control.md'}, lr_step_control_runs.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
