"""The GPU path, run for real in one go (a few minutes on one GPU): the ReMix trainer on CUDA with
vLLM generation, vLLM's behaviour log-probs against the trainer's, speed against the CPU path, and
the selector's faiss index on the GPU against the CPU one. Figures go to a JSON file with the
device named; the exit status says whether every check passed.

Checks (each "pass", "fail" or "skipped" with its reason, and its figures):
  train          the tiny model (GPT-2, 2 layers × 64, warm-started) trains --steps ReMix iterations
                 on the device (its TransformersGenerator drawing on the device); held-out greedy
                 success must rise by at least --min-rise
  train_vllm     the same with vLLM generation (weights synced into the engine at every generation)
  logprobs       the device generator's behaviour log-probs against the trainer's recomputed ones for
                 the same tokens, float32 and under bf16 autocast: mean, p99 and max |Δ| per token,
                 each under a tolerance for its precision
  logprobs_vllm  the same for vLLM (at its dtype; T = 1, 0.7 and greedy), after training
  speed          generation tokens/s and trainer steps/s on the device against the CPU path (same
                 model, prompts, config and seeds; runs alternated, medians, ratios), and host
                 synchronisations per generate call on the device
  speed_vllm     vLLM's tokens/s against both, and its seconds per weight sync
  faiss          FacilityLocation's neighbour search with the GPU index against the CPU index on the
                 same vectors: max |Δ similarity|, share of rows with the same neighbours, speed ratio

Exit status: 0 every check passed; 1 a check failed; 2 none failed but a required one was skipped
(vLLM or faiss-GPU missing; --allow-skip names those that may be).

    python bench/gpu_check.py                                   # on a GPU machine with .[vllm,faiss-gpu]
    python bench/gpu_check.py --cpu-dry-run                     # every code path a CPU can run (~1 min)
    python bench/gpu_check.py --allow-skip vllm,faiss            # a GPU without vLLM / faiss-GPU

Nothing is installed or downloaded at run time: the model is built in code and written to a
temporary directory for vLLM.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sponge.trainer import (
    CharTokenizer,
    ReMixConfig,
    ReMixTrainer,
    TinyModelConfig,
    TransformersGenerator,
    build_tiny_model,
    make_task,
    response_logprobs,
    warm_start,
)

#: mean |Δ log-prob| per token allowed between a generator and the trainer, by the generator's precision
TOLERANCE = {"float32": 1e-3, "bfloat16": 5e-2, "float16": 5e-2}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--cpu-dry-run", action="store_true",
                   help="run every check a CPU can (the 'device' is the CPU; vLLM and faiss-GPU skipped)")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON file (default bench/results/gpu_check.json; a dry run: <tmp>/gpu_check_cpu_dry_run.json)")
    p.add_argument("--steps", type=int, default=None, help="training iterations (default 200; dry run 40)")
    p.add_argument("--min-rise", type=float, default=0.1, help="held-out success must rise at least this much")
    p.add_argument("--vllm-dtype", default="float32", help="vLLM's dtype (bfloat16 is tried if this one fails)")
    p.add_argument("--vllm-eager", action=argparse.BooleanOptionalAction, default=True,
                   help="enforce_eager: skip torch.compile and CUDA graphs (engine starts in seconds)")
    p.add_argument("--allow-skip", default="", help="comma list of checks that may be skipped: vllm,faiss")
    p.add_argument("--only", default="", help="comma list of checks to run (default: all)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    dry = args.cpu_dry_run
    if not dry and not torch.cuda.is_available():
        print("gpu_check: torch sees no CUDA device; use --cpu-dry-run on a machine without one", file=sys.stderr)
        return 2
    device = torch.device("cpu") if dry else torch.device("cuda")
    out = args.out or (Path(tempfile.gettempdir()) / "gpu_check_cpu_dry_run.json" if dry
                       else Path("bench/results/gpu_check.json"))
    steps = args.steps if args.steps is not None else (40 if dry else 200)
    allowed = {"vllm", "faiss"} if dry else {s for s in args.allow_skip.split(",") if s}
    torch.set_num_threads(os.cpu_count() or 1)
    started = time.perf_counter()

    report: dict = {"device": "cpu (dry run)" if dry else torch.cuda.get_device_name(0), "dry_run": dry,
                    "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                    "env": environment(), "args": {k: str(v) for k, v in vars(args).items()}, "checks": {}}
    print(f"gpu_check on {report['device']}: {json.dumps(report['env'])}", flush=True)

    ctx = Context(device=device, dry=dry, seed=args.seed, vllm_dtype=args.vllm_dtype, vllm_eager=args.vllm_eager,
                  workdir=Path(tempfile.mkdtemp(prefix="sponge-gpu-check-")))
    checks = [("train", lambda: check_train(ctx, steps, args.min_rise)),
              ("train_vllm", lambda: check_train_vllm(ctx, steps, args.min_rise)),
              ("logprobs", lambda: check_logprobs(ctx)),
              ("logprobs_vllm", lambda: check_logprobs_vllm(ctx)),
              ("speed", lambda: check_speed(ctx)),
              ("speed_vllm", lambda: check_speed_vllm(ctx)),
              ("faiss", lambda: check_faiss(ctx))]
    only = {c for c in args.only.split(",") if c}
    for name, run in checks:
        if only and name not in only:
            continue
        t0 = time.perf_counter()
        try:
            result = run()
        except Exception as exc:  # noqa: BLE001 - one broken check must not hide the others' figures
            result = {"status": "fail", "error": f"{type(exc).__name__}: {exc}",
                      "traceback": traceback.format_exc()[-3000:]}
        result["seconds"] = round(time.perf_counter() - t0, 2)
        report["checks"][name] = result
        print(f"[{result['status']}] {name} ({result['seconds']} s): "
              f"{json.dumps({k: v for k, v in result.items() if k not in ('traceback',)}, default=str)}",
              flush=True)
        _write(out, report)   # after every check: a run cut short still leaves its figures

    statuses = {n: c["status"] for n, c in report["checks"].items()}
    skipped_required = [n for n, c in report["checks"].items()
                        if c["status"] == "skipped" and not (set(c.get("needs", [])) <= allowed)]
    failed = [n for n, s in statuses.items() if s == "fail"]
    report.update({"wall_s": round(time.perf_counter() - started, 1), "failed": failed,
                   "skipped_required": skipped_required, "ok": not failed and not skipped_required})
    _write(out, report)
    print(f"gpu_check: {'OK' if report['ok'] else 'NOT OK'} in {report['wall_s']} s; failed {failed or 'none'}, "
          f"skipped though required {skipped_required or 'none'}; figures in {out}", flush=True)
    return 1 if failed else (2 if skipped_required else 0)


# ----------------------------------------------------------------------------------------------
# Shared state


class Context:
    """What the checks share: the device, the task, the warm-started tiny model, the vLLM engine."""

    def __init__(self, device: torch.device, dry: bool, seed: int, vllm_dtype: str, vllm_eager: bool,
                 workdir: Path):
        self.device, self.dry, self.seed, self.workdir = device, dry, seed, workdir
        self.vllm_dtype, self.vllm_eager = vllm_dtype, vllm_eager
        self.task = make_task("reverse")
        self.tok = CharTokenizer(self.task.alphabet)
        # The README's training setup (tiny GPT-2, 50 warm-start steps), with 2 heads of 32: vLLM's
        # float32 attention (Triton) takes heads of 32 and more.
        self.shape = TinyModelConfig(arch="gpt2", n_layer=2, n_embd=64, n_head=2, n_positions=32)
        model = build_tiny_model(self.tok, self.shape, seed=seed).to(device)
        warm_start(model, self.tok, self.task, steps=50, seed=seed)
        self.warm = model.cpu()
        self.vllm = None
        self.vllm_error: str | None = None
        self.vllm_info: dict = {}

    def model(self, device: torch.device | None = None):
        return copy.deepcopy(self.warm).to(device or self.device)

    def config(self, **kw) -> ReMixConfig:
        base = {"prompts_per_step": 16, "group_size": 8, "max_new_tokens": self.task.max_answer_len + 1,
                "eval_size": 256, "eval_every": 10_000, "rollout_budget": 10**9, "progress": False,
                "seed": self.seed, "device": str(self.device)}
        return ReMixConfig(**{**base, **kw})

    def prompts(self, n: int, seed: int = 123) -> list[list[int]]:
        prompts, _ = self.task.sample(np.random.default_rng(seed), n)
        return [self.tok.encode_prompt(q) for q in prompts]

    def vllm_generator(self):
        """The vLLM engine on the warm model (started once); None with the reason kept when vLLM
        cannot run here."""
        if self.vllm is not None or self.vllm_error is not None:
            return self.vllm
        if self.dry:
            self.vllm_error = "dry run on the CPU: vLLM needs a CUDA GPU"
            return None
        try:
            import vllm
        except ImportError as exc:
            self.vllm_error = f"vLLM is not installed ({exc}); pip install '.[vllm]'"
            return None
        from sponge.trainer.generators import VLLMConfig, VLLMGenerator

        errors = []
        for dtype in dict.fromkeys([self.vllm_dtype, "bfloat16"]):
            t0 = time.perf_counter()
            try:
                self.vllm = VLLMGenerator.from_model(
                    self.warm, self.tok, self.workdir / "policy",
                    VLLMConfig(dtype=dtype, enforce_eager=self.vllm_eager, max_model_len=self.shape.n_positions,
                               gpu_memory_utilization=0.25, seed=self.seed))
                self.vllm_info = {"vllm_version": vllm.__version__, "dtype": dtype, "enforce_eager": self.vllm_eager,
                                  "engine_start_s": round(time.perf_counter() - t0, 1), "start_errors": errors}
                return self.vllm
            except Exception as exc:  # noqa: BLE001 - any engine start failure: try the next dtype
                errors.append(f"dtype {dtype}: {type(exc).__name__}: {exc}"[:2000])
        self.vllm_error = "; ".join(errors)
        return None


# ----------------------------------------------------------------------------------------------
# Checks


def train_run(ctx: Context, steps: int, min_rise: float, gen) -> dict:
    """Train a fresh copy of the warm model for `steps` iterations with `gen` (None: the
    trainer's own TransformersGenerator on the device); held-out greedy success must rise."""
    cfg = ctx.config(max_iterations=steps, eval_every=max(steps // 4, 1))
    trainer = ReMixTrainer(ctx.model(), ctx.tok, ctx.task, cfg, generator=gen)
    history = trainer.train()
    evals = [(r["iteration"], round(r["eval_success"], 4)) for r in history if "eval_success" in r]
    rise = evals[-1][1] - evals[0][1]
    result = {"steps": steps, "device": str(trainer.device), "eval_success": evals, "rise": round(rise, 4),
              "min_rise": min_rise, "rollouts": trainer.rollouts_generated,
              "train_wall_s": round(trainer.wall_time, 1),
              "median_step_s": round(statistics.median(r["step_s"] for r in history if "step_s" in r), 4),
              "median_generate_s": round(statistics.median(r["generate_s"] for r in history if "generate_s" in r), 4),
              "collapses": len(trainer.collapses), "recompute_logprobs": trainer.recompute,
              "status": "pass" if rise >= min_rise else "fail"}
    return result, trainer.policy


def check_train(ctx: Context, steps: int, min_rise: float) -> dict:
    result, ctx.trained = train_run(ctx, steps, min_rise, None)
    result["generator"] = "transformers on the device"
    return result


def check_train_vllm(ctx: Context, steps: int, min_rise: float) -> dict:
    gen = ctx.vllm_generator()
    if gen is None:
        return {"status": "skipped", "needs": ["vllm"], "reason": ctx.vllm_error}
    result, _ = train_run(ctx, steps, min_rise, gen)
    result.update({"generator": "vllm", **ctx.vllm_info, "syncs": len(gen.sync_seconds),
                   "unsynced_parameters": gen.unsynced})
    if gen.unsynced:
        result["status"] = "fail"
    return result


def logprob_gap(model, tok, gen, prompts, temperature: float, bf16_scoring: bool = False) -> dict:
    """Mean and max |generator log-prob − trainer log-prob| per response token."""
    out = gen.generate(model, prompts, 9, temperature, seed=7)
    device = next(model.parameters()).device
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16_scoring):
        scores = response_logprobs(model, out.prompt_tokens, out.response_tokens, tok.pad_token_id, temperature)
    trainer_lp = scores.logprobs.float().cpu().numpy()
    diffs = np.concatenate([np.abs(lp - trainer_lp[i, :len(lp)]) for i, lp in enumerate(out.logprobs)])
    return {"tokens": int(diffs.size), "mean_abs_delta": float(diffs.mean()), "max_abs_delta": float(diffs.max()),
            "p99_abs_delta": float(np.quantile(diffs, 0.99))}


def trained_model(ctx: Context):
    model = getattr(ctx, "trained", None)
    model = model if model is not None else ctx.model()
    return model.eval()


def check_logprobs(ctx: Context) -> dict:
    model, prompts = trained_model(ctx), ctx.prompts(512)
    rows = {}
    for name, gen, bf16, dtype in [("transformers_float32", TransformersGenerator(ctx.tok), False, "float32"),
                                   ("transformers_bf16_autocast", TransformersGenerator(ctx.tok, bf16=True), True,
                                    "bfloat16")]:
        row = logprob_gap(model, ctx.tok, gen, prompts, 1.0, bf16_scoring=bf16)
        row.update({"tolerance": TOLERANCE[dtype], "pass": row["mean_abs_delta"] <= TOLERANCE[dtype]})
        rows[name] = row
    return {"generators": rows, "device": str(ctx.device),
            "status": "pass" if all(r["pass"] for r in rows.values()) else "fail"}


def check_logprobs_vllm(ctx: Context) -> dict:
    gen = ctx.vllm_generator()
    if gen is None:
        return {"status": "skipped", "needs": ["vllm"], "reason": ctx.vllm_error}
    model, prompts = trained_model(ctx), ctx.prompts(512)
    dtype = ctx.vllm_info["dtype"]
    rows = {}
    for temperature in (1.0, 0.7, 0.0):   # 0: greedy, log-probs at temperature 1
        row = logprob_gap(model, ctx.tok, gen, prompts, temperature if temperature > 0 else 1.0) \
            if temperature > 0 else _greedy_gap(model, ctx.tok, gen, prompts)
        row.update({"tolerance": TOLERANCE.get(dtype, 5e-2)})
        row["pass"] = row["mean_abs_delta"] <= row["tolerance"]
        rows[f"T{temperature}"] = row
    return {"dtype": dtype, "rows": rows, "unsynced_parameters": gen.unsynced,
            "status": "pass" if all(r["pass"] for r in rows.values()) and not gen.unsynced else "fail"}


def _greedy_gap(model, tok, gen, prompts) -> dict:
    out = gen.generate(model, prompts, 9, 0.0, seed=7)
    with torch.no_grad():
        scores = response_logprobs(model, out.prompt_tokens, out.response_tokens, tok.pad_token_id, 1.0)
    trainer_lp = scores.logprobs.float().cpu().numpy()
    diffs = np.concatenate([np.abs(lp - trainer_lp[i, :len(lp)]) for i, lp in enumerate(out.logprobs)])
    reference = TransformersGenerator(tok).generate(model, prompts, 9, 0.0)
    same = np.mean([a == b for a, b in zip(out.response_tokens, reference.response_tokens)])
    return {"tokens": int(diffs.size), "mean_abs_delta": float(diffs.mean()), "max_abs_delta": float(diffs.max()),
            "p99_abs_delta": float(np.quantile(diffs, 0.99)), "same_greedy_response_share": float(same)}


def count_syncs(fn) -> tuple[object, int]:
    """Run fn with CUDA's sync debug mode on; returns (its result, how many host synchronisations it made)."""
    if not torch.cuda.is_available():
        return fn(), -1
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            value = fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return value, sum("synchroniz" in str(w.message) for w in caught)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def generation_speed(ctx: Context, runs: dict, prompts, rounds: int) -> dict:
    """Generated tokens/s of each (generator, model) in `runs`, rounds alternated, medians."""
    n_tokens = ctx.task.max_answer_len + 1
    tokens, secs = {k: [] for k in runs}, {k: [] for k in runs}
    for gen, model in runs.values():   # warm-up (allocations, kernels, the engine's first batch)
        gen.generate(model, prompts[:32], n_tokens, 1.0, seed=0)
    for _ in range(rounds):
        for key, (gen, model) in runs.items():
            t0 = time.perf_counter()
            out = gen.generate(model, prompts, n_tokens, 1.0, seed=1)   # ends with a copy to the host
            secs[key].append(time.perf_counter() - t0)
            tokens[key].append(sum(len(r) for r in out.response_tokens))
    return {k: statistics.median(t / s for t, s in zip(tokens[k], secs[k])) for k in runs}


def check_speed(ctx: Context, rounds: int = 3) -> dict:
    cpu = torch.device("cpu")
    prompts = ctx.prompts(512, seed=5)
    dev_model, cpu_model = ctx.model(), ctx.model(cpu)
    tps = generation_speed(ctx, {"device": (TransformersGenerator(ctx.tok), dev_model),
                                 "cpu": (TransformersGenerator(ctx.tok), cpu_model)}, prompts, rounds)
    generation = {"device_tokens_per_s": round(tps["device"], 1), "cpu_tokens_per_s": round(tps["cpu"], 1),
                  "device_over_cpu": round(tps["device"] / tps["cpu"], 2), "prompts": len(prompts),
                  "max_new_tokens": ctx.task.max_answer_len + 1, "rounds": rounds,
                  "cpu_threads": torch.get_num_threads()}
    if ctx.device.type == "cuda":
        # Host waits per generate call, every row run to n tokens (the same forward passes at T = 1
        # and greedy): drawing should add none to greedy's, and 16 tokens against 8 shows what the
        # model's own forward costs per token.
        for n in (8, 16):
            for temperature in (1.0, 0.0):
                _, syncs = count_syncs(lambda n=n, t=temperature: TransformersGenerator(
                    ctx.tok, stop_check_every=n).generate(dev_model, prompts, n, t, seed=2))
                generation[f"host_syncs_{n}_tokens_T{temperature:g}"] = syncs

    # trainer steps/s: the same config and seed on the device and on the CPU, blocks alternated
    trainers = {k: ReMixTrainer(ctx.model(cpu), ctx.tok, ctx.task,
                                ctx.config(device=str(ctx.device if k == "device" else cpu), eval_size=8))
                for k in ("device", "cpu")}
    step_s = {k: [] for k in trainers}
    for t in trainers.values():   # warm-up
        t.step()
    for _ in range(rounds):
        for k, t in trainers.items():
            for _ in range(3):
                step_s[k].append(timed(t.step))
    med = {k: statistics.median(v) for k, v in step_s.items()}
    training = {"device_steps_per_s": round(1 / med["device"], 2), "cpu_steps_per_s": round(1 / med["cpu"], 2),
                "device_over_cpu": round(med["cpu"] / med["device"], 2), "steps_timed_each": len(step_s["device"]),
                "rollouts_per_step": ctx.config().prompts_per_step * ctx.config().group_size}
    result = {"generation": generation, "training": training}
    # Measured is passed: a tiny model on a GPU is launch-bound, and a ratio below 1 is a finding.
    result["status"] = "pass"
    if ctx.dry:
        result["note"] = "dry run: 'device' is the CPU, so the ratios are ~1 by construction"
    elif min(training["device_over_cpu"], generation["device_over_cpu"]) < 1:
        result["note"] = "the device is slower than the CPU here: the tiny model leaves the GPU launch-bound"
    return result


def check_speed_vllm(ctx: Context, rounds: int = 3) -> dict:
    gen = ctx.vllm_generator()
    if gen is None:
        return {"status": "skipped", "needs": ["vllm"], "reason": ctx.vllm_error}
    cpu = torch.device("cpu")
    prompts = ctx.prompts(512, seed=5)
    dev_model = ctx.model()
    tps = generation_speed(ctx, {"vllm": (gen, dev_model), "transformers_device": (TransformersGenerator(ctx.tok),
                                                                                   dev_model),
                                 "cpu": (TransformersGenerator(ctx.tok), ctx.model(cpu))}, prompts, rounds)
    syncs = []
    for _ in range(20):
        syncs.append(gen.sync_weights(dev_model))
    result = {"vllm_tokens_per_s": round(tps["vllm"], 1), "transformers_device_tokens_per_s":
              round(tps["transformers_device"], 1), "cpu_tokens_per_s": round(tps["cpu"], 1),
              "vllm_over_cpu": round(tps["vllm"] / tps["cpu"], 2),
              "vllm_over_transformers_device": round(tps["vllm"] / tps["transformers_device"], 2),
              "sync_method": "in-process LLM.apply_model + model.load_weights (device-to-device copy)",
              "sync_s_median": round(statistics.median(syncs), 6), "sync_s_max": round(max(syncs), 6),
              "synced_bytes": int(sum(t.numel() * t.element_size() for t in dev_model.state_dict().values())),
              "prompts": len(prompts), "rounds": rounds, **ctx.vllm_info}
    result["status"] = "pass"
    return result


def check_faiss(ctx: Context, rounds: int = 3) -> dict:
    try:
        import faiss
    except ImportError as exc:
        return {"status": "skipped", "needs": ["faiss"], "reason": f"faiss is not installed ({exc})"}
    from sponge.selectors.objectives import FacilityLocation

    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    has_gpu = gpus > 0 and hasattr(faiss, "StandardGpuResources")
    result: dict = {"faiss_version": getattr(faiss, "__version__", "?"), "faiss_gpus": gpus}
    rng = np.random.default_rng(ctx.seed)
    refs = rng.standard_normal((4096, 384)).astype(np.float32)
    data = rng.standard_normal((20_000, 384)).astype(np.float32)
    cpu_obj = FacilityLocation(refs, m=16, use_gpu=False)
    other = FacilityLocation(refs, m=16, use_gpu=has_gpu)
    result["compared"] = "gpu vs cpu" if other.on_gpu else "cpu vs cpu (no faiss GPU: the comparison code only)"
    a, b = cpu_obj.profile(data), other.profile(data)
    same_rows = np.mean([set(x) == set(y) for x, y in zip(a.clients.tolist(), b.clients.tolist())])
    # where the neighbour sets differ, it must be a tie at the m-th place within float rounding
    max_dw = float(np.abs(np.sort(a.weights, 1) - np.sort(b.weights, 1)).max())
    t = {"cpu": [], "other": []}
    for _ in range(rounds):
        t["cpu"].append(timed(lambda: cpu_obj.profile(data)))
        t["other"].append(timed(lambda: other.profile(data)))
    result.update({"rows": len(data), "references": len(refs), "m": 16, "same_neighbours_share": float(same_rows),
                   "max_abs_delta_similarity": max_dw, "cpu_s": round(statistics.median(t["cpu"]), 4),
                   "other_s": round(statistics.median(t["other"]), 4),
                   "speedup": round(statistics.median(t["cpu"]) / statistics.median(t["other"]), 2)})
    ok = same_rows >= 0.99 and max_dw <= 1e-4
    result["status"] = "pass" if ok else "fail"
    if ok and not other.on_gpu:
        result.update({"status": "skipped", "needs": ["faiss"],
                       "reason": "faiss reports no GPU (faiss-cpu installed; the faiss-gpu-cu12 extra is needed)"})
    return result


# ----------------------------------------------------------------------------------------------


def environment() -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__,
           "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(), "cpu_count": os.cpu_count()}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    for name in ("transformers", "vllm", "faiss"):
        with contextlib.suppress(Exception):
            env[name] = __import__(name).__version__
        env.setdefault(name, None)
    return env


def _write(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str))
    tmp.replace(path)


if __name__ == "__main__":
    sys.exit(main())
