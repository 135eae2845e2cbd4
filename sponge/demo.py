"""`sponge demo`: the whole loop on one machine, in a few minutes on a CPU.

1. start the embedded Kafka-compatible broker;
2. start the service in-process (ingest → store → dynamic selector → HTTP API);
3. warm-start a tiny model on a toy task, then train it twice from the same weights and seed:
   ReMix drawing replay from the service's curated subset with truncated density-ratio weights
   (its rollouts flow through Kafka into the store; its policy versions flow back and evict
   stale rows), and on-policy GRPO as the baseline;
4. write a report folder: plots of held-out success and response length against cumulative
   rollouts, replay-subset diversity and ingest rate over time, the SQL that produced each
   plot, the raw timelines, and a summary (also printed).

Ctrl-C stops it cleanly: training stops after the current step, the service flushes and
commits, the broker stops, and the report is written from what was recorded.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

HELP = "the end-to-end demo: broker, service and ReMix trainer on a toy task, with a report"

#: Each plot of the report is one query; they are saved beside the plots.
QUERIES = {
    "success_vs_rollouts": """
        SELECT regexp_extract(filename, 'runs/([^/]+)/', 1) AS run, rollouts, eval_success, eval_response_len
        FROM read_json_auto('{report}/runs/*/metrics.jsonl', filename = true)
        WHERE eval_success IS NOT NULL ORDER BY run, rollouts""",
    "timeline": """
        SELECT t_s, stored_rollouts, dead_letters, selection_version, objective_value, subset_diversity,
               policy_version, evicted_total,
               (stored_rollouts + evicted_total - lag(stored_rollouts + evicted_total) OVER w)
                   / nullif(t_s - lag(t_s) OVER w, 0) AS ingest_rate
        FROM read_parquet('{report}/timeline.parquet') WINDOW w AS (ORDER BY t_s) ORDER BY t_s""",
    "store_by_policy_version": """
        SELECT policy_version, count(*) AS rollouts, avg(reward) AS mean_reward
        FROM rollouts GROUP BY policy_version ORDER BY policy_version""",
    "replay_subset": """
        SELECT s.selection_version, s.objective_value, r.policy_version, r.reward, r.prompt, r.response
        FROM replay_subset s JOIN rollouts r USING (rollout_id) ORDER BY r.policy_version DESC LIMIT 20""",
}


@dataclass
class DemoConfig:
    #: Report folder (overwritten runs/ and store/ inside).
    out: str = "demo-report"
    #: Toy task: "reverse" (reverse a digit string) or "add" (small-number addition).
    task: str = "reverse"
    #: Rollouts each training run may generate.
    rollout_budget: int = 10000
    #: Seed of the model, the tasks and the selector.
    seed: int = 0
    #: Replay subset size the service keeps.
    k: int = 64
    #: Also train the on-policy GRPO baseline.
    baseline: bool = True
    #: Supervised warm-start steps before RL (so rewards are not all zero).
    warm_start_steps: int = 50
    #: Reincarnation step T of ReMix (replay off from here on); None = ReMixConfig's default (once
    #: half the rollout budget is spent).
    reincarnate_at: int | None = None


class Timeline:
    """Samples the service once a second into rows for the report."""

    def __init__(self, server, interval_s: float = 1.0) -> None:
        self.server, self.interval_s = server, interval_s
        self.rows: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="demo-timeline", daemon=True)
        self._t0 = time.monotonic()

    def start(self) -> Timeline:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sample()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def sample(self) -> None:
        curator, totals = self.server.curator, self.server.ingest.totals
        runs = curator.runs()   # the demo trains one run against the service
        if not runs:
            return
        described = runs[0]
        self.rows.append({
            "t_s": time.monotonic() - self._t0, "stored_rollouts": self.server.store.count(),
            "dead_letters": totals.dead_letters,
            "selection_version": described["selection_version"],
            "objective_value": described["objective_value"],
            "subset_diversity": _subset_diversity(curator, described["run_id"]),
            "policy_version": described["policy_version"], "evicted_total": described["evicted_total"],
        })


def _subset_diversity(curator, run_id: str) -> float:
    """Mean pairwise cosine distance inside the replay subset (0 = identical, 1 = orthogonal)."""
    from sponge.service.curation import embedding_matrix

    ids = curator.subset_ids(run_id)
    if len(ids) < 2:
        return float("nan")
    x = embedding_matrix(curator.store.rows_by_id(ids, ["embedding"]))
    x = x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-12)
    sims = x @ x.T
    n = len(x)
    return float(1.0 - (sims.sum() - np.trace(sims)) / (n * (n - 1)))


def run_demo(cfg: DemoConfig) -> dict:
    from sponge.client import ServiceReplaySource
    from sponge.service.api import ApiConfig
    from sponge.service.curation import CurationConfig
    from sponge.service.server import ServerConfig, serve_in_thread
    from sponge.service.ingest import IngestConfig
    from sponge.streams.broker import EmbeddedBroker
    from sponge.trainer import (
        CharTokenizer,
        ReMixConfig,
        ReMixTrainer,
        build_tiny_model,
        make_task,
        warm_start,
    )

    out = Path(cfg.out)
    for sub in ("runs", "store"):
        _rmtree(out / sub)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    summary: dict = {"config": cfg.__dict__}
    interrupted = False

    task = make_task(cfg.task)
    tokenizer = CharTokenizer(task.alphabet)
    print(f"[1/5] warm-starting a tiny GPT-2 on '{cfg.task}' ({cfg.warm_start_steps} supervised steps)")
    base_model = build_tiny_model(tokenizer, seed=cfg.seed)
    warm_start(base_model, tokenizer, task, steps=cfg.warm_start_steps, seed=cfg.seed, progress=True)

    remix_cfg = ReMixConfig(rollout_budget=cfg.rollout_budget, seed=cfg.seed, run_name="remix-curated",
                            replay_sampling="resample", reincarnate_at=cfg.reincarnate_at)
    histories: dict[str, list[dict]] = {}

    print("[2/5] starting the embedded broker and the service")
    with EmbeddedBroker() as broker:
        server_cfg = ServerConfig(
            # The service's defaults: the trainer's source waits for its own rollouts when it needs them.
            ingest=IngestConfig(bootstrap_servers=broker.bootstrap, topic="rollouts", group_id="sponge-demo",
                                store_path=str(out / "store"), partitions=2, log_level="WARNING"),
            curation=CurationConfig(k=cfg.k, seed=cfg.seed),
            api=ApiConfig(port=0))
        with serve_in_thread(server_cfg) as server:
            timeline = Timeline(server).start()
            source = ServiceReplaySource(server.http.url, broker.bootstrap, "rollouts",
                                         window=remix_cfg.replay_window)
            try:
                print(f"[3/5] ReMix with curated replay: rollouts → Kafka → store → selector → replay "
                      f"(service at {server.http.url})")
                trainer = ReMixTrainer(copy.deepcopy(base_model), tokenizer, task, remix_cfg,
                                       replay_source=source, output_dir=out / "runs" / "remix-curated")
                histories["remix-curated"] = trainer.history   # filled as it trains: an interrupt keeps it
                trainer.train()
                if cfg.baseline:
                    print("[4/5] on-policy GRPO baseline from the same weights and seed")
                    grpo = ReMixTrainer(copy.deepcopy(base_model), tokenizer, task,
                                        ReMixConfig.grpo(rollout_budget=cfg.rollout_budget, seed=cfg.seed),
                                        output_dir=out / "runs" / "grpo")
                    histories["grpo"] = grpo.history
                    grpo.train()
            except KeyboardInterrupt:
                interrupted = True
                print("\ninterrupted: stopping the service and writing the report from what was recorded")
            finally:
                source.close()
                timeline.stop()
                if source.run_id is not None:   # the service's view of the run, before it stops
                    summary["service"] = server.curator.describe_run(source.run_id)
        summary["ingest"] = dataclasses.asdict(server.ingest.totals)
        summary["store"] = server.store.stats()

    print("[5/5] writing the report")
    if timeline.rows:
        pq.write_table(pa.Table.from_pylist(timeline.rows), out / "timeline.parquet")
    summary.update(write_report(out, server.store, histories))
    summary["wall_seconds"] = round(time.monotonic() - t_start, 1)
    summary["interrupted"] = interrupted
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print_summary(summary, out)
    return summary


def write_report(out: Path, store, histories: dict[str, list[dict]]) -> dict:
    """Run each report query, plot its result, save the SQL; returns headline figures."""
    import duckdb
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (out / "queries.sql").write_text("\n\n".join(
        f"-- {name}\n{q.strip().format(report=out)};" for name, q in QUERIES.items()))
    conn = duckdb.connect()
    results: dict = {}

    histories = {name: hist for name, hist in histories.items() if hist}
    if histories:
        curves = conn.sql(QUERIES["success_vs_rollouts"].format(report=out)).to_arrow_table()
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for run in sorted(set(curves.column("run").to_pylist())):
            mask = np.array([run == r for r in curves.column("run").to_pylist()])
            x = np.asarray(curves.column("rollouts").to_pylist())[mask]
            axes[0].plot(x, np.asarray(curves.column("eval_success").to_pylist())[mask], marker="o", label=run)
            axes[1].plot(x, np.asarray(curves.column("eval_response_len").to_pylist())[mask], marker="o", label=run)
        axes[0].set(xlabel="cumulative rollouts generated", ylabel="held-out success", title="success")
        axes[1].set(xlabel="cumulative rollouts generated", ylabel="tokens", title="response length")
        for ax in axes:
            ax.grid(alpha=0.3)
            ax.legend()
        fig.tight_layout()
        fig.savefig(out / "reward_vs_rollouts.png", dpi=110)
        plt.close(fig)
        for name, hist in histories.items():
            evals = [h for h in hist if "eval_success" in h]
            results[f"{name}_final_success"] = evals[-1]["eval_success"] if evals else None
            results[f"{name}_start_success"] = evals[0]["eval_success"] if evals else None
            results[f"{name}_rollouts"] = hist[-1]["rollouts"] if hist else 0

    if (out / "timeline.parquet").exists():
        tl = conn.sql(QUERIES["timeline"].format(report=out)).to_arrow_table()
        t = np.asarray(tl.column("t_s").to_pylist(), dtype=float)
        fig, axes = plt.subplots(1, 3, figsize=(15, 4))
        axes[0].plot(t, _floats(tl, "objective_value"), label="objective f(S)")
        axes[0].set(xlabel="seconds", ylabel="f(S)", title="replay subset: facility-location value")
        ax2 = axes[0].twinx()
        ax2.plot(t, _floats(tl, "subset_diversity"), color="tab:orange", label="mean cosine distance")
        ax2.set_ylabel("mean pairwise cosine distance")
        lines = axes[0].get_lines() + ax2.get_lines()
        axes[0].legend(lines, [line.get_label() for line in lines], loc="lower right")
        axes[1].plot(t, _floats(tl, "ingest_rate"))
        axes[1].set(xlabel="seconds", ylabel="rollouts / s", title="ingest rate")
        axes[2].plot(t, _floats(tl, "stored_rollouts"), label="live in store")
        axes[2].plot(t, _floats(tl, "evicted_total"), label="evicted (stale)")
        axes[2].set(xlabel="seconds", ylabel="rollouts", title="store size and retention")
        axes[2].legend()
        for ax in axes:
            ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "service_over_time.png", dpi=110)
        plt.close(fig)

    for name in ("store_by_policy_version", "replay_subset"):
        table = store.sql(QUERIES[name], max_rows=1000)
        pacsv.write_csv(table, out / f"{name}.csv")
        results[f"{name}_rows"] = table.num_rows
    return results


def _floats(table: pa.Table, name: str) -> np.ndarray:
    return np.asarray([np.nan if v is None else v for v in table.column(name).to_pylist()], dtype=float)


def print_summary(summary: dict, out: Path) -> None:
    svc = summary.get("service", {})
    print("\n=== sponge demo summary ===")
    for run in ("remix-curated", "grpo"):
        if f"{run}_final_success" in summary:
            print(f"  {run:14s} held-out success {summary[f'{run}_start_success']:.3f} → "
                  f"{summary[f'{run}_final_success']:.3f} after {summary[f'{run}_rollouts']} rollouts")
    print(f"  replay subset: k={svc.get('k')} selection version {svc.get('selection_version')}, "
          f"f(S)={svc.get('objective_value', 0):.2f}, {svc.get('n_live')} live rollouts in the selector, "
          f"{svc.get('oracle_queries')} oracle queries")
    print(f"  policy version reported: {svc.get('policy_version')}; store: {summary.get('store')}")
    print(f"  wall time {summary.get('wall_seconds')} s; report in {out}/ (plots, queries.sql, summary.json)")


def _rmtree(path: Path) -> None:
    import shutil

    if path.exists():
        shutil.rmtree(path)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = DemoConfig()
    parser.add_argument("--out", default=d.out, help="report folder")
    parser.add_argument("--task", default=d.task, choices=["reverse", "add"], help="toy task")
    parser.add_argument("--rollout-budget", type=int, default=d.rollout_budget, help="rollouts per training run")
    parser.add_argument("--seed", type=int, default=d.seed, help="seed of model, task and selector")
    parser.add_argument("--k", type=int, default=d.k, help="replay subset size")
    parser.add_argument("--no-baseline", dest="baseline", action="store_false", help="skip the GRPO baseline")
    parser.add_argument("--warm-start-steps", type=int, default=d.warm_start_steps, help="supervised warm start")
    parser.add_argument("--reincarnate-at", type=int, default=d.reincarnate_at,
                        help="ReMix reincarnation step T (default: once half the rollout budget is spent)")


def run(args: argparse.Namespace) -> int:
    import os
    import signal

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # Ctrl-C and SIGTERM both stop the demo cleanly, even when started from a shell that
    # ignores SIGINT for background jobs.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    cfg = DemoConfig(out=args.out, task=args.task, rollout_budget=args.rollout_budget, seed=args.seed, k=args.k,
                     baseline=args.baseline, warm_start_steps=args.warm_start_steps,
                     reincarnate_at=args.reincarnate_at)
    summary = run_demo(cfg)
    return 130 if summary.get("interrupted") else 0
