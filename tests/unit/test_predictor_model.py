"""The predictor learns workflows online and predicts what a user of the gateway would see next."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from predictor.api import Predictor, make_predictor
from predictor.sketch import LogSketch, bucket_of, bucket_upper
from predictor.types import Outcome, Prediction, RequestFeatures, Tags

SYSTEMS = {r: f"You are the {r}. " * 40 for r in ("planner", "searcher", "writer", "coder", "tester", "reviewer")}


def feats(role: str, body: str, max_tokens: int | None = None) -> RequestFeatures:
    """Features as the gateway would compute them: system fingerprint and chained block hashes."""
    from pools.prefix_hash import block_hashes, text_fingerprint

    system = SYSTEMS.get(role, "")
    text = f"<|system|>{system}<|user|>{body}"
    return RequestFeatures(model="m", prompt_tokens=len(text) // 4, max_tokens=max_tokens,
                           system_fingerprint=text_fingerprint(system), prefix_hashes=block_hashes(text),
                           system_prompt=system,
                           messages=({"role": "system", "content": system}, {"role": "user", "content": body}))


def run_workflow(p: Predictor, app: str, wid: str, steps: list[tuple[str, int, int]], t0: float,
                 tagged: bool = True) -> list[Prediction]:
    """Drive one workflow: steps of (role, parallel width, output tokens); returns the predictions.

    Every prompt is the role's system prompt, the workflow's task text, then text of its own."""
    t = t0
    preds = []
    task = f"task {wid or t0} " * 60
    for i, (role, width, out) in enumerate(steps):
        calls = []
        for j in range(width):
            f = feats(role, task + f"step {i} part {j} " * 30)
            tags = Tags(app=app, workflow=wid, agent=role) if tagged else Tags()
            pr = p.predict(tags, f, t)
            preds.append(pr)
            calls.append((tags, f, pr))
        t += 2.0
        for tags, f, pr in calls:
            p.observe(tags, f, pr, Outcome(ok=True, prompt_tokens=f.prompt_tokens, output_tokens=out, finished_s=t))
        t += 1.0
    return preds


def test_sketch_quantiles_are_upper_bounds_within_ten_percent_and_merge_by_adding() -> None:
    a, b = LogSketch(), LogSketch()
    for x in range(1, 1001):
        (a if x % 2 else b).add(x)
    a.merge(b)
    assert a.total == 1000
    assert 950 <= a.quantile(0.95) <= 950 * 1.1
    assert 500 <= a.quantile(0.5) <= 550
    assert math.isclose(a.mean, 500.5)
    assert bucket_upper(bucket_of(1)) == 1 and bucket_upper(bucket_of(3)) == 3


def test_cold_app_says_so_and_answers_reactively_from_the_request() -> None:
    p = make_predictor()
    pr = p.predict(Tags(app="new", workflow="w1", agent="planner"), feats("planner", "hi", max_tokens=300), 0.0)
    assert pr.cold
    assert pr.output_tokens_bound == 300
    assert pr.peak_context_tokens == pr.output_tokens_bound + feats("planner", "hi").prompt_tokens
    assert pr.role == "planner" and pr.workflow == "w1"


def test_learns_a_pipeline_with_fanout_and_predicts_next_roles_remaining_work_and_lengths() -> None:
    p = make_predictor(workflow_idle_s=10.0)
    steps = [("planner", 1, 300), ("searcher", 4, 500), ("writer", 1, 1500)]
    for n in range(12):
        run_workflow(p, "research", f"w{n}", steps, t0=n * 100.0)
    preds = run_workflow(p, "research", "live", steps, t0=5000.0)
    planner, first_searcher, last_searcher, writer = preds[0], preds[1], preds[4], preds[5]
    assert not planner.cold
    assert planner.next_roles[0].role == "searcher"
    assert planner.next_roles[0].probability == pytest.approx(1.0)
    assert planner.next_roles[0].fanout == pytest.approx(4.0)
    assert planner.remaining_steps == pytest.approx(5.0, abs=0.01)  # 4 searchers + writer
    assert first_searcher.remaining_steps == pytest.approx(4.0, abs=0.01)  # 3 siblings + writer
    assert last_searcher.remaining_steps == pytest.approx(1.0, abs=0.01)
    assert writer.next_roles == () and writer.remaining_steps == pytest.approx(0.0)
    assert 500 <= first_searcher.output_tokens_bound <= 550
    assert planner.remaining_output_tokens == pytest.approx(4 * 500 + 1500, rel=0.01)
    # the next call's prefix: the searcher's fixed system prompt, which we have seen
    assert planner.next_prefix_messages[0] == {"role": "system", "content": SYSTEMS["searcher"]}
    assert planner.next_prefix_confidence > 0.9
    model = p.model_json("research")
    assert model["roles"]["searcher"]["fanout"] == {"4": 12.0}  # the live one has not ended yet
    assert model["start"] == {"planner": 1.0} and model["end"] == {"writer": 1.0}


def test_rare_transitions_are_pruned_from_predictions_but_kept_in_the_counts() -> None:
    p = make_predictor(workflow_idle_s=10.0)
    for n in range(40):
        second = "tester" if n == 7 else "writer"  # 1 in 40 = 2.5% < 5%
        run_workflow(p, "app", f"w{n}", [("planner", 1, 100), (second, 1, 100)], t0=n * 100.0)
    pr = run_workflow(p, "app", "live", [("planner", 1, 100)], t0=9000.0)[0]
    assert [n.role for n in pr.next_roles] == ["writer"]
    trans = p.model_json("app")["roles"]["planner"]["transitions"]
    assert trans["tester"]["count"] == 1.0 and trans["tester"]["pruned"] is True
    assert trans["writer"]["pruned"] is False


def test_loop_counts_predict_when_a_retry_loop_stops() -> None:
    p = make_predictor(workflow_idle_s=10.0)
    loop = [("planner", 1, 100)] + [("coder", 1, 300), ("tester", 1, 100)] * 3 + [("reviewer", 1, 200)]
    for n in range(10):
        run_workflow(p, "code", f"w{n}", loop, t0=n * 100.0)
    preds = run_workflow(p, "code", "live", loop, t0=5000.0)
    testers = [pr for pr in preds if pr.role == "tester"]
    assert [t.next_roles[0].role for t in testers] == ["coder", "coder", "reviewer"]
    assert [round(t.remaining_steps) for t in testers] == [5, 3, 1]
    assert p.model_json("code")["roles"]["coder"]["visits_per_workflow"] == {"3": 10.0}


def test_untagged_calls_get_their_role_from_the_system_prompt_and_their_workflow_from_the_prompt() -> None:
    p = make_predictor(workflow_idle_s=10.0)
    steps = [("planner", 1, 300), ("searcher", 3, 500), ("writer", 1, 800)]
    for n in range(6):
        run_workflow(p, "research", f"w{n}", steps, t0=n * 100.0)
    preds = run_workflow(p, "", "", steps, t0=5000.0, tagged=False)
    assert [pr.role for pr in preds] == ["planner", "searcher", "searcher", "searcher", "writer"]
    assert all(pr.role_inferred and pr.workflow_linked for pr in preds)
    assert len({pr.workflow for pr in preds}) == 1  # all five calls linked into one workflow
    assert not preds[0].cold and preds[0].next_roles[0].role == "searcher"


def test_a_chat_turn_that_continues_the_last_prompt_is_linked_even_among_many_conversations() -> None:
    p = make_predictor(workflow_idle_s=60.0)
    convs = {c: f"conversation {c} " * 80 for c in range(5)}
    first = {c: p.predict(Tags(), feats("", convs[c]), 0.0) for c in convs}
    for c, pr in first.items():
        p.observe(Tags(), feats("", convs[c]), pr, Outcome(True, 100, 50, finished_s=1.0))
    follow = p.predict(Tags(), feats("", convs[3] + " and the next question " * 30), 5.0)
    assert follow.workflow == first[3].workflow
    assert len({pr.workflow for pr in first.values()}) == 5


def test_garbage_never_raises_and_gives_a_cold_prediction() -> None:
    p = make_predictor()
    bad = RequestFeatures(model="m", prompt_tokens=-5, max_tokens=None, prefix_hashes=(1, 2, 3))
    pr = p.predict(Tags(app="a"), bad, float("nan"))
    p.observe(Tags(app="a"), bad, Prediction(workflow="nope", step=99), Outcome(False, -1, -1))
    p.observe(Tags(), bad, pr, Outcome(True, 0, 0))
    assert isinstance(pr, Prediction)
    assert "a" in p.apps()


def test_unknown_setting_is_rejected_with_its_name() -> None:
    with pytest.raises(ValueError, match="prune_shar"):
        make_predictor(prune_shar=0.1)


@given(st.lists(st.integers(min_value=1, max_value=200_000), min_size=1, max_size=400),
       st.sampled_from([0.5, 0.9, 0.95, 0.99]))
def test_sketch_quantile_is_within_one_bucket_of_the_exact_quantile(values: list[int], q: float) -> None:
    sk = LogSketch()
    for v in values:
        sk.add(v)
    exact = sorted(values)[max(0, math.ceil(q * len(values)) - 1)]
    assert exact / 1.05 - 1 <= sk.quantile(q) <= exact * 1.05 + 1


def test_untagged_roles_with_other_system_prompts_link_by_the_task_text_they_share() -> None:
    from dataclasses import replace

    from pools.prefix_hash import block_hashes

    p = make_predictor(workflow_idle_s=10.0)
    t = 0.0
    ids: dict[str, set[str]] = {}
    for wf in ("alpha", "beta"):  # two workflows in flight at once, never tagged, nothing learned yet
        for role in ("planner", "writer"):
            body = f"the task of workflow {wf} " * 40 + f" and what the {role} adds " * 10
            f = replace(feats(role, body), content_hashes=block_hashes(f"<|user|>{body}"))
            pr = p.predict(Tags(), f, t)
            p.observe(Tags(), f, pr, Outcome(True, f.prompt_tokens, 100, finished_s=t + 1))
            ids.setdefault(wf, set()).add(pr.workflow)
            t += 2.0
    assert len(ids["alpha"]) == 1 and len(ids["beta"]) == 1 and ids["alpha"] != ids["beta"]
    assert p.counters["linked_content"] == 2


def test_the_next_prefix_carries_the_conversation_when_the_next_turn_continues_the_prompt() -> None:
    p = make_predictor(workflow_idle_s=10.0)

    def conversation(cid: str, turns: int, t: float) -> Prediction:
        body = ""
        pr = Prediction()
        for turn in range(turns):
            body += f"user {cid} asks question {turn} " * 20  # each turn resends the whole conversation
            tags, f = Tags(app="chat", session=cid, agent="writer"), feats("writer", body)
            pr = p.predict(tags, f, t)
            p.observe(tags, f, pr, Outcome(True, f.prompt_tokens, 100, finished_s=t + 1))
            t += 3.0
        return pr

    for n in range(5):
        conversation(f"c{n}", 4, n * 100.0)
    pr = conversation("live", 1, 9000.0)
    assert pr.workflow == "session:live"
    assert pr.next_roles[0].role == "writer"
    assert pr.next_prefix_messages == ({"role": "system", "content": SYSTEMS["writer"]},
                                       {"role": "user", "content": "user live asks question 0 " * 20})
    assert pr.next_prefix_confidence > 0.5
    assert p.model_json("chat")["roles"]["writer"]["transitions"]["writer"]["prefix_kept"] > 0.9


def test_tick_ends_idle_workflows_and_learns_their_end() -> None:
    p = make_predictor(workflow_idle_s=10.0, min_workflows=1)
    run_workflow(p, "app", "w", [("planner", 1, 100), ("writer", 1, 100)], t0=0.0)
    assert p.model_json("app")["workflows_finished"] == 0.0
    assert p.tick(5.0) == 0  # not idle long enough
    assert p.tick(100.0) == 1
    model = p.model_json("app")
    assert model["workflows_finished"] == 1.0 and model["end"] == {"writer": 1.0}


def test_names_from_clients_are_bounded_so_memory_is() -> None:
    from pools.prefix_hash import text_fingerprint

    p = make_predictor(max_apps=2, max_roles_per_app=3, max_fingerprints_per_role=2)
    for i in range(10):  # a system prompt that changes on every call (a timestamp in it, say)
        system = f"You are a helpful assistant. Today is day {i}."
        f = RequestFeatures(model="m", prompt_tokens=10, max_tokens=None, system_prompt=system,
                            system_fingerprint=text_fingerprint(system))
        for tags in (Tags(app=f"app{i}"), Tags(app="app0"), Tags(app="app0", agent="bot")):
            p.observe(tags, f, p.predict(tags, f, float(i)), Outcome(True, 10, 5))
    assert p.apps() == ["_other", "app0", "app1"]
    model = p.model_json("app0")
    assert len(model["roles"]) == 4 and "_other" in model["roles"] and "bot" in model["roles"]
    assert sum(1 for k in p.models["app0"].counts if k.startswith("FP|bot|")) == 2


def test_an_untagged_call_that_quotes_a_response_joins_that_responses_workflow() -> None:
    from dataclasses import replace

    from predictor.fingerprint import message_fingerprints, output_fingerprint

    p = make_predictor(workflow_idle_s=10.0)
    answers = {wf: f"the patch written for workflow {wf}: " + "diff line " * 40 for wf in ("a", "b")}
    coder_ids = {}
    for wf in ("a", "b"):  # two coders answer, untagged, nothing learned yet
        f = feats("coder", f"implement feature {wf} " * 40)
        pr = p.predict(Tags(), f, 0.0)
        p.observe(Tags(), f, pr, Outcome(True, f.prompt_tokens, 200, finished_s=1.0,
                                         output_fingerprint=output_fingerprint(answers[wf])))
        coder_ids[wf] = pr.workflow
    # a tester quotes coder b's answer behind its own system prompt: no shared prefix, no shared task
    msgs = ({"role": "system", "content": SYSTEMS["tester"]}, {"role": "user", "content": answers["b"]},
            {"role": "user", "content": "test log: " + "FAILED " * 30})
    f = replace(feats("tester", answers["b"]), messages=msgs, message_fingerprints=message_fingerprints(msgs))
    pr = p.predict(Tags(), f, 3.0)
    assert pr.workflow == coder_ids["b"] != coder_ids["a"]
    assert p.counters["linked_message"] == 1


def test_likely_peak_follows_the_typical_workflow_and_the_bound_the_rare_long_one() -> None:
    p = make_predictor(workflow_idle_s=10.0)
    for n in range(40):  # one workflow in ten ends with a very long answer
        run_workflow(p, "rare", f"w{n}", [("planner", 1, 300), ("writer", 1, 20_000 if n % 10 == 0 else 200)], t0=n * 100.0)
    planner = run_workflow(p, "rare", "live", [("planner", 1, 300), ("writer", 1, 200)], t0=9000.0)[0]
    assert not planner.cold
    assert planner.peak_context_tokens > 20_000  # the bound covers the rare long answer
    assert planner.peak_context_likely_tokens < 5_000  # the likely peak is the usual short one
