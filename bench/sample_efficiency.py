"""Sample efficiency of ReMix (window, curated, random-subset replay) against on-policy GRPO and TRL's
GRPOTrainer, counted in rollouts generated, with bootstrap confidence intervals over seeds.

Setups (task, tiny model, supervised warm start), the same start for every method of a seed:

    reverse        reverse 3-5 digits; tiny GPT-2; exact-match reward
    reverse_mixed  reverse 2-8 digits (easy short and hard long prompts, answers of 2-8 tokens);
                   tiny Llama (another family than the defaults were first tuned on); partial credit

Methods (every one with ReMixConfig's defaults, only the named knobs changed; one learning rate):

    grpo            on-policy GRPO as TRL runs it (ReMixConfig.grpo(): p = 0, m = 1, no KL)
    remix_paper     ReMix with the paper's mix (p = 0.4, N = 2, m = 2; ReMixConfig's defaults before
                    this bench chose others), constant learning rate, FIFO window
    remix_window    ReMix with its defaults, replay = every signal group of the last N versions (FIFO)
    remix_fullbatch the window with 4 full-batch steps per batch instead of the defaults' 2 passes ×
                    2 minibatches (FULLBATCH, the defaults before minibatches: the same number of
                    gradient steps for about twice the update compute)
    remix_curated   ReMix, replay = pool_capacity groups curated by the dynamic selector (learning
                    signal + diversity, staleness-decayed draw weight)
    remix_random    ReMix, replay = a random subset of pool_capacity groups of the same window
    trl_grpo        TRL 1.16's GRPOTrainer, same task/model/warm start/batch/lr (needs `trl`)

Reports, per setup: rollouts to the target held-out success (median over seeds, bootstrap 95% CI,
seeds reaching), × fewer than GRPO and than the window (ratio of medians, bootstrap CI), success at
fixed budgets, seconds per step and per generated rollout, collapses, what replay served (reward,
|advantage|, staleness, ratio spread), and curves with bands. `--ablations` adds: the whipping effect
(response length against p), reincarnation on/off/when, the correction cap's ESS against clipped
mass, one pass against the defaults' two, and replay over 16 policy versions instead of 4 (the window,
the random subset and curated: more to choose from, older), the last two on both tasks and every main seed.

    python bench/sample_efficiency.py --quick            # a few minutes: 2 seeds, small budget
    python bench/sample_efficiency.py --seeds 5 --jobs 2 --ablations     # the full run (~1 h, 2 cores)
    python bench/sample_efficiency.py --seeds 10 --reuse-runs bench/results/sample_efficiency_runs.json ...
                                                     # more seeds: only seeds 5-9 run (same other flags)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

#: setup name → (task, model arch, warm-start steps, max new tokens, target gain in held-out success
#: over the run's own warm start; seeds start at different levels, so the target is relative)
SETUPS = {
    "reverse": ("reverse", "gpt2", 50, 6, 0.2),
    "reverse_mixed": ("reverse_mixed", "llama", 150, 9, 0.1),
}

#: The ReMix paper's mix, at a constant learning rate (ReMixConfig's defaults until they were measured).
PAPER = {"replay_fraction": 0.4, "replay_window": 2, "updates_per_batch": 2, "minibatches": 1,
         "step_kl_target": None}

#: Four full-batch steps per batch: as many gradient steps as the defaults' two passes of two minibatches.
FULLBATCH = {"updates_per_batch": 4, "minibatches": 1}

METHODS = ("grpo", "remix_paper", "remix_window", "remix_fullbatch", "remix_curated", "remix_random", "trl_grpo")


def method_config(method: str, args, setup: str, seed: int, **overrides):
    from sponge.trainer import ReMixConfig

    _, _, _, max_new, _ = SETUPS[setup]
    common = {"rollout_budget": args.budget, "eval_every": args.eval_every, "eval_size": args.eval_size,
              "max_new_tokens": max_new, "progress": False, "seed": seed, "run_name": method}
    if args.lr is not None:
        common["learning_rate"] = args.lr
    window = {} if args.curated_window is None else {"replay_window": args.curated_window}
    if method in ("grpo", "trl_grpo"):
        cfg = ReMixConfig.grpo(**common)
    elif method == "remix_paper":
        cfg = ReMixConfig(replay_pool="fifo", **PAPER, **common)
    elif method == "remix_fullbatch":
        cfg = ReMixConfig(replay_pool="fifo", **FULLBATCH, **common)
    elif method == "remix_window":
        cfg = ReMixConfig(replay_pool="fifo", **common)
    elif method == "remix_curated":
        cfg = ReMixConfig(replay_pool="curated", **window, **common)
    elif method == "remix_random":
        cfg = ReMixConfig(replay_pool="random", **window, **common)
    else:
        raise ValueError(f"unknown method {method!r}")
    return cfg.replace(**overrides) if overrides else cfg


KEEP = ("rollouts", "wall_time", "step_s", "eval_success", "eval_response_len", "reward_mean", "response_len",
        "n_replay", "replay_reward_mean", "replay_abs_adv", "replay_mean_staleness", "replay_is_ess",
        "replay_is_ess_raw", "replay_is_clipped_mass", "replay_is_masked_tokens", "replay_is_abs_log_ratio",
        "replay_candidate_groups", "ds_zero_var_groups", "ds_filled_rows", "rollouts_saved_total", "collapse",
        "updates", "n_fresh", "replay_on", "approx_kl", "step_kl", "clip_frac", "entropy", "learning_rate")


def warm_started(setup: str, seed: int, cache_dir: str | Path):
    """(task, tokenizer, model) of a setup and seed, the model from its supervised warm start. The warm
    start is the same for every method of a (setup, seed): computed once, shared on disk in `cache_dir`."""
    import torch

    from sponge.trainer import CharTokenizer, build_tiny_model, make_task, warm_start
    from sponge.trainer.models import TinyModelConfig

    task_name, arch, ws, _, _ = SETUPS[setup]
    task = make_task(task_name)
    tok = CharTokenizer(task.alphabet)
    model = build_tiny_model(tok, TinyModelConfig(arch=arch), seed=seed)
    cache = Path(cache_dir) / f"{setup}-{arch}-ws{ws}-s{seed}.pt"
    if cache.exists():
        model.load_state_dict(torch.load(cache))
    else:
        warm_start(model, tok, task, steps=ws, seed=seed)
        torch.save(model.state_dict(), str(cache) + f".{os.getpid()}")
        os.replace(str(cache) + f".{os.getpid()}", cache)
    return task, tok, model


def run_one(job: dict) -> dict:
    """One (setup, method, seed[, overrides]) run in a worker process; returns a compact history."""
    import torch

    torch.set_num_threads(job["threads"])
    from sponge.trainer import ReMixTrainer

    args = argparse.Namespace(**job["args"])
    task, tok, model = warm_started(job["setup"], job["seed"], job["cache"])
    cfg = method_config(job["method"], args, job["setup"], job["seed"], **job.get("overrides", {}))
    eval_prompts = task.eval_set(cfg.eval_size)[0]
    t0 = time.perf_counter()
    collapses = []
    if job["method"] == "trl_grpo":
        from bench.trl_baseline import run_trl
        history = run_trl(model, tok, task, cfg, eval_prompts)
    else:
        trainer = ReMixTrainer(model, tok, task, cfg, eval_prompts=eval_prompts)
        history = trainer.train()
        collapses = trainer.collapses
    compact = [{k: _short(r[k]) for k in KEEP if k in r} for r in history]
    return {**{k: job[k] for k in ("setup", "method", "seed", "label")}, "history": compact,
            "wall_s": time.perf_counter() - t0, "collapses": collapses}


def _short(x):
    """Floats to 6 significant digits: the raw-runs file stays a few MB."""
    return float(f"{x:.6g}") if isinstance(x, float) else x


# ------------------------------------------------------------------------------------------ statistics

def rollouts_to_target(history: list[dict], gain: float, absolute: float | None = None,
                       field: str = "rollouts") -> float:
    """Rollouts (or another `field`, e.g. training seconds "wall_time") at the first evaluation whose
    success is at least start + `gain` (or `absolute`)."""
    target = absolute if absolute is not None else history[0]["eval_success"] + gain
    for r in history:
        if r.get("eval_success") is not None and r["eval_success"] >= target - 1e-9:
            return float(r.get(field, math.nan))
    return math.inf


def success_at(history: list[dict], budget: float) -> float:
    """Held-out success of the last evaluation at or before `budget` rollouts."""
    best = float("nan")
    for r in history:
        if "eval_success" in r and r["rollouts"] <= budget:
            best = r["eval_success"]
    return best


def bootstrap_median_ci(x: np.ndarray, rng: np.random.Generator, n: int = 2000) -> tuple[float, float]:
    x = np.asarray(x, dtype=float)
    meds = np.median(rng.choice(x, size=(n, len(x)), replace=True), axis=1)
    return float(np.quantile(meds, 0.025)), float(np.quantile(meds, 0.975))


def bootstrap_ratio_ci(base: np.ndarray, other: np.ndarray, rng: np.random.Generator,
                       n: int = 2000) -> tuple[float, float, float]:
    """median(base) / median(other) (× fewer rollouts than base) and its 95% bootstrap CI, seeds
    resampled independently; an unreached target counts as infinite rollouts."""
    b = np.median(rng.choice(base, size=(n, len(base)), replace=True), axis=1)
    o = np.median(rng.choice(other, size=(n, len(other)), replace=True), axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratios = np.where(np.isinf(b) & np.isinf(o), np.nan, b / o)
    ratios = ratios[~np.isnan(ratios)]
    with np.errstate(invalid="ignore", divide="ignore"):
        point = float(np.median(base) / np.median(other)) if not (np.isinf(np.median(base)) and
                                                                  np.isinf(np.median(other))) else float("nan")
    if ratios.size == 0:
        return point, float("nan"), float("nan")
    # quantiles over values that may be infinite (the baseline's median not reached in a resample)
    finite = np.where(np.isinf(ratios), 1e300, ratios)
    lo, hi = (float(np.quantile(finite, q, method="lower" if q < 0.5 else "higher")) for q in (0.025, 0.975))
    return point, (math.inf if lo >= 1e300 else lo), (math.inf if hi >= 1e300 else hi)


def fmt_ratio(point: float, lo: float, hi: float, budget: int, base_median: float, median: float) -> str:
    """× fewer rollouts with its CI; where a median did not reach the target within the budget, the
    ratio is a bound: '> x' (the baseline did not reach it) or '< x' (this method did not)."""
    if math.isinf(base_median) and math.isinf(median):
        return "neither reached"
    if math.isinf(base_median):
        return f"> {budget / median:.2f}× (baseline not reached)"
    if math.isinf(median):
        return f"< {base_median / budget:.2f}× (not reached)"
    bound = lambda x: "∞" if math.isinf(x) else ("0" if x == 0 else f"{x:.2f}")
    return f"{point:.2f}× [{bound(lo)}, {bound(hi)}]"


def fmt(x: float, digits: int = 0) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    if math.isinf(x):
        return "not reached" if x > 0 else "0"
    return f"{x:.{digits}f}"


def seconds_per_rollout(runs: list[dict]) -> float:
    """Median seconds per training step over median rollouts generated per step (TRL's runs log no count: 128)."""
    steps = [h["step_s"] for r in runs for h in r["history"][1:] if h.get("step_s") is not None]
    fresh = [h["n_fresh"] for r in runs for h in r["history"][1:] if h.get("n_fresh")]
    return float(np.median(steps) / (np.median(fresh) if fresh else 128.0)) if steps else float("nan")


def summarise(results: list[dict], setup: str, budget: int, rng: np.random.Generator) -> dict:
    target = SETUPS[setup][4]
    by_method: dict[str, list[dict]] = {}
    for r in results:
        if r["setup"] == setup and r["label"] == r["method"]:
            by_method.setdefault(r["method"], []).append(r)
    out: dict[str, dict] = {}
    for method, runs in by_method.items():
        reach = np.array([rollouts_to_target(r["history"], target) for r in runs])
        steps = [x for r in runs for x in [h.get("step_s") for h in r["history"][1:]] if x is not None]
        finals = [success_at(r["history"], budget) for r in runs]
        replay = [h for r in runs for h in r["history"] if "replay_reward_mean" in h]

        def mean_of(key, rows=replay):
            vals = [h[key] for h in rows if h.get(key) is not None and not
                    (isinstance(h[key], float) and math.isnan(h[key]))]
            return float(np.mean(vals)) if vals else float("nan")

        out[method] = {
            "rollouts_to_target": reach.tolist(), "median": float(np.median(reach)),
            "ci": bootstrap_median_ci(reach, rng), "reached": int(np.isfinite(reach).sum()), "seeds": len(runs),
            "success_at": {f: float(np.nanmean([success_at(r["history"], f * budget) for r in runs]))
                           for f in (0.25, 0.5, 1.0)},
            "final_success": finals, "final_mean": float(np.nanmean(finals)),
            "final_ci": bootstrap_median_ci(np.array(finals), rng) if finals else (float("nan"),) * 2,
            "step_s": float(np.median(steps)) if steps else float("nan"),
            "s_per_rollout": seconds_per_rollout(runs),
            "collapses": sum(len(r["collapses"]) for r in runs),
            "replay": {k: mean_of(k) for k in ("replay_reward_mean", "replay_abs_adv", "replay_mean_staleness",
                                               "replay_is_abs_log_ratio", "replay_is_ess", "replay_is_clipped_mass",
                                               "replay_candidate_groups")},
            "rollouts_saved": float(np.mean([r["history"][-1].get("rollouts_saved_total", 0.0) for r in runs])),
            "final_len": float(np.nanmean([next((h["eval_response_len"] for h in reversed(r["history"])
                                                 if "eval_response_len" in h), float("nan")) for r in runs])),
        }
    arrays = {m: np.array(s["rollouts_to_target"]) for m, s in out.items()}
    for method, s in out.items():
        for base in ("grpo", "remix_window", "trl_grpo"):
            if base in arrays and method != base:
                s[f"vs_{base}"] = bootstrap_ratio_ci(arrays[base], arrays[method], rng)
    for base in ("grpo", "trl_grpo"):   # rollouts to the success the baseline reaches at the end of its budget
        if base not in out:
            continue
        final = {r["seed"]: success_at(r["history"], budget) for r in by_method[base]}
        base_reach = np.array([rollouts_to_target(r["history"], 0, final[r["seed"]]) for r in by_method[base]])
        for method, runs in by_method.items():   # per seed: the level the baseline reached from the same start
            reach = np.array([rollouts_to_target(r["history"], 0, final[r["seed"]]) for r in runs
                              if r["seed"] in final])
            seconds = [rollouts_to_target(r["history"], 0, final[r["seed"]], "wall_time") for r in runs
                       if r["seed"] in final]
            out[method][f"to_{base}_level"] = {"level": float(np.mean(list(final.values()))),
                                               "median": float(np.median(reach)),
                                               "seconds_median": float(np.median(seconds)),
                                               "reached": int(np.isfinite(reach).sum()),
                                               "vs_base": bootstrap_ratio_ci(base_reach, reach, rng)}
    return {"target": target, "methods": out}


def table(summary: dict, setup: str, budget: int) -> str:
    s = summary["methods"]
    target = summary["target"]
    lines = [f"**{setup}** (target: held-out success +{target} over the warm start, budget {budget} rollouts)", "",
             ("| method | rollouts to target: median [95% CI] (seeds reaching) | × fewer than GRPO [CI] "
             "| × fewer than the window [CI] | success @25% / 50% / 100% budget | s/step | ms/rollout | collapses |"),
             "|---|---|---|---|---|---|---|---|"]
    for method in METHODS:
        if method not in s:
            continue
        m = s[method]

        def ratio(key, m=m):
            if key not in m:
                return "—"
            base = s[key[3:]]["median"]
            return fmt_ratio(*m[key], budget, base, m["median"])
        sa = m["success_at"]
        lines.append(f"| {method} | {fmt(m['median'])} [{fmt(m['ci'][0])}, {fmt(m['ci'][1])}] "
                     f"({m['reached']}/{m['seeds']}) | {ratio('vs_grpo')} | {ratio('vs_remix_window')} "
                     f"| {sa[0.25]:.3f} / {sa[0.5]:.3f} / {sa[1.0]:.3f} | {m['step_s']:.3f} "
                     f"| {1000 * m['s_per_rollout']:.2f} | {m['collapses']} |")
    for base, name in (("grpo", "on-policy GRPO"), ("trl_grpo", "TRL's GRPOTrainer")):
        key = f"to_{base}_level"
        if base not in s or key not in s[base]:
            continue
        level = s[base][key]["level"]
        lines += ["", (f"To the success {name} reaches at {budget} rollouts from the same warm start "
                       f"(per seed; mean {level:.3f}):"), "",
                  (f"| method | rollouts: median (seeds reaching) | × fewer than {base} [CI] "
                   "| training seconds: median |"), "|---|---|---|---|"]
        base_median = s[base][key]["median"]
        for method in METHODS:
            if method in s and key in s[method]:
                t = s[method][key]
                lines.append(f"| {method} | {fmt(t['median'])} ({t['reached']}/{s[method]['seeds']}) | "
                             f"{fmt_ratio(*t['vs_base'], budget, base_median, t['median'])} "
                             f"| {fmt(t.get('seconds_median', math.nan), 1)} |")
    lines += ["", "What replay served (means over replay draws):", "",
              ("| method | reward of replayed rows | mean abs advantage | staleness | mean abs log ratio π_k/π_b "
              "| token ESS | clipped mass | candidate groups | rollouts saved by dynamic sampling |"),
              "|---|---|---|---|---|---|---|---|---|"]
    for method in METHODS:
        if method in s and method.startswith("remix"):
            r = s[method]["replay"]
            lines.append(f"| {method} | {r['replay_reward_mean']:.3f} | {r['replay_abs_adv']:.3f} "
                         f"| {r['replay_mean_staleness']:.2f} | {r['replay_is_abs_log_ratio']:.4f} "
                         f"| {r['replay_is_ess']:.3f} | {r['replay_is_clipped_mass']:.4f} "
                         f"| {r['replay_candidate_groups']:.1f} | {s[method]['rollouts_saved']:.0f} |")
    return "\n".join(lines)


def plot_curves(results: list[dict], setups: list[str], budget: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(setups), figsize=(6.5 * len(setups), 8), squeeze=False)
    grid = np.linspace(0, budget, 41)
    for col, setup in enumerate(setups):
        for i, method in enumerate(METHODS):
            runs = [r for r in results if r["setup"] == setup and r["label"] == method]
            if not runs:
                continue
            for row, (key, ylabel) in enumerate([("eval_success", "held-out success − warm start"),
                                                 ("eval_response_len", "held-out response length")]):
                curves = []
                for r in runs:
                    pts = [(h["rollouts"], h[key]) for h in r["history"] if key in h]
                    x, y = np.array(pts).T
                    if key == "eval_success":   # gain over the seed's own warm start
                        y = y - y[0]
                    curves.append(np.interp(grid, x, y, right=np.nan))
                c = np.array(curves)
                mean, lo, hi = np.nanmean(c, 0), np.nanpercentile(c, 25, 0), np.nanpercentile(c, 75, 0)
                ax = axes[row, col]
                ax.plot(grid, mean, color=f"C{i}", label=method)
                ax.fill_between(grid, lo, hi, color=f"C{i}", alpha=0.15)
                ax.set_xlabel("rollouts generated")
                ax.set_ylabel(ylabel)
                ax.grid(alpha=0.3)
        axes[0, col].axhline(SETUPS[setup][4], color="grey", ls="--", lw=1)
        axes[0, col].set_title(f"{setup}: mean over seeds, band = 25–75%")
        axes[0, col].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ ablations

#: Ablations on reverse_mixed: which of ReMix's parts cost it against GRPO there (label → overrides
#: of the remix_window method; "grpo_*" of the grpo method: "grpo_ds" is GRPO with dynamic
#: sampling's drop of no-signal groups, "grpo_lr1e-4" / "grpo_lr5e-5" GRPO at a third / a sixth of the
#: learning rate, about where ReMix's adaptive rate settles there).
WHY = {"why_no_ds": {"dynamic_sampling": False}, "why_m1": {"updates_per_batch": 1},
       "why_p0.2": {"replay_fraction": 0.2}, "why_const_lr": {"step_kl_target": None},
       "grpo_ds": {"dynamic_sampling": True}, "grpo_lr1e-4": {"learning_rate": 1e-4},
       "grpo_lr5e-5": {"learning_rate": 5e-5}}


#: The horizon group: label → method, each run with replay_window 16.
HORIZON = {"window_N16": "remix_window", "random_N16": "remix_random", "curated_N16": "remix_curated"}


def versus_grpo_rows(results: list[dict], seeds_of: str, labels: list[str], budget: int,
                     rng: np.random.Generator, replay_columns: bool = False) -> list[str]:
    """Table rows, per setup and label: × fewer rollouts than GRPO to the success GRPO reaches at the end of
    its budget (per seed, over the seeds `seeds_of` ran), end success, ms per generated rollout
    and, with `replay_columns`, what replay served (staleness, mean abs log ratio π_k/π_b)."""
    rows = []
    for setup in SETUPS:
        level = {r["seed"]: success_at(r["history"], budget) for r in results
                 if r["label"] == "grpo" and r["setup"] == setup}
        seeds = sorted(r["seed"] for r in results
                       if r["label"] == seeds_of and r["setup"] == setup and r["seed"] in level)
        if not seeds:
            continue
        by_label = {label: {r["seed"]: r for r in results if r["label"] == label and r["setup"] == setup
                            and r["seed"] in seeds} for label in ("grpo", *labels)}
        reach = {label: np.array([rollouts_to_target(by_seed[seed]["history"], 0, level[seed]) if seed in by_seed
                                  else math.inf for seed in seeds]) for label, by_seed in by_label.items()}
        for label, by_seed in by_label.items():
            if not by_seed:
                continue
            point, lo, hi = bootstrap_ratio_ci(reach["grpo"], reach[label], rng)
            ratio = fmt_ratio(point, lo, hi, budget, float(np.median(reach["grpo"])), float(np.median(reach[label])))
            row = (f"| {setup} | {label} | {ratio} ({int(np.isfinite(reach[label]).sum())}/{len(seeds)}) | "
                   f"{np.mean([success_at(r['history'], budget) for r in by_seed.values()]):.3f} | "
                   f"{1000 * seconds_per_rollout(list(by_seed.values())):.2f} |")
            if replay_columns:
                served = [h for r in by_seed.values() for h in r["history"] if h.get("n_replay")]
                row += f" {_served_mean(served, 'replay_mean_staleness')} | " \
                       f"{_served_mean(served, 'replay_is_abs_log_ratio')} |"
            rows.append(row)
    return rows


def _served_mean(history: list[dict], key: str) -> str:
    """Mean of a per-step replay statistic over the steps that logged it, or — when none did."""
    values = [h[key] for h in history if h.get(key) is not None]
    return f"{np.nanmean(values):.2f}" if values else "—"


def ablation_jobs(args, seeds: list[int]) -> list[dict]:
    groups = set(args.ablation_groups.split(","))
    setups = [s.strip() for s in args.setups.split(",")]
    jobs = []
    for seed in seeds:
        if "why" in groups or "lr" in groups:   # "lr": only GRPO at the lower rates
            for label, ov in WHY.items():
                if "why" not in groups and not label.startswith("grpo_lr"):
                    continue
                method = "grpo" if label.startswith("grpo") else "remix_window"
                jobs.append({"setup": "reverse_mixed", "method": method, "seed": seed, "label": label, "overrides": ov})
        if "whip" not in groups:
            continue
        for p in (0.0, 0.2, 0.4, 0.6, 0.8):   # whipping effect: response length against p
            jobs.append({"setup": "reverse_mixed", "method": "remix_window", "seed": seed, "label": f"whip_p{p}",
                         "overrides": {"replay_fraction": p, "reincarnate_after": None}})
    # passes: one pass of two minibatches against the defaults' two, on every setup and every main seed (the
    # comparison is against the main runs, so it needs their seeds, not the ablation seeds).
    for seed in range(args.seeds) if "passes" in groups else []:
        for setup in setups:
            jobs.append({"setup": setup, "method": "remix_window", "seed": seed, "label": "one_pass",
                         "overrides": {"updates_per_batch": 1}})
    # horizon: the window, the random subset and curated replay over 16 versions instead of 4 (so the choice has
    # 4× as many groups to choose from, older ones), every main seed of every setup, against the main runs.
    for seed in range(args.seeds) if "horizon" in groups else []:
        for setup in setups:
            for label, method in HORIZON.items():
                jobs.append({"setup": setup, "method": method, "seed": seed, "label": label,
                             "overrides": {"replay_window": 16}})
    for seed in seeds if "reinc" in groups else []:
        for label, ov in (("reinc_never", {"reincarnate_after": None}), ("reinc_0.25", {"reincarnate_after": 0.25}),
                          ("reinc_0.5", {"reincarnate_after": 0.5}), ("reinc_T30", {"reincarnate_at": 30})):
            jobs.append({"setup": "reverse", "method": "remix_window", "seed": seed, "label": label, "overrides": ov})
    for seed in seeds if "cap" in groups else []:
        for cap in (1.1, 1.5, 2.0, 5.0, 20.0):   # the correction cap: token ESS against clipped mass
            jobs.append({"setup": "reverse", "method": "remix_window", "seed": seed, "label": f"cap_{cap}",
                         "overrides": {"correction_high": cap, "replay_window": 4, "reincarnate_after": None}})
    return jobs


def ablation_report(results: list[dict], budget: int, out: Path, main_budget: int | None = None) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def runs(label):
        return [r for r in results if r["label"] == label]

    sections: list[str] = []

    def section(title: str, header: str, rows: list[str]) -> None:
        """A titled table, only when its ablation group ran (a header alone says nothing)."""
        if rows:
            columns = header.count("|") - 1
            sections.append("\n".join([title, "", header, "|" + "---|" * columns, *rows]))

    rows, whip = [], []
    for p in (0.0, 0.2, 0.4, 0.6, 0.8):
        rs = runs(f"whip_p{p}")
        if not rs:
            continue
        tr = np.mean([np.mean([h["response_len"] for h in r["history"] if "response_len" in h and
                               h["rollouts"] >= 0.75 * budget] or [np.nan]) for r in rs])
        ev = np.mean([next(h["eval_response_len"] for h in reversed(r["history"]) if "eval_response_len" in h)
                      for r in rs])
        su = np.mean([success_at(r["history"], budget) for r in rs])
        whip.append((p, tr, ev))
        rows.append(f"| {p} | {tr:.2f} | {ev:.2f} | {su:.3f} |")
    section("**Whipping effect** (reverse_mixed, the window (p varied), no reincarnation): response length against p",
            "| p | train response length, last quarter | held-out response length, end | held-out success, end |", rows)
    rows = []
    if any(runs(label) for label in WHY):
        gain = SETUPS["reverse_mixed"][4]
        seeds = {r["seed"] for w in WHY for r in runs(w)}
        for label in ("grpo", *[w for w in WHY if w.startswith("grpo")], "trl_grpo", "remix_paper", "remix_window",
                      "remix_curated", *[w for w in WHY if not w.startswith("grpo")]):
            rs = [r for r in runs(label) if r["setup"] == "reverse_mixed" and r["seed"] in seeds]
            if not rs:
                continue
            reach = np.array([rollouts_to_target(r["history"], gain) for r in rs])
            b = main_budget or budget   # these run at the main budget, beside the main runs
            rows.append(f"| {label} | {fmt(float(np.median(reach)))} ({int(np.isfinite(reach).sum())}/{len(rs)}) "
                        f"| {np.mean([success_at(r['history'], b / 2) for r in rs]):.3f} / "
                        f"{np.mean([success_at(r['history'], b) for r in rs]):.3f} | {sorted(seeds)} |")
    section("**ReMix's parts against GRPO** (reverse_mixed, tiny Llama; why_* vary the window; seeds matched to "
            "the main runs)", "| variant | rollouts to +gain median (seeds reaching) | success @50% / 100% | seeds |",
            rows)
    b = main_budget or budget
    rows = versus_grpo_rows(results, "one_pass", ["trl_grpo", "remix_window", "remix_curated", "one_pass"], b,
                            np.random.default_rng(0)) if runs("one_pass") else []
    section("**One pass against two** (the defaults' 2 passes × 2 minibatches, window or curated, against 1 pass × 2 "
            "minibatches with the window; every main seed; to the success GRPO reaches at the end of its budget, per "
            "seed)",
            "| task | variant | × fewer rollouts than GRPO [CI] (seeds reaching) | success, end | ms per generated rollout |",
            rows)
    rows = versus_grpo_rows(results, "curated_N16", ["remix_window", "remix_random", "remix_curated", *HORIZON], b,
                            np.random.default_rng(0), replay_columns=True) if runs("curated_N16") else []
    section("**Replay horizon** (the window, the random subset and curated replay over the last 16 policy versions "
            "against the defaults' 4: 4× as many groups to choose from; every main seed; to the success GRPO reaches "
            "at the end of its budget, per seed)",
            "| task | variant | × fewer rollouts than GRPO [CI] (seeds reaching) | success, end | ms per generated "
            "rollout | staleness of replayed rows | mean abs log ratio π_k/π_b |", rows)
    rows, gain = [], SETUPS["reverse"][4]
    for label in ("reinc_never", "reinc_0.25", "reinc_0.5", "reinc_T30"):
        rs = runs(label)
        if not rs:
            continue
        reach = np.array([rollouts_to_target(r["history"], gain) for r in rs])
        on = np.mean([np.mean([bool(h.get("replay_on")) for h in r["history"][1:]]) for r in rs])
        rows.append(f"| {label} | {fmt(float(np.median(reach)))} ({int(np.isfinite(reach).sum())}/{len(rs)}) "
                    f"| {np.mean([success_at(r['history'], budget / 2) for r in rs]):.3f} / "
                    f"{np.mean([success_at(r['history'], budget) for r in rs]):.3f} | {on:.2f} |")
    section("**Reincarnation** (reverse, the window)",
            "| when | rollouts to target median (seeds reaching) | success @50% / 100% | replay on for (share of steps) |",
            rows)
    rows, caps = [], []
    for cap in (1.1, 1.5, 2.0, 5.0, 20.0):
        rs = runs(f"cap_{cap}")
        if not rs:
            continue
        hs = [h for r in rs for h in r["history"] if h.get("replay_is_ess") is not None]
        ess_raw = np.nanmean([h["replay_is_ess_raw"] for h in hs]) if hs else np.nan
        ess = np.nanmean([h["replay_is_ess"] for h in hs]) if hs else np.nan
        clipped = np.nanmean([h["replay_is_clipped_mass"] for h in hs]) if hs else np.nan
        su = np.mean([success_at(r["history"], budget) for r in rs])
        caps.append((cap, ess, clipped))
        rows.append(f"| {cap} | {ess_raw:.4f} → {ess:.4f} | {clipped:.4f} | {su:.3f} |")
    section("**Correction cap** (reverse, the window, token TIS at cap C): ESS against clipped mass",
            "| C | token ESS (raw → truncated) | clipped mass | held-out success, end |", rows)
    lines = ["\n\n".join(sections)]
    if not whip and not caps:
        return lines[0]
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    if whip:
        p, tr, ev = np.array(whip).T
        ax[0].plot(p, tr, "o-", label="training (last quarter)")
        ax[0].plot(p, ev, "s-", label="held-out (end)")
        ax[0].set_xlabel("replay fraction p")
        ax[0].set_ylabel("response length (tokens)")
        ax[0].set_title("whipping effect (reverse_mixed)")
        ax[0].legend()
    if caps:
        _c, e, m = np.array(caps).T
        ax[1].plot(m, e, "o-")
        for ci, ei, mi in caps:
            ax[1].annotate(f"C={ci:g}", (mi, ei))
        ax[1].set_xlabel("clipped mass")
        ax[1].set_ylabel("token ESS after truncation")
        ax[1].set_title("correction cap: ESS vs clipped mass")
    for a in ax:
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "sample_efficiency_ablations.png", dpi=100)
    plt.close(fig)
    return "\n".join(lines)


#: More rollouts than any setup generates in one step: a run spent budget B when it stopped in [B, B + this).
MAX_STEP_ROLLOUTS = 1024


def reused_runs(earlier: list[dict], jobs: list[dict], budget: int) -> tuple[list[dict], list[dict]]:
    """(the earlier runs that answer a job, the jobs still to run). A run answers a job of the same
    setup, label and seed that spent the same rollout budget (runs stop at the first step past it)."""
    by_key = {(r["setup"], r["label"], r["seed"]): r for r in earlier}
    reused, todo = [], []
    for job in jobs:
        run = by_key.get((job["setup"], job["label"], job["seed"]))
        want = job.get("overrides", {}).get("rollout_budget", budget)
        spent = max((h.get("rollouts", 0) for h in run["history"]), default=0) if run else -1
        if run is not None and want <= spent < want + MAX_STEP_ROLLOUTS:
            reused.append(run)
        else:
            todo.append(job)
    return reused, todo


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--setups", default="reverse,reverse_mixed", help=f"comma-separated, of {sorted(SETUPS)}")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated, of " + ", ".join(METHODS))
    p.add_argument("--seeds", type=int, default=5, help="seeds 0..S-1")
    p.add_argument("--budget", type=int, default=8000, help="rollouts generated per run")
    p.add_argument("--eval-every", type=int, default=4, help="iterations between held-out evaluations")
    p.add_argument("--eval-size", type=int, default=256, help="held-out prompts")
    p.add_argument("--lr", type=float, default=None, help="learning rate for every method (default: ReMixConfig's)")
    p.add_argument("--curated-window", type=int, default=None,
                   help="N for the curated and random-subset pools (default: ReMixConfig's, as the window's)")
    p.add_argument("--ablations", action="store_true", help="also run the whipping, reincarnation and cap ablations")
    p.add_argument("--ablation-seeds", type=int, default=2)
    p.add_argument("--ablation-groups", default="whip,reinc,cap,why,passes,horizon",
                   help="of whip (response length against p), reinc (reincarnation), cap (correction cap), "
                        "why (ReMix's parts against GRPO on reverse_mixed), lr (only GRPO at lower learning "
                        "rates, on reverse_mixed: for a long run beside --methods grpo,remix_curated,trl_grpo), "
                        "passes (one pass of two minibatches against the defaults' two, every setup and main seed), "
                        "horizon (window, random subset and curated replay over 16 versions instead of 4, every "
                        "setup and main seed)")
    p.add_argument("--skip-main", action="store_true", help="run only the ablations")
    p.add_argument("--ablation-budget", type=int, default=None, help="rollouts per ablation run (default: --budget)")
    p.add_argument("--trl-setups", default="reverse_mixed",
                   help="setups that run trl_grpo (TRL does not pass position ids, so GPT-2's absolute positions "
                        "see left-padded prompts shifted in its training forward: not a fair baseline on 'reverse')")
    p.add_argument("--quick", action="store_true", help="2 seeds, 2000 rollouts, eval 64: a few minutes")
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel (each --threads torch threads)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per run")
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    earlier = p.add_mutually_exclusive_group()
    earlier.add_argument("--reuse-runs", type=Path, default=None,
                   help="a <stem>_runs.json of an earlier invocation with the same settings: its runs of the same "
                        "(setup, method or ablation, seed, budget) are taken from it, only the missing ones run "
                        "(e.g. --seeds 10 after --seeds 5 runs seeds 5-9); the runs file written holds both")
    earlier.add_argument("--from-runs", type=Path, default=None,
                   help="summarise the raw runs a previous invocation saved (<stem>_runs.json) instead of running")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.budget, args.eval_size, args.ablation_seeds = 2, 2000, 64, 1
    setups = [s.strip() for s in args.setups.split(",")]
    methods = [m.strip() for m in args.methods.split(",")]
    if "trl_grpo" in methods:
        from bench.trl_baseline import trl_available
        if not trl_available():
            print("trl is not installed: skipping trl_grpo (pip install trl==1.16.0 torch==2.13.0)")
            methods.remove("trl_grpo")
    bad = set(setups) - set(SETUPS) | set(methods) - set(METHODS)
    if bad:
        p.error(f"unknown setup(s)/method(s) {sorted(bad)}")
    shared = {k: v for k, v in vars(args).items() if k != "out"}
    trl_setups = {s.strip() for s in args.trl_setups.split(",")}
    jobs = [{"setup": s, "method": m, "seed": seed, "label": m} for seed in range(args.seeds) for s in setups
            for m in methods if m != "trl_grpo" or s in trl_setups] if not args.skip_main else []
    if args.ablations:
        extra = ablation_jobs(args, list(range(args.ablation_seeds)))
        for j in extra:
            j["overrides"] = {**j["overrides"], "rollout_budget": args.ablation_budget or args.budget}
        jobs += extra
    cache = Path(tempfile.gettempdir()) / "sponge_bench_warm_start"
    cache.mkdir(parents=True, exist_ok=True)
    for j in jobs:
        j.update(args=shared, threads=args.threads, cache=str(cache))
    print(f"{len(jobs)} runs, {args.jobs} at a time: setups {setups}, methods {methods}, seeds {args.seeds}, "
          f"budget {args.budget}", flush=True)
    results = []
    t0 = time.perf_counter()
    if args.reuse_runs is not None:
        results, jobs = reused_runs(json.loads(args.reuse_runs.read_text()), jobs, args.budget)
        print(f"{len(results)} runs reused from {args.reuse_runs}, {len(jobs)} to run", flush=True)
    if args.from_runs is not None:
        results, jobs = json.loads(args.from_runs.read_text()), []
    n_reused = len(results) if args.reuse_runs is not None else 0
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for res in pool.map(run_one, jobs):
            results.append(res)
            last = [h for h in res["history"] if "eval_success" in h][-1]
            print(f"  [{time.perf_counter() - t0:6.0f}s] {res['setup']:13s} {res['label']:14s} seed {res['seed']} "
                  f"success {res['history'][0]['eval_success']:.3f} → {last['eval_success']:.3f} "
                  f"collapses {len(res['collapses'])} wall {res['wall_s']:.0f}s", flush=True)

    rng = np.random.default_rng(0)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "sample_efficiency_quick" if args.quick else "sample_efficiency"
    if args.from_runs is None:   # the raw runs, before any summary
        (args.out / f"{stem}_runs.json").write_text(json.dumps(results, default=str))
    summaries = {s: summarise(results, s, args.budget, rng) for s in setups}
    command = "python bench/sample_efficiency.py " + " ".join(sys.argv[1:] if argv is None else argv)
    ran = f"{len(results) - n_reused} run here and {n_reused} reused" if n_reused else f"{len(results)} runs"
    text = [f"`{command}` ({args.seeds} seeds, {ran}, {time.perf_counter() - t0:.0f} s)", ""]
    for s in setups:
        text += [table(summaries[s], s, args.budget), ""]
    if args.ablations:
        text += [ablation_report(results, args.ablation_budget or args.budget, args.out, args.budget), ""]
    report = "\n".join(text)
    print("\n" + report)
    plot_curves(results, setups, args.budget, args.out / f"{stem}.png")
    (args.out / f"{stem}.md").write_text(report + "\n")
    (args.out / f"{stem}.json").write_text(json.dumps({"command": command, "summaries": summaries}, default=str))
    print(f"\nwrote {args.out / (stem + '.md')}, {stem}.png, {stem}.json", flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
