"""The Redis store with a real redis-server on loopback: sharing, separate processes, kill and restart."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from predictor.api import Predictor, make_predictor
from tests.unit.test_predictor_model import run_workflow

REPO = Path(__file__).resolve().parents[2]
FAST = {"flush_interval_s": 0.05, "refresh_interval_s": 0.1, "redis_timeout_s": 0.3, "workflow_idle_s": 5.0,
        "error_log_interval_s": 1.0}
STEPS = [("planner", 1, 300), ("searcher", 3, 500), ("writer", 1, 1200)]

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RedisServer:
    port: int
    workdir: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_timeout=0.5)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                return
            except redis.exceptions.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=5)

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=1, decode_responses=True)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(free_port(), tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.kill()


async def wait_until(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


def finished(p: Predictor, app: str) -> float:
    return float(p.model_json(app)["workflows_finished"])


async def test_a_second_predictor_starts_warm_from_what_the_first_learned(
        redis_server: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    a = make_predictor(redis_server.url, "t1:", **FAST)
    await a.start()
    for n in range(5):
        run_workflow(a, "research", f"w{n}", STEPS, t0=n * 100.0)
    a.tick(10_000.0)
    await wait_until(lambda: a.stats()["redis_pending_counters"] == 0)
    await a.stop()
    # a new app's first model in Redis is no lost one: no restore counted, no warning logged
    assert a.stats()["redis_restores"] == 0
    assert not [r for r in caplog.records if "missing" in r.getMessage()]
    keys = redis_server.client().hkeys("t1:model:research")
    assert "T|planner|1|searcher" in keys  # the automaton lives in a Redis hash under the prefix
    b = make_predictor(redis_server.url, "t1:", **FAST)
    await b.start()
    try:
        assert finished(b, "research") == 5
        pr = run_workflow(b, "research", "new", STEPS[:1], t0=50_000.0)[0]
        assert not pr.cold and pr.next_roles[0].role == "searcher"
        assert b.model_json("research")["roles"]["searcher"]["fanout"] == {"3": 5.0}
    finally:
        await b.stop()


WORKER = """
import asyncio, json, sys, time
from predictor.api import make_predictor
from tests.unit.test_predictor_model import run_workflow
STEPS = [("planner", 1, 300), ("searcher", 3, 500), ("writer", 1, 1200)]
async def main(url, name, n, expect):
    p = make_predictor(url, "t2:", flush_interval_s=0.05, refresh_interval_s=0.1, workflow_idle_s=5.0)
    await p.start()
    for i in range(n):
        run_workflow(p, "shared", f"{name}-{i}", STEPS, t0=i * 100.0)
    p.tick(10_000.0)
    deadline = time.monotonic() + 15
    while p.model_json("shared")["workflows_finished"] < expect and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    out = p.model_json("shared")
    await p.stop()
    print(json.dumps({"finished": out["workflows_finished"], "calls": out["roles"]["searcher"]["calls"]}))
asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
"""


def test_two_gateway_processes_learn_one_model_together(redis_server: RedisServer) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, redis_server.url, name, str(n), "7"], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, n in (("a", 3), ("b", 4))]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        outs.append(json.loads(out.strip().splitlines()[-1]))
    # each process saw only its own workflows, yet both models hold all seven (and 21 searcher calls)
    assert outs == [{"finished": 7.0, "calls": 21.0}, {"finished": 7.0, "calls": 21.0}]
    stored = redis_server.client().hgetall("t2:model:shared")
    assert float(stored["S|planner"]) == 7.0


async def test_redis_killed_and_restarted_under_traffic_never_fails_a_call_and_learning_resumes(
        redis_server: RedisServer) -> None:
    p = make_predictor(redis_server.url, "t3:", **FAST)
    await p.start()
    n = 0
    t = 0.0

    async def traffic(count: int) -> None:
        nonlocal n, t
        for _ in range(count):
            run_workflow(p, "app", f"w{n}", STEPS, t0=t)  # raises if predict/observe ever raised
            n += 1
            t += 100.0
            p.tick(t)
            await asyncio.sleep(0.02)

    try:
        await traffic(5)
        await wait_until(lambda: p.stats()["redis_pending_counters"] == 0)
        before = finished(p, "app")
        redis_server.kill()  # SIGKILL: no save, the data is gone
        await traffic(20)
        assert p.stats()["redis_errors"] > 0
        assert p.stats()["predictor_errors"] == 0  # no call failed or went reactive because of Redis
        assert finished(p, "app") >= before + 15  # still learning from its own traffic meanwhile
        redis_server.start()
        await traffic(5)
        client = redis_server.client()

        def caught_up() -> bool:
            stored = client.hgetall("t3:model:app")
            return float(stored.get("S|planner", 0)) >= 30  # restored history plus what came since
        await wait_until(caught_up)
        assert p.stats()["redis_restores"] >= 1
        pr = run_workflow(p, "app", "after", STEPS[:1], t0=t + 100)[0]
        assert not pr.cold and pr.next_roles[0].role == "searcher"
    finally:
        await p.stop()


async def test_pythia_model_show_prints_the_json_model_and_draws_the_automaton(
        redis_server: RedisServer, tmp_path: Path) -> None:
    p = make_predictor(redis_server.url, "t4:", **FAST)
    await p.start()
    loop = [("planner", 1, 100), ("coder", 1, 300), ("tester", 1, 100), ("coder", 1, 300), ("tester", 1, 100)]
    for n in range(4):
        run_workflow(p, "code", f"w{n}", loop, t0=n * 100.0)
    p.tick(10_000.0)
    await wait_until(lambda: p.stats()["redis_pending_counters"] == 0)
    await p.stop()
    png = tmp_path / "code.png"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, "-m", "gateway.cli", "model", "show", "code", "--png", str(png),
                          "--redis-url", redis_server.url, "--key-prefix", "t4:"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    model = json.loads(res.stdout)
    assert model["workflows_finished"] == 4.0
    assert model["roles"]["tester"]["transitions"]["coder"]["count"] == 4.0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    missing = subprocess.run([sys.executable, "-m", "gateway.cli", "model", "show", "nope",
                              "--redis-url", redis_server.url, "--key-prefix", "t4:"],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert missing.returncode == 1 and "known apps: code" in missing.stderr


async def test_a_workflow_whose_calls_land_on_two_gateway_processes_is_learned_as_one(
        redis_server: RedisServer) -> None:
    from predictor.types import Outcome, Tags
    from tests.unit.test_predictor_model import feats

    a = make_predictor(redis_server.url, "t5:", **FAST)
    b = make_predictor(redis_server.url, "t5:", **FAST)
    await a.start()
    await b.start()
    try:
        def call(p: Predictor, role: str, t: float) -> None:
            tags, f = Tags(app="split", workflow="w1", agent=role), feats(role, f"task w1 {role} " * 50)
            pr = p.predict(tags, f, t)
            p.observe(tags, f, pr, Outcome(True, f.prompt_tokens, 100, finished_s=t + 1))

        call(a, "planner", 0.0)  # gateway process A serves the first step
        await wait_until(lambda: a.stats()["redis_pending_counters"] == 0)
        await asyncio.sleep(0.2)  # A's live-workflow state is in Redis now
        tags, f = Tags(app="split", workflow="w1", agent="searcher"), feats("searcher", "task w1 search " * 50)
        pr = b.predict(tags, f, 3.0)  # process B has never seen w1: it fetches A's steps in the background
        await wait_until(lambda: b.stats()["redis_live_merged"] >= 1)
        b.observe(tags, f, pr, Outcome(True, f.prompt_tokens, 100, finished_s=4.0))
        call(b, "writer", 6.0)
        b.tick(1_000.0)
        await wait_until(lambda: b.stats()["redis_pending_counters"] == 0)
        stored = redis_server.client().hgetall("t5:model:split")
        # B recorded the planner -> searcher transition it never saw, and the whole workflow's length
        assert float(stored["T|planner|1|searcher"]) == 1.0
        assert float(stored["T|searcher|1|writer"]) == 1.0
        assert float(stored["S|planner"]) == 1.0 and "S|searcher" not in stored
        assert float(stored["LS"]) == 3.0
    finally:
        await a.stop()
        await b.stop()


async def test_a_hung_redis_slows_nothing_and_its_queued_writes_arrive_when_it_answers_again(
        redis_server: RedisServer) -> None:
    p = make_predictor(redis_server.url, "t6:", **FAST)
    await p.start()
    assert redis_server.proc is not None
    try:
        run_workflow(p, "app", "w0", STEPS, t0=0.0)
        await wait_until(lambda: p.stats()["redis_pending_counters"] == 0)
        redis_server.proc.send_signal(signal.SIGSTOP)  # accepts connections, answers nothing
        try:
            for n in range(1, 6):
                t0 = time.monotonic()
                run_workflow(p, "app", f"w{n}", STEPS, t0=n * 100.0)
                assert time.monotonic() - t0 < 0.25  # the hot path never waits on Redis (5 calls here)
                p.tick(n * 100.0 + 50)
                await asyncio.sleep(0.2)
            assert p.stats()["redis_errors"] > 0  # timeouts, counted
        finally:
            redis_server.proc.send_signal(signal.SIGCONT)

        def caught_up() -> bool:
            return float(redis_server.client().hget("t6:model:app", "S|planner") or 0) == 6.0
        await wait_until(caught_up)
        assert p.stats()["predictor_errors"] == 0
    finally:
        await p.stop()


async def test_a_refresh_reloads_only_apps_another_process_wrote(redis_server: RedisServer) -> None:
    a = make_predictor(redis_server.url, "t7:", **FAST)
    b = make_predictor(redis_server.url, "t7:", **FAST)
    await a.start()
    await b.start()
    try:
        for n in range(3):
            run_workflow(a, "quiet", f"q{n}", STEPS, t0=n * 100.0)
        a.tick(10_000.0)
        await wait_until(lambda: a.stats()["redis_pending_counters"] == 0 and a.stats()["redis_refresh_skipped"] > 0)
        skipped, generation = a.stats()["redis_refresh_skipped"], a.models["quiet"].generation
        await wait_until(lambda: a.stats()["redis_refresh_skipped"] >= skipped + 5)
        # only this process wrote the app: its model (and the views cached on it) stayed as it was
        assert a.models["quiet"].generation == generation
        for n in range(2):  # another process learns the same app: the next refresh brings it in
            run_workflow(b, "quiet", f"b{n}", STEPS, t0=20_000.0 + n * 100.0)
        b.tick(40_000.0)
        await wait_until(lambda: finished(a, "quiet") == 5)
        assert a.models["quiet"].generation > generation
    finally:
        await a.stop()
        await b.stop()
