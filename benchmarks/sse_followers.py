"""200 concurrent SSE followers of one running job: do the other routes still answer quickly?

Starts the API (uvicorn, embedded SQLite settings in a temporary folder, no
worker), inserts a job that stays `running`, opens N event streams on it, then
times GET /healthz and GET /v1/merges/{id} while every stream is connected.

    python benchmarks/sse_followers.py [--followers 200] [--requests 50]
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import uvicorn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.auth import create_api_key, create_team  # noqa: E402
from app.main import create_app  # noqa: E402
from core.db import make_engine, make_sessionmaker, migrate  # noqa: E402
from core.job_states import add_event  # noqa: E402
from core.models import Job, JobState  # noqa: E402
from core.settings import Settings  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def follow(client: httpx.AsyncClient, url: str, headers: dict[str, str], connected: asyncio.Event,
                 counter: list[int]) -> None:
    try:
        async with client.stream("GET", url, headers={**headers, "Accept": "text/event-stream"}) as stream:
            async for line in stream.aiter_lines():
                if line.startswith("id:"):
                    counter[0] += 1
                    if counter[0] >= counter[1]:
                        connected.set()
                    break  # the first stored event: this follower is connected
            await asyncio.sleep(3600)  # stay connected, as a follower of a long merge would
    except (asyncio.CancelledError, httpx.HTTPError):
        pass  # the benchmark is over


async def timed(client: httpx.AsyncClient, url: str, headers: dict[str, str], n: int) -> list[float]:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        response = await client.get(url, headers=headers)
        times.append((time.perf_counter() - t0) * 1000)
        assert response.status_code == 200, response.text
    return times


async def main(followers: int, requests: int) -> None:
    folder = Path(tempfile.mkdtemp(prefix="sse-bench-"))
    settings = Settings(data_dir=folder, housekeeping=False, broker_url=f"sqla+sqlite:///{folder / 'broker.db'}")
    migrate(settings.database_url)
    sessions = make_sessionmaker(make_engine(settings.database_url))
    with sessions() as session:
        team = create_team(session, "bench")
        _, key = create_api_key(session, team)
        job = Job(team_id=team.id, kind="merge", spec={}, request_sha256="0" * 64, state=JobState.running)
        session.add(job)
        session.flush()
        add_event(session, job.id, "state", {"state": "running"})
        session.commit()
    headers = {"Authorization": f"Bearer {key}"}
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        await asyncio.sleep(0.05)
    base = f"http://127.0.0.1:{port}"
    limits = httpx.Limits(max_connections=followers + 10)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=httpx.Timeout(60, pool=None)) as client:
        baseline = {path: await timed(client, path, headers, requests) for path in ("/healthz", f"/v1/merges/{job.id}")}
        connected, counter = asyncio.Event(), [0, followers]
        streams = [asyncio.create_task(follow(client, f"/v1/merges/{job.id}/events", headers, connected, counter))
                   for _ in range(followers)]
        await asyncio.wait_for(connected.wait(), 300)
        await asyncio.sleep(2)  # several poll rounds of every follower
        loaded = {path: await timed(client, path, headers, requests) for path in ("/healthz", f"/v1/merges/{job.id}")}
        for task in streams:
            task.cancel()
    server.should_exit = True
    print(f"{followers} SSE followers connected to one running job; {requests} sequential requests per route")
    print(f"{'route':<24} {'alone p50/p95/max ms':>22} {'with followers p50/p95/max ms':>32}")
    for path in baseline:
        name = path if path == "/healthz" else "/v1/merges/{id}"
        fmt = lambda t: f"{statistics.median(t):.1f}/{sorted(t)[int(0.95 * len(t)) - 1]:.1f}/{max(t):.1f}"  # noqa: E731
        print(f"{name:<24} {fmt(baseline[path]):>22} {fmt(loaded[path]):>32}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--followers", type=int, default=200)
    parser.add_argument("--requests", type=int, default=50)
    args = parser.parse_args()
    asyncio.run(main(args.followers, args.requests))
