"""The replay loop from a trainer's side: a default `sponge serve` while a trainer runs at full speed.

1. Start the embedded broker and `sponge serve` as its own process with its default settings
   (only where it listens, reads and writes is given).
2. Train the tiny model (ReMix, replay from the service through `sponge.client.ServiceReplaySource`)
   for `--iterations` steps. Every call the trainer makes to the source is timed: `send` (Kafka),
   `report_version` and `candidates` (HTTP, including the read-your-writes wait). Printed: time to
   the first replay draw, the fraction of iterations that drew replay, fresh rollouts of the run
   the service refused (must be 0), draws that ended before the trainer's own rollouts were in,
   and the trainer's time spent in the source as a share of its wall time (target <= 5%).
   `--wait both` (the default) runs this twice on the same service: with the source's default wait
   (every version of the window but the newest; a draw not computed yet for the trainer's version may
   be one version behind) and strict (`wait_newest=True, max_lag=0`), so the price of strict
   read-your-writes is printed beside it.
3. Then, against the service as the run left it, draw latency over HTTP (p50/p99 of `--requests`
   calls, alternated with a bare /healthz round trip as the floor): 256 rollouts
   (/replay/sample?n=256) and the run's group candidates (about 32 groups with the defaults).

    .venv/bin/python bench/replay_loop.py                  # ~3 minutes on 2 cores
    .venv/bin/python bench/replay_loop.py --iterations 20 --requests 100
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np


class TimedSource:
    """Wraps a replay source and adds up the seconds the trainer spends in each of its calls."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.seconds: dict[str, float] = {}
        self.first_replay_at: float | None = None
        self.draws: list[dict] = []   # per candidates call: seconds in the call, seconds the service waited
        self.calls: list[tuple[float, float]] = []   # per call: (when it started, seconds in it)
        self.cleared = False                         # reincarnation happened (the source was cleared)
        self.started = time.perf_counter()

    def __getattr__(self, name):
        attr = getattr(self.inner, name)
        if name not in ("register", "send", "report_version", "candidates", "clear", "state_dict",
                        "load_state_dict"):
            return attr

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                result = attr(*args, **kwargs)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
                self.calls.append((t0 - self.started, time.perf_counter() - t0))
            if name == "clear":
                self.cleared = True
            if name == "candidates":
                self.draws.append({"after_clear": self.cleared,"in_call_s": time.perf_counter() - t0, "via": self.inner.last_draw.get("via"),
                                   "lag": self.inner.last_draw.get("lag", 0),
                                   "fetch_s": self.inner.last_draw.get("fetch_s", 0.0),
                                   "report_wait_s": self.inner.last_draw.get("report_wait_s", 0.0),
                                   "service_waited_s": self.inner.last_draw.get("waited_s", 0.0),
                                   "service_compute_s": self.inner.last_draw.get("compute_s", 0.0)})
                if self.first_replay_at is None and result.num_rows:
                    self.first_replay_at = time.perf_counter() - self.started
            return result
        return timed


def start_service(broker: str, store: Path, log: Path) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "sponge.cli", "serve", "--bootstrap-servers", broker, "--store", str(store),
           "--http-port", "0"]
    proc = subprocess.Popen(cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    deadline = time.monotonic() + 300
    url = None
    while time.monotonic() < deadline and proc.poll() is None:
        for line in log.read_text(errors="replace").splitlines():
            if '"event": "http"' in line:
                url = json.loads(line)["url"]
        if url:
            try:
                if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                    return proc, url
            except httpx.HTTPError:
                pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"sponge serve did not become ready: {log.read_text()[-2000:]}")


def latency(fn, healthz, requests: int) -> dict:
    """p50/p99 milliseconds of `fn` and of a bare /healthz, alternated."""
    ours, floor = [], []
    for _ in range(requests):
        for sink, call in ((ours, fn), (floor, healthz)):
            t0 = time.perf_counter()
            call()
            sink.append((time.perf_counter() - t0) * 1000)
    q = lambda xs, p: round(float(np.percentile(xs, p)), 2)
    return {"p50_ms": q(ours, 50), "p99_ms": q(ours, 99), "healthz_p50_ms": q(floor, 50),
            "healthz_p99_ms": q(floor, 99)}


def train_once(url: str, bootstrap: str, client, args, strict: bool):
    """One ReMix run against the service, every call to its replay source timed; (figures, trainer, source)."""
    from sponge.client import ServiceReplaySource
    from sponge.trainer import (
        CharTokenizer,
        ReMixConfig,
        ReMixTrainer,
        build_tiny_model,
        make_task,
        warm_start,
    )

    task = make_task("reverse")
    tokenizer = CharTokenizer(task.alphabet)
    model = build_tiny_model(tokenizer, seed=0)
    warm_start(model, tokenizer, task, steps=50, seed=0)
    # A rollout budget that the iterations spend (the default one would end the run first); the
    # default reincarnation comes at half of it, as in any run.
    budget = args.iterations * args.prompts_per_step * args.group_size
    config = ReMixConfig(prompts_per_step=args.prompts_per_step, group_size=args.group_size,
                         rollout_budget=budget, max_iterations=args.iterations, eval_every=10**6, eval_size=0,
                         progress=True,
                         run_name=f"replay-loop-{'strict' if strict else 'default'}")
    # strict: every draw holds everything sent and is computed for the trainer's own version
    lag = {} if args.max_lag is None else {"max_lag": args.max_lag}
    inner = ServiceReplaySource(url, bootstrap, "rollouts", window=config.replay_window,
                                **(dict(wait_newest=True, max_lag=0) if strict else lag))
    source = TimedSource(inner)
    trainer = ReMixTrainer(model, tokenizer, task, config, replay_source=source, eval_prompts=[])
    t_train = time.perf_counter()
    source.started = t_train
    history = trainer.train()
    train_wall = time.perf_counter() - t_train
    run = client.run(trainer.run_id)
    steps = [h for h in history if h.get("iteration", 0) > 0]
    replayed = [h for h in steps if h.get("n_replay", 0) > 0]
    staleness = [h["replay_mean_staleness"] for h in replayed if h.get("replay_mean_staleness") is not None]
    in_source = sum(source.seconds.values())
    # After the first replay draw (which waits for the service to ingest and select the first
    # version: once per run), the share a long run converges to.
    settled = source.first_replay_at if source.first_replay_at is not None else train_wall
    in_source_after = sum(dt for t, dt in source.calls if t >= settled)
    # Two draws in a run wait by design: the first (version 0 must be ingested and selected) and the
    # first after reincarnation (replay restarts from the newest version). The rest is steady state.
    restart = [d for d in source.draws if d.get("after_clear")]
    by_design = source.draws[1:2] + restart[:1]
    in_source_steady = in_source_after - sum(d["in_call_s"] for d in restart[:1])
    loop = {
        "wait_newest": inner.wait_newest, "max_lag": inner.max_lag,
        "iterations": len(steps), "rollouts_generated": trainer.rollouts_generated,
        "trainer_wall_s": round(train_wall, 2),
        "time_to_first_replay_draw_s": None if source.first_replay_at is None else round(source.first_replay_at, 2),
        "iterations_with_replay": len(replayed),
        "fraction_with_replay_after_first": round(len(replayed) / max(1, len(steps) - 1), 3),
        "mean_replay_staleness": round(float(np.mean(staleness)), 2) if staleness else None,
        "fresh_rollouts_refused": int(run["refused"].get("retired", 0)),
        "refused_by_reason": run["refused"],
        "incomplete_draws": inner.incomplete_draws,
        "lagged_draws": inner.lagged_draws,
        "seconds_in_source": {k: round(v, 3) for k, v in source.seconds.items()},
        "share_of_wall_time_in_source": round(in_source / train_wall, 4),
        "share_waiting_for_candidates": round(source.seconds.get("candidates", 0.0) / train_wall, 4),
        "share_in_source_after_first_replay": round(in_source_after / max(1e-9, train_wall - settled), 4),
        "share_in_source_steady": round(in_source_steady / max(1e-9, train_wall - settled
                                                              - sum(d["in_call_s"] for d in restart[:1])), 4),
        "draws_waiting_by_design_s": [round(d["in_call_s"], 3) for d in by_design],
        # of a draw's time in the trainer: the service's read-your-writes wait, the rest is HTTP and the
        # service computing candidates (a prefetched draw's wait overlaps generation, so it can exceed it)
        "draw_in_call_s_p50": round(float(np.median([d["in_call_s"] for d in source.draws])), 3) if source.draws else None,
        "draw_service_waited_s_p50": round(float(np.median([d["service_waited_s"] for d in source.draws])), 3)
        if source.draws else None,
        "draw_service_compute_s_p50": round(float(np.median([d["service_compute_s"] for d in source.draws])), 3)
        if source.draws else None,
        "step_s_p50": round(float(np.median([h["step_s"] for h in steps if "step_s" in h])), 3),
        # per draw: seconds in the call, versions behind, and how long its fetch took off the trainer's
        # thread (waiting for the version report it follows, then the candidates round trip)
        "draws": [{k: round(v, 3) if isinstance(v, float) else v for k, v in d.items()} for d in source.draws],
    }
    return loop, trainer, inner


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--iterations", type=int, default=120,
                   help="trainer steps (the first draw waits for the service by design: a short run magnifies it)")
    p.add_argument("--prompts-per-step", type=int, default=16)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--requests", type=int, default=200, help="HTTP requests per latency figure")
    p.add_argument("--threads", type=int, default=1, help="torch threads for the trainer")
    p.add_argument("--wait", choices=["both", "default", "strict"], default="both",
                   help="default: ServiceReplaySource's defaults (draws wait for every version but the newest, "
                        "and a draw not yet computed for the trainer's version may be one version behind); "
                        "strict: wait for the newest too and for the current version's draw "
                        "(wait_newest=True, max_lag=0); both: one run of each, one after the other")
    p.add_argument("--max-lag", type=int, default=None,
                   help="ServiceReplaySource's max_lag for the default mode (default: the client's own default)")
    p.add_argument("--out", type=Path, default=Path("bench/results/replay_loop.json"))
    args = p.parse_args(argv)

    import torch

    from sponge.client import ServiceClient
    from sponge.streams.broker import EmbeddedBroker, create_topic

    torch.set_num_threads(args.threads)
    modes = ["default", "strict"] if args.wait == "both" else [args.wait]
    work = Path(tempfile.mkdtemp(prefix="sponge-replay-loop-"))
    with EmbeddedBroker() as broker:
        create_topic(broker.bootstrap, "rollouts", partitions=4)
        t0 = time.perf_counter()
        proc, url = start_service(broker.bootstrap, work / "store", work / "serve.log")
        service_start_s = time.perf_counter() - t0
        client = ServiceClient(url)
        try:
            loops = {}
            for mode in modes:   # the same service, one run per mode, one after the other
                loop, trainer, inner = train_once(url, broker.bootstrap, client, args, strict=(mode == "strict"))
                loop["service_start_to_ready_s"] = round(service_start_s, 2)
                loops[mode] = loop
                print(f"{mode}:", json.dumps(loop, indent=2))
                if mode != modes[-1]:
                    inner.close()

            # The service may still be selecting the last versions the trainer sent (on a loaded
            # machine its curation runs behind a tiny model at full speed): wait until it holds a subset.
            deadline = time.monotonic() + 120
            while client.run(trainer.run_id)["subset_size"] == 0 and time.monotonic() < deadline:
                time.sleep(0.2)
            healthz = lambda: client._http.get("/healthz")
            version = trainer.version
            groups, _ = client.candidates(trainer.run_id, version, "group")
            draws = {
                "sample_256_rollouts": latency(lambda: client.sample(256, run=trainer.run_id), healthz,
                                               args.requests),
                "group_candidates": latency(lambda: client.candidates(trainer.run_id, version, "group"), healthz,
                                            args.requests),
                "groups_per_candidates_draw": len(set(groups.column("group_id").to_pylist())),
                "rows_per_candidates_draw": groups.num_rows,
            }
            print(json.dumps(draws, indent=2))
            inner.close()
        finally:
            client.close()
            proc.terminate()
            proc.wait(60)
    result = {"loop": loops, "draw_latency": draws, "command": " ".join(["bench/replay_loop.py", *(argv or sys.argv[1:])])}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    for mode, loop in loops.items():
        target = loop["share_of_wall_time_in_source"] <= 0.05 and loop["fresh_rollouts_refused"] == 0
        print(f"{mode}: {loop['share_of_wall_time_in_source']:.1%} of the trainer's wall time in the source "
              f"({loop['share_in_source_after_first_replay']:.1%} after the first replay draw, "
              f"{loop['share_in_source_steady']:.1%} without the draw after reincarnation either), "
              f"{loop['fresh_rollouts_refused']} refused, {loop['incomplete_draws']} incomplete draws, "
              f"{loop['lagged_draws']} draws a version behind, replay in "
              f"{loop['fraction_with_replay_after_first']:.0%} of iterations after the first, mean replay staleness "
              f"{loop['mean_replay_staleness']} versions; targets (<= 5%, 0 refused):", "met" if target else "NOT met")
    return 0


if __name__ == "__main__":
    sys.exit(main())
