"""Seconds per generated rollout: sponge's GRPO and ReMix steps (the defaults, and one pass instead of
two) against TRL's GRPOTrainer step, on the same model, batch (prompts × group size), thread count and
warm start, alternated round by round in one process so machine load hits all alike. Prints medians
and ratios to TRL.

    python bench/step_time.py                     # tiny Llama, 16 prompts × 8, 1 thread, 3 rounds
    python bench/step_time.py --arch gpt2 --rounds 5 --steps 12
    python bench/step_time.py --profile           # also a pyinstrument profile of one sponge ReMix run
    python bench/step_time.py --answer-len 32     # 32-digit answers instead of the task's 2-8

On the bench's tasks answers are 2-8 tokens, and a step's time is mostly the update (forward and backward
passes), of which ReMix takes more per generated rollout. `--answer-len L` reverses strings of exactly L
digits instead (a model with room for them, warm-started on them) to see whether longer answers shift
that balance towards generation. On a CPU they do not (bench/results/step_time_llama_len32.md): decoding
with a KV cache costs about one forward over the same tokens, and the update grows faster with length.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--task", default="reverse_mixed")
    p.add_argument("--arch", default="llama", choices=["llama", "gpt2"])
    p.add_argument("--warm-start-steps", type=int, default=150)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=10, help="steps per method per round")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--answer-len", type=int, default=None,
                   help="reverse strings of exactly this many digits (default: the task's own lengths)")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from bench.trl_baseline import run_trl, trl_available
    from sponge.trainer import CharTokenizer, ReMixConfig, ReMixTrainer, build_tiny_model, make_task, warm_start
    from sponge.trainer.models import TinyModelConfig

    if args.answer_len is None:
        task, model_config = make_task(args.task), TinyModelConfig(arch=args.arch)
    else:
        task = make_task(args.task, min_len=args.answer_len, max_len=args.answer_len)
        model_config = TinyModelConfig(arch=args.arch, n_positions=2 * args.answer_len + 8)
    tok = CharTokenizer(task.alphabet)
    start = build_tiny_model(tok, model_config, seed=0)
    warm_start(start, tok, task, steps=args.warm_start_steps, seed=0)
    common = {"max_new_tokens": task.max_answer_len + 1, "eval_size": 8, "eval_every": 10_000, "progress": False}
    methods = {"sponge_grpo": ReMixConfig.grpo(**common),
               "sponge_remix": ReMixConfig(reincarnate_after=None, **common),
               # one pass of two minibatches instead of the defaults' two (the `passes` trade-off)
               "sponge_remix_one_pass": ReMixConfig(reincarnate_after=None, updates_per_batch=1, **common)}
    if trl_available():
        methods["trl_grpo"] = ReMixConfig.grpo(**common)
    per_rollout: dict[str, list[float]] = {m: [] for m in methods}
    lengths: dict[str, list[float]] = {m: [] for m in methods}
    for r in range(args.rounds):
        for name, cfg in methods.items():
            budget = args.steps * cfg.prompts_per_step * cfg.group_size
            cfg = cfg.replace(rollout_budget=budget, seed=r)
            model = copy.deepcopy(start)
            if name == "trl_grpo":
                hist = run_trl(model, tok, task, cfg, task.eval_set(8)[0])
                steps = [(h["step_s"], cfg.prompts_per_step * cfg.group_size) for h in hist[1:]]
            else:
                hist = ReMixTrainer(model, tok, task, cfg, eval_prompts=[]).train()
                steps = [(h["step_s"], h["n_fresh"]) for h in hist[1:]]
            steps = steps[1:]   # the first step pays one-off costs (allocations, compilation)
            lengths[name] += [h["response_len"] for h in hist[1:] if np.isfinite(h.get("response_len", np.nan))]
            ms = 1000 * float(np.sum([s for s, _ in steps]) / np.sum([n for _, n in steps]))
            per_rollout[name].append(ms)
            print(f"round {r} {name:13s} {ms:.3f} ms per generated rollout", flush=True)
    med = {m: statistics.median(v) for m, v in per_rollout.items()}
    answers = "" if args.answer_len is None else f", {args.answer_len}-digit answers"
    lines = [f"`python bench/step_time.py {' '.join(sys.argv[1:] if argv is None else argv)}` "
             f"({args.task}{answers}, tiny {args.arch}, 16 prompts × 8, {args.threads} thread(s), {args.rounds} "
             f"alternated rounds of {args.steps} steps)", "",
             "| method | ms per generated rollout (median of rounds) | × TRL's | mean response tokens |",
             "|---|---|---|---|"]
    for m, v in med.items():
        ratio = f"{v / med['trl_grpo']:.2f}×" if "trl_grpo" in med else "—"
        length = f"{np.mean(lengths[m]):.1f}" if lengths[m] else "—"
        lines.append(f"| {m} | {v:.3f} ({', '.join(f'{x:.3f}' for x in per_rollout[m])}) | {ratio} | {length} |")
    text = "\n".join(lines)
    print("\n" + text)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"step_time_{args.arch}" + ("" if args.answer_len is None else f"_len{args.answer_len}")
    (args.out / f"{stem}.md").write_text(text + "\n")
    (args.out / f"{stem}.json").write_text(json.dumps(per_rollout))

    if args.profile:
        from pyinstrument import Profiler

        cfg = methods["sponge_remix"].replace(rollout_budget=args.steps * 128)
        trainer = ReMixTrainer(copy.deepcopy(start), tok, task, cfg, eval_prompts=[])
        profiler = Profiler(interval=0.001)
        profiler.start()
        trainer.train()
        profiler.stop()
        profile = args.out / f"{stem.replace('step_time_', 'step_time_profile_')}.txt"
        profile.write_text(profiler.output_text(unicode=False, color=False))
        print(f"profile in {profile}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
