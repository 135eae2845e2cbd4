"""TRL's GRPOTrainer on sponge's replay loop, end to end on a CPU in a few minutes.

A tiny Llama (built from a config, nothing downloaded) learns to reverse digit strings with TRL's
GRPOTrainer. Every group it generates goes to `sponge serve` through Kafka; every batch mixes in
curated groups the service offers back, corrected by truncated density ratios (Mix-PPG clip centred
at π_k/π_behaviour). Needs the `trl` extra (pip install 'sponge[trl]').

    python examples/trl_replay.py                       # starts `sponge broker` and `sponge serve` itself
    python examples/trl_replay.py --url http://127.0.0.1:8765 --bootstrap-servers 127.0.0.1:9092
    python examples/trl_replay.py --model ./my-llama     # any local Hugging Face causal LM instead of the tiny one

It prints TRL's log line per step with the replay columns, then what reached the service.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def start(cmd: list[str], log: Path, ready: callable, what: str, timeout_s: float = 300) -> subprocess.Popen:
    """Run `cmd` with its output in `log`; wait until `ready(log text)` returns a value."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=out, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    deadline = time.monotonic() + timeout_s
    while (value := ready(log.read_text(errors="replace"))) is None:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{what} did not start; its log:\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.2)
    proc.value = value
    return proc


def broker_address(text: str) -> str | None:
    first = text.splitlines()[0] if text.strip() else ""
    return first.strip() if ":" in first and " " not in first.strip() else None


def service_url(text: str) -> str | None:
    for line in text.splitlines():
        if '"event": "http"' in line:
            return json.loads(line)["url"]
    return None


def wait_ready(url: str, timeout_s: float = 300) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                return
        time.sleep(0.5)
    raise SystemExit(f"the service at {url} was not ready after {timeout_s:.0f}s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running sponge serve (default: start one, and a broker)")
    parser.add_argument("--bootstrap-servers", help="the Kafka that service reads (with --url)")
    parser.add_argument("--topic", default="rollouts")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps")
    parser.add_argument("--batch", type=int, default=64, help="rollouts generated per step (8 per prompt)")
    parser.add_argument("--replay-fraction", type=float, default=0.4, help="p: share of replayed rows (ReMix 0.4)")
    parser.add_argument("--updates-per-batch", type=int, default=1,
                        help="TRL's num_iterations (ReMix's m): optimizer steps per generated batch")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--model", default=None,
                        help="local Hugging Face causal LM directory (default: a tiny Llama built in code)")
    parser.add_argument("--warm-start-steps", type=int, default=None,
                        help="supervised warm-start steps (default: 60 for the tiny model, 0 with --model)")
    parser.add_argument("--run-id", default=f"trl-example-{int(time.time())}")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: tiny models are fastest on one, and the service needs a core)")
    args = parser.parse_args()
    if args.url and not args.bootstrap_servers:
        parser.error("--url needs --bootstrap-servers")
    torch.set_num_threads(args.threads)

    work = Path(tempfile.mkdtemp(prefix="sponge-trl-"))
    procs: list[subprocess.Popen] = []
    try:
        url, bootstrap = args.url, args.bootstrap_servers
        if url is None:
            sponge = [sys.executable, "-m", "sponge.cli"]
            print(f"starting: sponge broker --port 0 --topic {args.topic}")
            broker = start([*sponge, "broker", "--port", "0", "--topic", args.topic], work / "broker.log",
                           broker_address, "sponge broker")
            procs.append(broker)
            bootstrap = broker.value
            print(f"starting: sponge serve --bootstrap-servers {bootstrap} --topic {args.topic} "
                  f"--store {work / 'store'} --http-port 0")
            serve = start([*sponge, "serve", "--bootstrap-servers", bootstrap, "--topic", args.topic,
                           "--store", str(work / "store"), "--http-port", "0", "--no-create-topics"],
                          work / "serve.log", service_url, "sponge serve")
            procs.append(serve)
            url = serve.value
        wait_ready(url)
        print(f"service {url}, broker {bootstrap}, logs in {work}")
        train(url, bootstrap, args, work)
    finally:
        for proc in reversed(procs):
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()


def load_policy(model_path: str | None, task):
    """(model, sponge tokenizer, Hugging Face tokenizer): a local causal LM directory when given,
    else the tiny Llama built in code for the task's alphabet (nothing is downloaded either way)."""
    from sponge.trainer import (
        CharTokenizer,
        TinyModelConfig,
        build_tiny_model,
        load_pretrained,
    )

    if model_path:
        model, tokenizer = load_pretrained(model_path)
        return model, tokenizer, tokenizer.hf
    chars = CharTokenizer(task.alphabet)
    model = build_tiny_model(chars, TinyModelConfig(arch="llama", n_embd=64, n_layer=2, n_positions=64), seed=0)
    return model, chars, chars.to_hf()


def train(url: str, bootstrap: str, args: argparse.Namespace, work: Path) -> None:
    from datasets import Dataset
    from trl import GRPOConfig

    from sponge.client import ServiceClient, ServiceReplaySource
    from sponge.integrations.trl import SpongeGRPOTrainer, SpongeReplayConfig
    from sponge.trainer import TransformersGenerator, make_task, warm_start

    task = make_task("reverse", partial_credit=0.5)
    model, tok, hf_tokenizer = load_policy(args.model, task)
    steps = args.warm_start_steps if args.warm_start_steps is not None else (0 if args.model else 60)
    if steps > 0:
        warm_start(model, tok, task, steps=steps, seed=0)
    prompts, _ = task.sample(np.random.default_rng(0), 20_000)

    def reward(prompts, completions, **_):
        return task.reward(prompts, completions).tolist()

    held_out, _ = task.eval_set(256)

    def evaluate() -> float:
        """Greedy held-out reward (exact answer 1, else half the share of positions right)."""
        was_training = model.training
        model.eval()
        gen = TransformersGenerator(tok).generate(model, [tok.encode_prompt(p) for p in held_out], 8, 0.0, seed=0)
        model.train(was_training)
        return float(task.reward(held_out, gen.responses).mean())

    source = ServiceReplaySource(url, bootstrap_servers=bootstrap, topic=args.topic, window=2, wait_s=60)
    trainer = SpongeGRPOTrainer(
        model=model, reward_funcs=reward, train_dataset=Dataset.from_dict({"prompt": prompts}),
        processing_class=hf_tokenizer, replay=source,
        args=GRPOConfig(output_dir=str(work / "trl"), per_device_train_batch_size=args.batch, num_generations=8,
                        max_completion_length=8, max_steps=args.steps, learning_rate=args.lr, logging_steps=1,
                        lr_scheduler_type="constant",
                        num_iterations=args.updates_per_batch,
                        report_to="none", use_cpu=True, save_strategy="no", activation_checkpointing=False,
                        disable_dropout=True, disable_tqdm=True, bf16=False, seed=0),
        sponge_config=SpongeReplayConfig(run_id=args.run_id, replay_fraction=args.replay_fraction))
    success_before = evaluate()
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    success_after = evaluate()

    # Steps that generated (every `updates_per_batch`-th) carry the reward and the replay draw.
    logged = [h for h in trainer.state.log_history if "reward" in h]
    print(f"\n{'step':>4} {'reward':>7} {'fresh no-signal':>15} {'replayed':>8} {'filled':>6} {'ESS':>5} "
          f"{'clipped':>7} {'stale':>5} {'clip c±ε':>8}")
    for h in logged:
        print(f"{h['step']:>4} {h['reward']:>7.3f} {h.get('sponge/no_signal_rows', 0):>15.0f} "
              f"{h.get('sponge/replay_rows', 0):>8.0f} {h.get('sponge/filled_no_signal_rows', 0):>6.0f} "
              f"{h.get('sponge/ess_truncated', float('nan')):>5.2f} {h.get('sponge/clipped_mass', float('nan')):>7.3f} "
              f"{h.get('sponge/mean_staleness', float('nan')):>5.2f} {h.get('sponge/replay_clip_ratio', float('nan')):>8.3f}")
    print("(ESS: of the truncated density-ratio weights, 1 = all equal; clipped: weight mass truncation removed; "
          "stale: versions behind; clip c±ε: replayed tokens outside Mix-PPG's clip, 0 at a batch's first update)")
    replayed = sum(h.get("sponge/replay_rows", 0) for h in logged)
    first, last = np.mean([h["reward"] for h in logged[:5]]), np.mean([h["reward"] for h in logged[-5:]])
    client = ServiceClient(url)
    run = client.run(args.run_id)
    source.producer.flush()       # the last step's rollouts may still be on their way through Kafka
    query = f"SELECT policy_version, count(*) AS n FROM rollouts WHERE run_id = '{args.run_id}' GROUP BY 1 ORDER BY 1"
    deadline = time.monotonic() + 30
    while True:
        stored = client.sql(query)
        newest = dict(zip(stored.column(0).to_pylist(), stored.column(1).to_pylist())).get(run["policy_version"] - 1, 0)
        if newest >= args.batch or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    client.close()
    print(f"\n{trainer.state.global_step} optimizer steps, {len(logged)} generations in {seconds:.0f}s; "
          f"reward {first:.3f} (first 5 generations) -> {last:.3f} (last 5); held-out greedy reward "
          f"{success_before:.3f} -> {success_after:.3f}")
    print(f"published {trainer.sponge_published} rollouts; replayed {replayed:.0f} rows "
          f"({replayed / max(trainer.sponge_published, 1):.2f} per generated rollout); "
          f"service's version for {args.run_id}: {run['policy_version']}")
    print("rollouts the service holds for the run, per policy version (window 2, older ones retired): "
          f"{dict(zip(stored.column(0).to_pylist(), stored.column(1).to_pylist()))}")
    source.close()


if __name__ == "__main__":
    main()
