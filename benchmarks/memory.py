"""Memory benchmark: ingest speed, search latency by memory size, layout, and retrieval quality.

    python benchmarks/memory.py                      # everything; dense parts when the model folder exists
    python benchmarks/memory.py --quick              # smaller sizes, for a smoke run

Prints tables and writes benchmarks/results/memory.json. Latency is wall time of
``EpisodicMemory.search`` in Qdrant local mode on this machine (single thread).
Quality: a k-nearest vote over each query's own profile (see persona_dspy.evaluation.retrieval_quality)
on the LaMP-format dev sets in ../shared/lamp (falls back to the shipped samples).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("PERSONA_DSPY_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from persona_dspy.data.lamp import dataset_dir, load_dataset  # noqa: E402
from persona_dspy.data.records import HistoryItem  # noqa: E402
from persona_dspy.data.tasks import get_task  # noqa: E402
from persona_dspy.evaluation.retrieval_quality import evaluate_retrieval  # noqa: E402
from persona_dspy.evaluation.tables import format_table  # noqa: E402
from persona_dspy.memory.embeddings import Embedder, EmbeddingConfig  # noqa: E402
from persona_dspy.memory.episodic import EpisodicMemory  # noqa: E402

SHARED = Path(os.environ.get("PERSONA_DSPY_SHARED", REPO.parent / "shared"))
DENSE_DIR = SHARED / "models" / "all-MiniLM-L6-v2-onnx"


def corpus_texts() -> list[str]:
    """Real review and news texts to build synthetic users of any size from."""
    texts: list[str] = []
    for task in ("LaMP_3", "LaMP_2N"):
        folder = SHARED / "lamp" / task if (SHARED / "lamp" / task).is_dir() else dataset_dir(task)
        for history in load_dataset(folder):
            texts.extend(it.text for it in history.items)
    return list(dict.fromkeys(texts))


def synthetic_items(texts: list[str], n: int, rng: random.Random) -> list[HistoryItem]:
    spec = get_task("LaMP_3")
    start = datetime(2015, 1, 1)
    return [
        HistoryItem.from_fields(spec, f"s{i}", start + timedelta(hours=i),
                                {"text": f"{rng.choice(texts)} (note {i})", "score": str(rng.randint(1, 5))}, i)
        for i in range(n)
    ]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def time_searches(memory: EpisodicMemory, user: str, queries: list[str], mode: str) -> dict[str, float]:
    for q in queries[:5]:  # warm-up
        memory.search(user, q, 5, mode=mode)
    latencies = []
    for q in queries:
        t0 = time.perf_counter()
        memory.search(user, q, 5, mode=mode)
        latencies.append((time.perf_counter() - t0) * 1000)
    return {"p50_ms": percentile(latencies, 50), "p99_ms": percentile(latencies, 99), "searches": len(latencies)}


def search_after_write(memory: EpisodicMemory, texts: list[str], queries: list[str], mode: str) -> float:
    """Median latency of a search right after adding one item (an app that remembers, then asks)."""
    spec = get_task("LaMP_3")
    latencies = []
    for i, query in enumerate(queries[:20]):
        new = HistoryItem.from_fields(spec, f"w{mode}{i}", datetime(2030, 1, 1), {"text": texts[i], "score": "3"}, 0)
        memory.add("user", [new])
        t0 = time.perf_counter()
        memory.search("user", query, 5, mode=mode)
        latencies.append((time.perf_counter() - t0) * 1000)
    return statistics.median(latencies)


def bench_scale(texts: list[str], sizes: list[int], embedders: dict[str, Embedder], n_queries: int) -> list[dict]:
    rows = []
    rng = random.Random(7)
    queries = [" ".join(rng.choice(texts).split()[:12]) for _ in range(n_queries)]
    for label, embedder in embedders.items():
        modes = ["sparse"] if label == "bm25" else ["dense", "hybrid"]
        for size in sizes:
            items = synthetic_items(texts, size, random.Random(size))
            with tempfile.TemporaryDirectory() as tmp:
                with EpisodicMemory(Path(tmp) / "mem", embedder=embedder) as mem:
                    t0 = time.perf_counter()
                    mem.add("user", items)
                    ingest_s = time.perf_counter() - t0
                    t0 = time.perf_counter()
                    mem.search("user", queries[0], 5, mode=modes[0])
                    first_ms = (time.perf_counter() - t0) * 1000
                with EpisodicMemory(Path(tmp) / "mem", embedder=embedder) as mem:  # an app opening the store
                    t0 = time.perf_counter()
                    mem.search("user", queries[0], 5, mode=modes[0])  # builds the user's index from Qdrant
                    reopened_ms = (time.perf_counter() - t0) * 1000
                    for mode in modes:
                        row = {"vectors": label, "mode": mode, "items_per_user": size,
                               "ingest_items_per_s": round(size / ingest_s, 1), "first_search_ms": round(first_ms, 2),
                               "first_search_reopened_ms": round(reopened_ms, 2),
                               **time_searches(mem, "user", queries, mode),
                               "search_after_write_ms": round(search_after_write(mem, texts, queries, mode), 3)}
                        rows.append(row)
                        print(f"  {label:6s} {mode:7s} {size:>6d} items: ingest {row['ingest_items_per_s']:>8.1f}/s  "
                              f"p50 {row['p50_ms']:.2f} ms  p99 {row['p99_ms']:.2f} ms  first {first_ms:.2f} ms  "
                              f"first after reopening {reopened_ms:.1f} ms  after a write "
                              f"{row['search_after_write_ms']:.2f} ms", flush=True)
    return rows


def bench_layouts(texts: list[str], users: int, per_user: int, embedder: Embedder, n_queries: int) -> list[dict]:
    """Same data, two layouts, local mode: why local mode keeps a collection per user."""
    rows = []
    rng = random.Random(11)
    queries = [" ".join(rng.choice(texts).split()[:12]) for _ in range(n_queries)]
    for layout in ("per_user", "shared"):
        with tempfile.TemporaryDirectory() as tmp, EpisodicMemory(Path(tmp) / "mem", embedder=embedder,
                                                                  layout=layout) as mem:
            for u in range(users):
                mem.add(f"user{u}", synthetic_items(texts, per_user, random.Random(u)))
            timing = time_searches(mem, "user0", queries, "sparse")
            rows.append({"layout": layout, "users": users, "items_per_user": per_user, "total_items": users * per_user,
                         **timing})
            print(f"  layout {layout:8s} {users} users x {per_user}: p50 {timing['p50_ms']:.2f} ms  "
                  f"p99 {timing['p99_ms']:.2f} ms", flush=True)
    return rows


def bench_quality(embedders: dict[str, Embedder], k: int) -> list[dict]:
    rows = []
    for task in ("LaMP_2N", "LaMP_3", "LaMP_2M"):
        folder = SHARED / "lamp" / task
        source = "shared dev set"
        if not folder.is_dir():
            folder, source = dataset_dir(task), "shipped sample"
        histories = load_dataset(folder)
        embedder = embedders.get("hybrid", embedders["bm25"])
        with EpisodicMemory(":memory:", embedder=embedder) as mem:
            mem.add_histories(histories)
            strategies = ["recency", "majority", "bm25"] + (["dense", "hybrid"] if embedder.has_dense else [])
            runs = [(strategy, strategy, mem.rrf_k) for strategy in strategies]
            if embedder.has_dense:  # why the memory fuses with k=60: Qdrant's own default is k=2
                runs.append(("hybrid_rrf_k2", "hybrid", 2))
            for name, strategy, rrf_k in runs:
                mem.rrf_k = rrf_k
                row = evaluate_retrieval(histories, strategy, k=k, memory=mem).as_row() | {
                    "strategy": name, "source": source}
                rows.append(row)
                extra = f"  MAE {row['mae']:.3f}  RMSE {row['rmse']:.3f}" if "mae" in row else ""
                print(f"  {task:8s} {name:13s} k={k}: accuracy {row['accuracy']:.3f}{extra}  "
                      f"(n={row['queries']}, fallbacks {row['fallbacks']})", flush=True)
    return rows


def bench_plain_qdrant(texts: list[str], sizes: list[int], embedder: Embedder, n_queries: int) -> list[dict]:
    """Qdrant local mode searching by itself (no in-process index): why the memory keeps one."""
    rows = []
    rng = random.Random(13)
    queries = [" ".join(rng.choice(texts).split()[:12]) for _ in range(n_queries)]
    for size in sizes:
        with EpisodicMemory(":memory:", embedder=embedder, local_index=False) as mem:
            mem.add("user", synthetic_items(texts, size, random.Random(size)))
            row = {"vectors": "bm25", "search": "Qdrant local mode alone", "items_per_user": size,
                   **time_searches(mem, "user", queries, "sparse")}
        rows.append(row)
        print(f"  Qdrant alone, {size:>6d} items: p50 {row['p50_ms']:.2f} ms  p99 {row['p99_ms']:.2f} ms", flush=True)
    return rows


def bench_scoped(texts: list[str], embedder: Embedder, n_queries: int, profile: int = 47) -> dict:
    """A search confined to a query's own profile (LaMP_2N's median profile is 47 items), as the agent runs."""
    rng = random.Random(17)
    queries = [" ".join(rng.choice(texts).split()[:12]) for _ in range(n_queries)]
    items = synthetic_items(texts, 1000, random.Random(1000))
    scope = [it.id for it in items[-profile:]]
    with EpisodicMemory(":memory:", embedder=embedder) as mem:
        mem.add("user", items)
        for q in queries[:5]:
            mem.search("user", q, 5, within_ids=scope, exclude_ids=["query"])
        latencies = []
        for q in queries:
            t0 = time.perf_counter()
            mem.search("user", q, 5, within_ids=scope, exclude_ids=["query"])
            latencies.append((time.perf_counter() - t0) * 1000)
    row = {"vectors": "bm25", "items_per_user": 1000, "scope_items": profile,
           "p50_ms": percentile(latencies, 50), "p99_ms": percentile(latencies, 99), "searches": len(latencies)}
    print(f"  scoped to {profile} items of 1000: p50 {row['p50_ms']:.3f} ms  p99 {row['p99_ms']:.3f} ms", flush=True)
    return row


def print_table(title: str, rows: list[dict]) -> None:
    if rows:
        print(f"\n{title}\n{format_table(rows)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="sizes 100 and 1000 only, fewer searches")
    parser.add_argument("--sizes", type=int, nargs="*", default=None)
    parser.add_argument("--queries", type=int, default=200, help="searches timed per configuration")
    parser.add_argument("-k", type=int, default=5)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "memory.json")
    args = parser.parse_args()
    sizes = args.sizes or ([100, 1000] if args.quick else [100, 1000, 10000])
    n_queries = 50 if args.quick else args.queries

    embedders = {"bm25": Embedder()}
    if (DENSE_DIR / "model.onnx").is_file():
        embedders["hybrid"] = Embedder(EmbeddingConfig(sparse=True, dense=str(DENSE_DIR)))
    else:
        print(f"dense model folder absent ({DENSE_DIR}): dense and hybrid rows skipped")
    texts = corpus_texts()
    print(f"corpus: {len(texts)} distinct texts; sizes {sizes}; {n_queries} searches per row")
    started = time.time()
    print("scale (local mode, one collection per user):")
    scale = bench_scale(texts, sizes, embedders, n_queries)
    print("layout (local mode, BM25):")
    scoped = bench_scoped(texts, embedders["bm25"], n_queries)
    print("Qdrant local mode alone (BM25, no in-process index):")
    plain = bench_plain_qdrant(texts, [s for s in sizes if s <= 10000], embedders["bm25"], min(n_queries, 30))
    layouts = bench_layouts(texts, users=10, per_user=1000, embedder=embedders["bm25"], n_queries=n_queries)
    print("quality:")
    quality = bench_quality(embedders, args.k)
    print_table("Ingest and search latency", scale)
    print_table("Search scoped to a query's profile (in-process index)", [scoped])
    print_table("Qdrant local mode alone", plain)
    print_table("Collection layout in local mode", layouts)
    print_table("Retrieval quality (k-nearest vote over each query's own profile)", quality)
    result = {
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()},
        "created": datetime.now().isoformat(timespec="seconds"),
        "seconds": round(time.time() - started, 1),
        "scale": scale, "scoped": scoped, "plain_qdrant": plain, "layouts": layouts, "quality": quality,
        "summary": {
            "search_p50_ms_bm25_1k": next((r["p50_ms"] for r in scale if r["mode"] == "sparse"
                                           and r["items_per_user"] == 1000), None),
            "ingest_items_per_s_bm25_1k": next((r["ingest_items_per_s"] for r in scale if r["mode"] == "sparse"
                                                and r["items_per_user"] == 1000), None),
            "median_search_p50_ms": statistics.median(r["p50_ms"] for r in scale),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
