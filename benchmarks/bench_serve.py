"""The OCR service under load: throughput and p50 / p99 per variant at 1, 4 and 16 concurrent clients, and a rollback
drill with a deliberately broken candidate.

It starts the real server (``tools/serve.py`` in a subprocess, 127.0.0.1, a free port) on a run's models (candidate:
``RUN/delivered``, baseline: the run's baseline exports) and drives it with an async HTTP load generator (httpx),
bounded in requests and in time per level. Each variant is measured alone (``X-Variant``), shadow traffic off;
latency is the client's, from sending the request to the whole answer. Then a second server with shadow on
measures how far the candidate's answers agree with the baseline's on every page once.

``--drill``: the candidate's rec gets one conv's weights perturbed in a temporary copy
(:func:`export.serving.drill.perturbed_copy`); served at a 50% share with shadow on, the guardrails must set its
share to 0 by themselves while every request is answered 200. Exit code 1 when a request fails or no rollback
happens.

Usage: python benchmarks/bench_serve.py --run output/final [--clients 1,4,16] [--requests 32] [--max-seconds 60]
       python benchmarks/bench_serve.py --run output/final --drill
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import compress  # noqa: E402,F401  (imports zlib before paddle)

import argparse  # noqa: E402
import asyncio  # noqa: E402
import collections  # noqa: E402
import glob  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import httpx  # noqa: E402
from tqdm import tqdm  # noqa: E402

from compress.timing import latency_stats, machine_info  # noqa: E402
from export.serving.launch import ROOT, ServerProcess  # noqa: E402

CONFIG = os.path.join(ROOT, "configs", "serve.yml")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", default="output/final", help="run directory (RUN/delivered + its baseline exports)")
    parser.add_argument("--images", default="data/demo/det/eval", help="folder of page images to send")
    parser.add_argument("--clients", default="1,4,16", help="concurrent clients per level")
    parser.add_argument("--requests", type=int, default=32, help="requests per variant and level (at most)")
    parser.add_argument("--max-seconds", type=float, default=60.0, help="time per variant and level (at most)")
    parser.add_argument("--workers", type=int, default=2, help="loaded copies per variant (Variants.*.workers)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per predictor (Variants.*.threads)")
    parser.add_argument("--drill", action="store_true", help="run the rollback drill instead of the load table")
    parser.add_argument("--drill-requests", type=int, default=60)
    parser.add_argument("--drill-clients", type=int, default=4)
    parser.add_argument("--log", help="server log file (default: a temporary file, printed on failure)")
    return parser.parse_args()


def variant_overrides(args):
    return [f"Variants.{name}.{key}={getattr(args, key)}" for name in ("baseline", "candidate")
            for key in ("workers", "threads")]


def read_pages(folder):
    paths = sorted(glob.glob(os.path.join(folder, "*.jpg")) + glob.glob(os.path.join(folder, "*.png")))
    if not paths:
        sys.exit(f"error: no .jpg / .png images in {folder}")
    pages = []
    for path in paths:
        with open(path, "rb") as f:
            pages.append((os.path.basename(path), f.read()))
    return pages


# ------------------------------------------------------------------------------------------------ load generator

async def drive(url, pages, clients, requests, max_seconds, headers_for, desc, on_answer=None):
    """``clients`` coroutines send up to ``requests`` POST /ocr (cycling over ``pages``) until ``max_seconds``.

    Returns:
        (list of (status, latency seconds, variant or None), wall seconds).
    """
    results, issued = [], 0
    deadline = time.monotonic() + max_seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=max_seconds + 120, limits=limits) as client:
        with tqdm(total=requests, desc=desc, unit="req", leave=False) as bar:
            async def one_client(client_index):
                nonlocal issued
                while issued < requests and time.monotonic() < deadline:
                    index = issued
                    issued += 1
                    name, data = pages[index % len(pages)]
                    started = time.perf_counter()
                    response = await client.post("/ocr", files={"image": (name, data)},
                                                 headers=headers_for(client_index, index))
                    seconds = time.perf_counter() - started
                    variant = response.json().get("variant") if response.status_code == 200 else None
                    results.append((response.status_code, seconds, variant))
                    if on_answer is not None:
                        on_answer(response, time.monotonic())
                    bar.update(1)
            started = time.perf_counter()
            await asyncio.gather(*[one_client(i) for i in range(clients)])
    return results, time.perf_counter() - started


def level_row(variant, clients, results, wall_seconds):
    ok = [seconds for status, seconds, _ in results if status == 200]
    stats = latency_stats(ok) if ok else None
    return {"variant": variant, "clients": clients, "requests": len(results), "failed": len(results) - len(ok),
            "throughput": len(ok) / wall_seconds if wall_seconds > 0 else 0.0,
            "p50": stats.p50_ms if stats else float("nan"), "p99": stats.p99_ms if stats else float("nan")}


def print_table(rows):
    print("| variant | clients | requests | failed | pages/s | p50 ms | p99 ms |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['variant']} | {row['clients']} | {row['requests']} | {row['failed']} | "
              f"{row['throughput']:.2f} | {row['p50']:.0f} | {row['p99']:.0f} |")


def load_table(args, pages, log):
    levels = [int(c) for c in args.clients.split(",")]
    most = max(levels)
    overrides = variant_overrides(args) + [
        "Routing.shadow=false", "Routing.canary_share=0", "Routing.auto_promote=false",
        f"Limits.max_concurrency={most}", f"Limits.max_queue={most}", f"Limits.timeout_s={args.max_seconds + 60}"]
    rows = []
    with ServerProcess(CONFIG, ["--run", args.run, "-o", *overrides], log_path=log) as server:
        print(server.banner)
        for variant in ("baseline", "candidate"):
            def headers(client_index, index, variant=variant):
                return {"X-Variant": variant}
            asyncio.run(drive(server.url, pages, args.workers, 2 * args.workers, args.max_seconds, headers,
                              f"warm-up {variant}"))
            for clients in levels:
                results, wall = asyncio.run(drive(server.url, pages, clients, args.requests, args.max_seconds, headers,
                                                  f"{variant} x{clients}"))
                rows.append(level_row(variant, clients, results, wall))
    return rows


def shadow_agreement(args, pages, log):
    """Every page once through a server with shadow on (baseline answers): the guardrail windows' agreements."""
    overrides = variant_overrides(args) + ["Routing.shadow=true", "Routing.canary_share=0",
                                           "Routing.auto_promote=false", f"Routing.shadow_queue={len(pages)}",
                                           f"Guardrails.window={len(pages)}", f"Limits.max_queue={len(pages)}"]
    with ServerProcess(CONFIG, ["--run", args.run, "-o", *overrides], log_path=log) as server:
        asyncio.run(drive(server.url, pages, 1, len(pages), args.max_seconds * 10, lambda c, i: {}, "shadow"))
        with httpx.Client(base_url=server.url, timeout=60) as client:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                status = client.get("/status").json()
                if status["shadow"]["compared"] + status["shadow"]["skipped"] >= len(pages):
                    break
                time.sleep(0.2)
    return status


# ------------------------------------------------------------------------------------------------ drill

def drill(args, pages, log):
    from export.serving.drill import perturbed_copy

    work = tempfile.mkdtemp(prefix="serve-drill-")
    try:
        broken_rec = os.path.join(work, "rec")
        delivered = os.path.join(args.run, "delivered")
        tensor = perturbed_copy(os.path.join(delivered, "rec"), broken_rec, noise_scale=1.0)
        print(f"broken candidate: {delivered}/det + a copy of {delivered}/rec with {tensor} perturbed "
              f"(noise 1.0 x its mean |weight|)")
        overrides = variant_overrides(args) + [
            "Variants.candidate.model_dir=null", f"Variants.candidate.det={os.path.join(delivered, 'det')}",
            f"Variants.candidate.rec={broken_rec}", "Routing.canary_share=0.5", "Routing.shadow=true",
            "Routing.auto_promote=false", "Routing.shadow_queue=8", "Guardrails.window=50", "Guardrails.min_samples=10",
            "Limits.max_concurrency=8", "Limits.max_queue=32", "Limits.timeout_s=120"]
        with ServerProcess(CONFIG, ["--run", args.run, "-o", *overrides], log_path=log) as server:
            print(server.banner)
            return asyncio.run(_drill(server.url, pages, args))
    finally:
        shutil.rmtree(work, ignore_errors=True)


async def _drill(url, pages, args):
    rolled_back_at, shadow_at_rollback = [], []
    answers = []  # (monotonic time, variant)

    async def watch(client, stop):
        while not stop.is_set():
            status = (await client.get("/status")).json()
            if status["routing"]["state"] == "rolled_back" and not rolled_back_at:
                rolled_back_at.append(time.monotonic())
                shadow_at_rollback.append(status["shadow"]["compared"])
            await asyncio.sleep(0.05)

    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        stop = asyncio.Event()
        watcher = asyncio.get_running_loop().create_task(watch(client, stop))
        started = time.monotonic()
        results, wall = await drive(url, pages, args.drill_clients, args.drill_requests, args.max_seconds * 10,
                                    lambda c, i: {"X-Request-Key": f"user-{c}-{i}"}, "drill",
                                    on_answer=lambda r, t: answers.append((t, r.json().get("variant"))))
        stop.set()
        await watcher
        status = (await client.get("/status")).json()
        metrics = (await client.get("/metrics")).text
    codes = collections.Counter(status_code for status_code, _, _ in results)
    rollbacks = [e for e in status["events"] if e["action"] == "rollback"]
    print(f"{len(results)} requests in {wall:.1f} s from {args.drill_clients} clients: status codes {dict(codes)}")
    if rollbacks:
        at = rolled_back_at[0] if rolled_back_at else started
        before = sum(1 for t, v in answers if v == "candidate" and t < at)
        after = sum(1 for t, v in answers if v == "candidate" and t >= at)
        print(f"rollback {at - started:.1f} s after the first request, after {shadow_at_rollback[0] if shadow_at_rollback else '?'} "
              f"shadow comparisons: {rollbacks[0]['reason']}")
        print(f"candidate answers: {before} before the rollback, {after} after it (requests already on the "
              f"candidate, finished there); share now {status['routing']['candidate_share']}")
    print("metrics: " + "; ".join(line for line in metrics.splitlines()
                                  if line.startswith(("ocr_rollbacks_total", "ocr_candidate_share",
                                                      "ocr_shadow_agreement_window"))))
    failed = sum(n for code, n in codes.items() if code != 200)
    ok = failed == 0 and bool(rollbacks)
    print(f"drill {'passed' if ok else 'FAILED'}: {failed} failed requests, {len(rollbacks)} rollback(s)")
    return 0 if ok else 1


def main():
    args = parse_args()
    pages = read_pages(args.images)
    log = args.log or tempfile.mkstemp(prefix="bench-serve-", suffix=".log")[1]
    info = machine_info()
    print(f"{info.get('cpu_model')}, {os.cpu_count()} CPUs; run {args.run}; {len(pages)} pages from {args.images}; "
          f"server log {log}")
    if args.drill:
        return drill(args, pages, log)
    rows = load_table(args, pages, log)
    print(f"\n{args.workers} worker(s) x {args.threads} thread(s) per variant; at most {args.requests} requests and "
          f"{args.max_seconds:g} s per row; client-side latency (send to whole answer)\n")
    print_table(rows)
    status = shadow_agreement(args, pages, log)
    checks = {check["name"]: check for check in status["guardrails"]["checks"]}
    print(f"\nshadow agreement of the candidate with the baseline over {len(pages)} pages (answered by the baseline): "
          f"det {checks['det_agreement']['value']:.3f} ({checks['det_agreement']['samples']} pages), rec "
          f"{checks['rec_agreement']['value']:.3f} ({checks['rec_agreement']['samples']} pages with matched lines); "
          f"p99 inference ms baseline {status['guardrails']['p99_ms']['baseline']:.0f}, candidate "
          f"{status['guardrails']['p99_ms']['candidate']:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
