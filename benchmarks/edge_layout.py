"""Qdrant Edge layout: one shard per user against one shared shard with a tenant index and per-user IDF.

    python benchmarks/edge_layout.py [--users 100] [--per-user 1000] [--dense]

Raw ``qdrant_edge`` (not the memory), so that both layouts are measured on equal terms: each layout is
built, then a fresh process opens it, searches one user, searches 200 queries over the first 20 users,
a 47-item profile, and finally every user once (RSS, threads and FDs after it). Dense vectors are
random (their cost, not their meaning, is measured). Prints one JSON line per layout; it keeps no results file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from qdrant_edge import (
    Bm25,
    Bm25Config,
    Distance,
    EdgeConfig,
    EdgeShard,
    EdgeSparseVectorParams,
    EdgeVectorParams,
    FieldCondition,
    Filter,
    Fusion,
    HasIdCondition,
    IdfParams,
    KeywordIndexParams,
    MatchValue,
    Modifier,
    PayloadSchemaType,
    Point,
    Prefetch,
    Query,
    QueryRequest,
    SearchParams,
    UpdateOperation,
)

SHARED = Path(os.environ.get("PERSONA_DSPY_SHARED", Path(__file__).resolve().parents[2] / "shared"))
NS = uuid.UUID("7f1d3a52-52a4-4bd4-9f0e-6c1b3f5d2a10")
BM25 = Bm25(Bm25Config(language="english"))


def texts() -> list[str]:
    found: list[str] = []
    for task in ("LaMP_3", "LaMP_2N"):
        for question in json.loads((SHARED / "lamp" / task / "dev_questions.json").read_text()):
            found += [p.get("text") or p.get("abstract") or "" for p in question["profile"]]
    return [t for t in dict.fromkeys(found) if t.strip()]


def config(dense: bool) -> EdgeConfig:
    return EdgeConfig(sparse_vectors={"bm25": EdgeSparseVectorParams(modifier=Modifier.Idf)},
                      vectors={"dense": EdgeVectorParams(size=384, distance=Distance.Cosine, on_disk=True)}
                      if dense else None, max_search_threads=1)


def shard_path(root: Path, layout: str, user: str) -> Path:
    return root / "shared" if layout == "shared" else root / hashlib.sha256(user.encode()).hexdigest()[:24]


def user_filter(user: str) -> Filter:
    return Filter(must=[FieldCondition(key="user_id", match=MatchValue(user))])


def build(root: Path, layout: str, users: int, per_user: int, dense: bool) -> dict:
    rng, corpus, shards = random.Random(1), texts(), {}
    started = time.perf_counter()
    for u in range(users):
        user, path = f"user{u}", shard_path(root, layout, f"user{u}")
        if path not in shards:
            for shard in shards.values():
                shard.close()
            shards = {path: EdgeShard.create(str(path), config(dense))}
            shards[path].update(UpdateOperation.create_field_index("user_id", KeywordIndexParams(is_tenant=True)))
            shards[path].update(UpdateOperation.create_field_index("ts", PayloadSchemaType.Float))
        points = []
        for i in range(per_user):
            text = rng.choice(corpus)
            vectors = {"bm25": BM25.embed_document(text)}
            if dense:
                vectors["dense"] = [rng.gauss(0, 1) for _ in range(384)]
            points.append(Point(str(uuid.uuid5(NS, f"{user}\x1f{i}")), vectors,
                                {"user_id": user, "item_id": str(i), "text": text, "ts": float(i)}))
        for start in range(0, per_user, 256):
            shards[path].update(UpdateOperation.upsert_points(points[start:start + 256]))
    for shard in shards.values():
        shard.close()
    used = subprocess.run(["du", "-sk", str(root)], capture_output=True, text=True).stdout.split()[0]
    apparent = subprocess.run(["du", "-sk", "--apparent-size", str(root)], capture_output=True, text=True)
    return {"build_s": round(time.perf_counter() - started, 1), "disk_mb": int(used) // 1024,
            "apparent_mb": int(apparent.stdout.split()[0]) // 1024}


def rss_mb() -> int:
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS")).split()[1]) // 1024


def probe(root: Path, layout: str, users: int, per_user: int, dense: bool, n: int = 200) -> dict:
    rng = random.Random(5)
    corpus = texts()
    queries = [" ".join(rng.choice(corpus).split()[:12]) for _ in range(n)]
    opened: dict[Path, EdgeShard] = {}

    def search(user: str, text: str, mode: str, within: set | None = None) -> list:
        path = shard_path(root, layout, user)
        shard = opened.get(path) or opened.setdefault(path, EdgeShard.load(str(path)))
        must = [FieldCondition(key="user_id", match=MatchValue(user))] + ([HasIdCondition(within)] if within else [])
        flt = Filter(must=must)
        idf = SearchParams(idf=IdfParams(corpus=user_filter(user))) if layout == "shared" else None
        sparse = Query.Nearest(BM25.embed_query(text), using="bm25")
        if mode == "bm25":
            return shard.query(QueryRequest(limit=5, query=sparse, filter=flt, params=idf, with_payload=True))
        dense_query = Query.Nearest([rng.gauss(0, 1) for _ in range(384)], using="dense")
        return shard.query(QueryRequest(limit=5, with_payload=True, query=Fusion.Rrf(k=60), prefetches=[
            Prefetch(limit=40, query=sparse, filter=flt, params=idf),
            Prefetch(limit=40, query=dense_query, filter=flt, params=SearchParams(exact=True))]))

    def timed(run) -> tuple[float, float]:
        latencies = []
        for text in queries:
            t0 = time.perf_counter()
            run(text)
            latencies.append((time.perf_counter() - t0) * 1000)
        latencies.sort()
        return round(latencies[len(latencies) // 2], 3), round(latencies[int(len(latencies) * 0.99)], 3)

    t0 = time.perf_counter()
    search("user0", queries[0], "bm25")
    out = {"open_first_search_ms": round((time.perf_counter() - t0) * 1000, 1), "rss_after_first_mb": rss_mb()}
    for mode in ["bm25"] + (["hybrid"] if dense else []):
        out[f"{mode}_p50_ms"], out[f"{mode}_p99_ms"] = timed(
            lambda text, mode=mode: search(f"user{rng.randrange(min(users, 20))}", text, mode))
    profile = {str(uuid.uuid5(NS, f"user0\x1f{i}")) for i in range(per_user - 47, per_user)}
    out["scoped47_p50_ms"], _ = timed(lambda text: search("user0", text, "bm25", profile))
    t0 = time.perf_counter()
    for u in range(users):
        search(f"user{u}", queries[u % n], "bm25")
    out |= {"every_user_once_s": round(time.perf_counter() - t0, 2), "rss_every_user_mb": rss_mb(),
            "threads": len(os.listdir("/proc/self/task")), "fds": len(os.listdir("/proc/self/fd"))}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=100)
    parser.add_argument("--per-user", type=int, default=1000)
    parser.add_argument("--dense", action="store_true", help="add 384-d dense vectors (random)")
    parser.add_argument("--probe", nargs=2, metavar=("ROOT", "LAYOUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        print(json.dumps(probe(Path(args.probe[0]), args.probe[1], args.users, args.per_user, args.dense)))
        return
    with tempfile.TemporaryDirectory(prefix="edge-layout-") as tmp:
        for layout in ("per_user", "shared"):
            root = Path(tmp) / layout
            built = build(root, layout, args.users, args.per_user, args.dense)
            extra = ["--dense"] if args.dense else []
            done = subprocess.run([sys.executable, __file__, "--users", str(args.users), "--per-user",
                                   str(args.per_user), *extra, "--probe", str(root), layout],
                                  capture_output=True, text=True, check=True)
            print(json.dumps({"layout": layout, "users": args.users, "per_user": args.per_user, "dense": args.dense,
                              **built, **json.loads(done.stdout)}), flush=True)
            shutil.rmtree(root)


if __name__ == "__main__":
    main()
