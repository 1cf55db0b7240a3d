"""The predictor's hot-path shortcuts change nothing it predicts, learns, links or records.

Two checks. A golden digest: seeded, varied traffic (tagged, session and untagged calls, fan-outs,
calls linked by prompt, task text, quoted response and automaton, odd role and fingerprint names,
idle workflows ended by the tick or by observe, a persisting and a live-sharing store) is driven
through a predictor, and every prediction, the learned models, the live table and everything sent
to the store are hashed; the digest was taken from the code before the shortcuts. And differential
tests of each shortcut against the general path it stands for.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import asdict
from typing import Any

import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from pools.build_info import loaded_build
from predictor.api import Predictor, _common_prefix, _round4
from predictor.fingerprint import message_fingerprints, output_fingerprint
from predictor.live import LiveTable, LiveWorkflow
from predictor.model import AppModel
from predictor.settings import PredictorSettings
from predictor.sketch import bucket_of
from predictor.store import SnapshotSink
from predictor.types import Outcome, Prediction, RequestFeatures, Tags

BLOCK = 256


def _hashes(text: str) -> tuple[int, ...]:
    """Chained block hashes, as pools.prefix_hash makes them (kept here so this test stands alone)."""
    out: list[int] = []
    h = 0
    for i in range(0, len(text), BLOCK):
        h = xxhash.xxh3_64_intdigest(text[i:i + BLOCK].encode(), seed=h)
        out.append(h)
    return tuple(out)


class RecordingStore:
    """Persists nothing but remembers every call the predictor makes to it, in order (a Store of
    its own, not a MemoryStore subclass: the compiled build's classes cannot be subclassed)."""

    def __init__(self, shares_live: bool = False) -> None:
        self.shares_live = shares_live
        self.log: list[tuple[Any, ...]] = []
        self.finishing: list[tuple[str, str]] = []

    def record(self, app: str, key: str, delta: float) -> None:
        self.log.append(("record", app, key, delta))

    def record_text(self, app: str, role: str, text: str) -> None:
        self.log.append(("text", app, role, text))

    def record_live(self, app: str, wid: str, state: dict[str, Any]) -> None:
        self.log.append(("live", app, wid, state))

    def want_live(self, app: str, wid: str) -> None:
        self.log.append(("want", app, wid))

    def end_live(self, app: str, wid: str, calls: int) -> None:
        self.log.append(("end", app, wid, calls))

    def check_finish(self, app: str, wid: str, calls: int) -> None:
        self.log.append(("check", app, wid, calls))
        self.finishing.append((app, wid))

    async def start(self, sink: SnapshotSink) -> None:
        return None

    async def stop(self) -> None:
        return None

    def stats(self) -> dict[str, float]:
        return {}


ROLES = ("planner", "searcher", "writer", "coder", "tester", "r|x", "nosys-role")
SYSTEMS = {r: f"You are the {r}. " * (3 + 7 * i) for i, r in enumerate(ROLES) if r != "nosys-role"}
FLOW = {"planner": ("searcher", "coder"), "searcher": ("writer", "searcher"), "writer": ("planner", "tester"),
        "coder": ("tester",), "tester": ("coder", "r|x", "writer"), "r|x": ("planner",), "nosys-role": ("writer",)}


def _features(rng: random.Random, role: str, task: str, step_text: str, quote: str, t: float) -> RequestFeatures:
    system = SYSTEMS.get(role, "")
    msgs: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    msgs.append({"role": "user", "content": task + step_text})
    if quote:
        msgs.append({"role": "assistant", "content": quote})
        msgs.append({"role": "user", "content": "go on"})
    content = "".join(f"<|{m['role']}|>{m['content']}" for m in msgs if m["role"] != "system")
    text = (f"<|system|>{system}" if system else "") + content
    fp = xxhash.xxh3_64_hexdigest(system.encode()) if system else ""
    if fp and rng.random() < 0.02:
        fp = "odd|" + fp[:6]  # a fingerprint whose key does not parse back
    return RequestFeatures(model="m", prompt_tokens=len(text) // 4, max_tokens=rng.choice((None, 64, 512)),
                           system_fingerprint=fp, prefix_hashes=_hashes(text), system_prompt=system,
                           arrival_s=t, messages=tuple(msgs),
                           content_hashes=_hashes(content) if rng.random() < 0.8 else (),
                           message_fingerprints=message_fingerprints(msgs) if rng.random() < 0.8 else ())


def _loose(x: Any) -> Any:
    """`x` with every number a float: the compiled build stores an int passed as a `float` as a float."""
    if x is None or isinstance(x, (bool, str)):
        return x
    if isinstance(x, (int, float)):
        return float(x) if abs(x) < 2**53 else x  # (block hashes stay exact)
    if isinstance(x, dict):
        return {_loose(k): _loose(v) for k, v in x.items()}
    if isinstance(x, tuple):
        return tuple(_loose(v) for v in x)
    if isinstance(x, list):
        return [_loose(v) for v in x]
    return x


class _Digest:
    """Two digests of the same values: exact (types included) and loose (numbers as floats)."""

    def __init__(self) -> None:
        self.exact = hashlib.sha256()
        self.loose = hashlib.sha256()

    def update(self, obj: Any) -> None:
        self.exact.update(repr(obj).encode())
        self.loose.update(repr(_loose(obj)).encode())

    def result(self) -> tuple[str, str]:
        return self.exact.hexdigest()[:16], self.loose.hexdigest()[:16]


def _drive(seed: int, store: RecordingStore, calls: int, ticker: bool) -> tuple[str, str]:
    rng = random.Random(seed)
    p = Predictor(store, PredictorSettings(workflow_idle_s=20.0, max_roles_per_app=6, max_apps=3, min_workflows=2))
    p._token = "tok-"  # untagged ids are unique per process (pid, random): fixed here
    digest = _Digest()
    t = 100.0
    flows: list[dict[str, Any]] = []
    pending: list[tuple[Tags, RequestFeatures, Prediction, str]] = []
    n = 0
    while n < calls:
        t += rng.choice((0.01, 0.2, 1.0, 3.0, 7.0)) if rng.random() < 0.97 else 45.0
        if ticker and rng.random() < 0.2:
            digest.update(("tick", p.tick(t)))
            while store.finishing:
                app, wid = store.finishing.pop(0)
                p.finish_checked(app, wid, rng.random() < 0.8)
        if not flows or rng.random() < 0.15:
            app = rng.choice(("research", "code", "", "chat"))
            flows.append({"app": app, "id": f"w{n}", "role": rng.choice(ROLES), "task": f"task {n} " * rng.randint(5, 90),
                          "mode": rng.choice(("tagged", "agent", "session", "untagged", "untagged")), "quote": "",
                          "step": 0})
        fl = rng.choice(flows[-12:])
        if rng.random() < 0.6:
            fl["role"] = rng.choice(FLOW[fl["role"]])
            fl["step"] += 1
        width = rng.choice((1, 1, 1, 2, 4))
        batch = []
        for j in range(width):
            f = _features(rng, fl["role"], fl["task"], f"step {fl['step']} part {j} " * rng.randint(0, 40),
                          fl["quote"] if rng.random() < 0.7 else "", t)
            mode = fl["mode"]
            tags = (Tags(app=fl["app"], workflow=fl["id"], agent=fl["role"]) if mode == "tagged"
                    else Tags(app=fl["app"], agent=fl["role"]) if mode == "agent"
                    else Tags(app=fl["app"], session=fl["id"]) if mode == "session" else Tags())
            pr = p.predict(tags, f, t)
            digest.update(asdict(pr))
            batch.append((tags, f, pr, fl["id"]))
            n += 1
        pending.extend(batch)
        rng.shuffle(pending)
        keep = rng.randint(0, min(3, len(pending)))
        while len(pending) > keep:
            tags, f, pr, wid = pending.pop()
            reply = f"answer of {wid} at {n} " * rng.randint(1, 12)
            fl_quote = next((x for x in flows if x["id"] == wid), None)
            if fl_quote is not None:
                fl_quote["quote"] = reply
            done = t + rng.choice((0.0, 0.05, 0.5, 2.0))
            out = Outcome(ok=True, prompt_tokens=rng.choice((0, f.prompt_tokens, f.prompt_tokens + 3)),
                          output_tokens=rng.choice((0, 1, 7, 130, 2000)), finished_s=rng.choice((done, done, 0.0)),
                          output_fingerprint=output_fingerprint(reply) if rng.random() < 0.7 else "")
            p.observe(tags, f, pr, out)
    for model in p.models.values():
        state = asdict(model)
        state.pop("keys", None)  # a cache of key strings, not learned state
        digest.update(state)
    live = p.live
    digest.update([(k, asdict(w)) for k, w in live.flows.items()])
    digest.update((live.hash_index, live.content_index, live.message_index))
    digest.update((p.fp_index, p.counters, sorted(p._finishing)))
    digest.update(store.log)
    return digest.result()


# (exact, loose) sha256 prefixes taken from the interpreted code before the hot-path shortcuts
# (predictor at commit 8683110); the compiled build is held to the loose ones
GOLDEN = {
    (1, False, False): ("8a0812ca6c35df07", "728b16f8dc75cb25"),
    (2, True, False): ("8bc1996a828cde36", "9d182f2deecd7e77"),
    (3, True, True): ("2166cfba0ae7cf42", "eb7b787407d5ac81"),
}


def test_varied_traffic_predicts_learns_and_records_as_before() -> None:
    got = {key: _drive(key[0], RecordingStore(shares_live=key[2]), 1500, ticker=key[1]) for key in GOLDEN}
    if loaded_build() == "compiled":
        assert {k: v[1] for k, v in got.items()} == {k: v[1] for k, v in GOLDEN.items()}
    else:
        assert got == GOLDEN


def test_learn_call_and_friends_equal_the_keys_they_stand_for() -> None:
    fast, general = AppModel("a"), AppModel("a")
    rng = random.Random(7)
    for _ in range(300):
        role = rng.choice(("planner", "coder", "", "$end"))
        out, prompt = rng.choice((0, 1, 5, 900)), rng.choice((0, 17, 4000))
        keys = fast.role_keys(role)
        assert keys is not None
        fast.learn_call(keys, bucket_of(out), out, bucket_of(prompt), prompt)
        for key, delta in ((f"C|{role}", 1.0), (f"O|{role}|{bucket_of(out)}", 1.0), (f"OS|{role}", out),
                           (f"P|{role}|{bucket_of(prompt)}", 1.0), (f"PS|{role}", prompt)):
            general.apply(key, delta)
        fp = rng.choice(("ab12", "cd34"))
        assert fast.learn_fingerprint(keys, fp) == f"FP|{role}|{fp}"
        general.apply(f"FP|{role}|{fp}", 1.0)
        share = rng.random() * 4
        fast.learn_context(keys, share)
        general.apply(f"X|{role}", share)
        general.apply(f"XN|{role}", 1.0)
    a, b = asdict(fast), asdict(general)
    a.pop("keys")
    b.pop("keys")
    assert a == b
    assert list(fast.counts) == list(general.counts) and list(fast.roles) == list(general.roles)
    assert fast.role_keys("r|x") is None  # its keys parse as role "r": left to apply
    keys = fast.role_keys("coder")
    assert keys is not None and fast.learn_fingerprint(keys, "f|g") is None


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["planner", "coder", ""]), st.integers(1, 12), st.integers(0, 40),
                          st.integers(0, 5000), st.integers(0, 100_000)), max_size=20))
def test_learn_remaining_equals_the_keys_it_stands_for(steps: list[tuple[str, int, int, int, int]]) -> None:
    fast, general = AppModel("a"), AppModel("a")
    for role, k, calls, out, growth in steps:
        keys = fast.learn_remaining(role, k, calls, out, growth)
        expected = []
        for kind, value in (("R", calls), ("Q", out), ("G", growth)):
            expected += [(f"{kind}|{role}|{k}|{bucket_of(value)}", 1.0), (f"{kind}S|{role}|{k}", value)]
        for key, delta in expected:
            general.apply(key, delta)
        assert list(keys) == [key for key, _ in expected]
    a, b = asdict(fast), asdict(general)
    a.pop("keys")
    b.pop("keys")
    assert a == b
    assert list(fast.counts) == list(general.counts) and list(fast.states) == list(general.states)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.floats(), st.integers(-5, 5), st.sampled_from([0.0, -0.0, 1.0, 0.12345, 0.99995])),
                max_size=30))
def test_round4_equals_round(xs: list[float]) -> None:
    memo: dict[float, float] = {}
    compiled = loaded_build() == "compiled"  # (which takes an int argument of a `float` as a float)
    for x in xs + xs:  # every value twice: the second answer comes from the memo
        got, want = _round4(memo, x), round(float(x) if compiled else x, 4)
        assert repr(got) == repr(want) and type(got) is type(want)


def _reference_common_prefix(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[mid - 1] == b[mid - 1]:
            lo = mid
        else:
            hi = mid - 1
    return lo


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 3), max_size=12), st.lists(st.integers(0, 3), max_size=12), st.booleans())
def test_common_prefix_equals_the_binary_search(a: list[int], b: list[int], same: bool) -> None:
    x, y = tuple(a), tuple(a) if same else tuple(b)
    assert _common_prefix(x, y) == _reference_common_prefix(x, y)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 100), st.integers(0, 2)), max_size=12), st.floats(0, 300),
       st.integers(1, 4))
def test_expired_returns_and_removes_the_same_workflows(flows: list[tuple[float, int]], now: float,
                                                        limit: int) -> None:
    table = LiveTable()
    for i, (seen, running) in enumerate(flows):
        table.add(LiveWorkflow(app="a", wid=str(i), created=0.0, last_seen=seen, in_flight=running))
    expected = []
    for key in list(table.flows)[: limit * 4]:  # the scan as first written: at most limit * 4 entries
        wf = table.flows[key]
        if wf.last_seen + 20.0 > now:
            break
        if wf.in_flight > 0 and wf.last_seen + 200.0 > now:
            continue
        expected.append(key)
        if len(expected) >= limit:
            break
    got = table.expired(now, 20.0, limit)
    assert [(w.app, w.wid) for w in got] == expected
    assert not any(k in table.flows for k in expected)
