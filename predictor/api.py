"""The predictor the gateway calls on every request: `predict` before routing, `observe` after the response.

Both are synchronous, in-process and never raise: a bad input or an internal error gives a
reactive (cold) prediction and is counted. Learning goes into the in-process model at once and
into the store (Redis) through a queue that a background task flushes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from predictor.live import LiveTable, LiveWorkflow, StepRec
from predictor.model import END, K_MAX, AppModel, RoleKeys, RoleStats, clean_role
from predictor.settings import PredictorSettings, build_settings
from predictor.sketch import bucket_of
from predictor.store import MemoryStore, Store
from predictor.types import NextRole, Outcome, Prediction, RequestFeatures, Tags

log = logging.getLogger("pythia.predictor")

DEFAULT_APP = "default"  # app of calls that carry no app tag and no known system prompt
NO_SYSTEM_ROLE = "nosys"  # role of untagged calls without a system prompt
OVERFLOW = "_other"  # app or role name once max_apps / max_roles_per_app are reached
SYSTEM_BLOCK_OVERHEAD = 10  # characters `flatten_messages` puts before the system prompt ("<|system|>")
BLOCK_CHARS = 256  # pools.prefix_hash.DEFAULT_BLOCK_CHARS (predictor does not import pools)


@dataclass(slots=True)
class StateView:
    """Predictions for one (role, k) state, cached until the model has moved on."""

    version: int  # role updates when computed
    support: float
    next_roles: tuple[NextRole, ...]
    top: str  # most likely next role, or END
    remaining_mean: float
    remaining_bound: int
    remaining_out_mean: float
    remaining_out_bound: int
    growth_bound: int
    remaining_support: float
    generation: int = 0
    growth_median: int = 0


@dataclass(slots=True)
class RoleView:
    """Per-role predictions, cached like StateView."""

    version: int  # role updates when computed
    generation: int
    calls: float
    out_mean: float
    out_bound: int
    fanout_mean: float
    fanout_dist: tuple[tuple[int, float], ...]
    fp_share: float


class Predictor:
    """Learns every app's workflow automaton online and predicts what each live workflow does next."""

    def __init__(self, store: Store | None = None, settings: PredictorSettings | None = None) -> None:
        self.settings = settings or PredictorSettings()
        self.store: Store = store or MemoryStore()
        self._share_live = bool(getattr(self.store, "shares_live", False))
        # MemoryStore persists nothing: skip its no-op record() on each learned counter (8 per call)
        self._persists = type(self.store) is not MemoryStore
        self.models: dict[str, AppModel] = {}
        self.live = LiveTable(self.settings.max_live_workflows)
        self.fp_index: dict[str, tuple[str, str]] = {}  # system fingerprint -> (app, role) that used it most
        self._state_views: dict[tuple[str, str, int], StateView] = {}
        self._role_views: dict[tuple[str, str], RoleView] = {}
        self._seq = 0
        self._token = f"{os.getpid() % 10000:04d}{random.randrange(1 << 16):04x}-"  # untagged ids, unique per process
        self._finishing: dict[tuple[str, str], LiveWorkflow] = {}  # waiting for Redis to say who ends them
        self._preds_cache: dict[tuple[str, str], tuple[tuple[int, int], frozenset[str]]] = {}
        self._rounded: dict[float, float] = {}  # round(x, 4) of confidences seen (see _round4)
        self.counters: dict[str, int] = {"predict": 0, "observe": 0, "errors": 0, "linked_prefix": 0,
                                         "linked_automaton": 0, "linked_content": 0, "linked_message": 0, "live_merged": 0, "new_untagged": 0, "finished": 0}
        self._last_error_log = 0.0
        self._ticker: asyncio.Task[None] | None = None
        self._last_tick = -math.inf

    # ------------------------------------------------------------------ public API

    def predict(self, tags: Tags, features: RequestFeatures, now: float) -> Prediction:
        """What this call and the rest of its workflow will do. Never raises, never waits."""
        try:
            self.counters["predict"] += 1
            return self._predict(tags, features, now)
        except Exception:
            self._error("predict")
            return _reactive(features)

    def observe(self, tags: Tags, features: RequestFeatures, prediction: Prediction, outcome: Outcome) -> None:
        """Learn from a finished call. Never raises, never waits."""
        try:
            self.counters["observe"] += 1
            self._observe(tags, features, prediction, outcome)
        except Exception:
            self._error("observe")

    async def start(self) -> None:
        """Start background work: ending idle workflows (monotonic clock) and the store's flush/refresh."""
        await self.store.start(self)
        if self._ticker is None:
            self._ticker = asyncio.create_task(self._tick_loop(), name="pythia-predictor-tick")

    async def stop(self) -> None:
        """Stop background work and flush what is queued."""
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
            self._ticker = None
        await self.store.stop()

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.tick_interval_s)
            try:
                self.tick(time.monotonic())
            except Exception:
                self._error("tick")

    def apps(self) -> list[str]:
        """Apps with a learned model."""
        return sorted(self.models)

    def model_json(self, app: str) -> dict[str, Any]:
        """The learned model of `app` as JSON (empty model when unknown)."""
        model = self.models.get(app) or AppModel(app)
        out = model.to_json(self.settings.prune_share, self.settings.bound_quantile)
        out["cold"] = self._cold(model)
        out["live_workflows"] = sum(1 for (a, _w) in self.live.flows if a == app)
        return out

    def stats(self) -> dict[str, float]:
        """Counters of the predictor and its store (for /metrics)."""
        out: dict[str, float] = {f"predictor_{k}": float(v) for k, v in self.counters.items()}
        out["predictor_live_workflows"] = float(len(self.live.flows))
        out.update(self.store.stats())
        return out

    def tick(self, now: float) -> int:
        """Background upkeep at time `now`: end idle workflows and recompute cached predictions the
        model has moved past. The started predictor runs it every `tick_interval_s`; a virtual-time
        caller runs it as its clock advances. Returns how many workflows ended."""
        n = self.end_workflows(now)
        self.refresh_views()
        return n

    def refresh_views(self) -> None:
        """Recompute the cached per-role and per-state predictions that are stale (off the hot path)."""
        for key, rv in list(self._role_views.items()):
            model = self.models.get(key[0])
            if model is not None and not self._fresh(rv.version, rv.generation, model, _updates(model, key[1])):
                self._role_views[key] = self._compute_role_view(model, key[1])
        for skey, sv in list(self._state_views.items()):
            model = self.models.get(skey[0])
            if model is not None:
                upd = _updates(model, skey[1])
                if not self._fresh(sv.version, sv.generation, model, upd):
                    v = self._compute_state_view(model, skey[1], skey[2])
                    v.version = upd
                    self._state_views[skey] = v

    def end_workflows(self, now: float) -> int:
        """End every workflow idle for `workflow_idle_s` at time `now`. Returns how many ended."""
        self._last_tick = now
        n = 0
        while True:
            done = self.live.expired(now, self.settings.workflow_idle_s, limit=1000)
            for wf in done:
                self._end(wf)
            n += len(done)
            if not done:
                return n

    # ------------------------------------------------------------------ store callbacks

    def load_snapshot(self, app: str, counts: Mapping[str, float], texts: Mapping[str, str],
                      pending: Mapping[str, float]) -> None:
        """Replace an app's model by the shared counters plus this process's unflushed ones."""
        model = AppModel(app)
        for key, value in counts.items():
            model.apply(key, value)
        for key, value in pending.items():
            model.apply(key, value)
        model.texts.update(texts)
        old = self.models.get(app)
        if old is not None:
            for role, text in old.texts.items():
                model.texts.setdefault(role, text)
            model.generation = old.generation + 1  # every cached view of this app is now stale
        self.models[app] = model
        for fp, roles in model.fp_roles.items():
            self._index_fingerprint(app, fp, roles)

    def model_counts(self, app: str) -> Mapping[str, float]:
        """The raw counters of an app's model (what the Redis store restores after a data loss)."""
        model = self.models.get(app)
        return model.counts if model is not None else {}

    def model_texts(self, app: str) -> Mapping[str, str]:
        """Role system prompts of an app."""
        model = self.models.get(app)
        return model.texts if model is not None else {}

    def merge_live(self, app: str, wid: str, state: Mapping[str, Any]) -> None:
        """Merge another gateway process's view of a workflow into this one's (Redis live state).

        Steps both views share (same roles in the same order) are kept once; the remote view's later
        steps come next, then the steps only this process has seen. Step indexes move,
        so the epoch changes and observe() finds such calls' steps by role.
        """
        wf = self.live.get(app, wid)
        remote = state.get("steps") or []
        calls = int(state.get("calls", 0))
        if wf is None or not remote or state.get("ended") or calls <= wf.remote_calls:
            return
        steps = [StepRec(role=str(s[0]), k=int(s[1]), started=float(s[2]), width=int(s[3]), observed=int(s[3]),
                         out_tokens=int(s[4]), prompt_tokens=int(s[5]), max_context=int(s[6])) for s in remote]
        wf.remote_calls = calls
        local = wf.steps
        shared = 0
        while shared < min(len(steps), len(local)) and (steps[shared].role, steps[shared].k) == (
                local[shared].role, local[shared].k):
            shared += 1
        if shared == len(steps) and all(steps[j].width <= local[j].width for j in range(shared)):
            return  # nothing this process has not seen
        i = 0
        while i < shared:
            mine, theirs = local[i], steps[i]
            theirs.width = max(theirs.width, mine.width)
            theirs.observed = max(theirs.observed, mine.observed)
            theirs.hashes = mine.hashes
            i += 1
        visits: dict[str, int] = {}
        for st in steps:
            visits[st.role] = max(visits.get(st.role, 0), st.k)
        theirs_after = {(st.role, st.k): st for st in steps[shared:]}
        for mine in local[i:]:
            same = theirs_after.get((mine.role, mine.k))
            if same is not None:  # a step both saw (calls of one fan-out on two processes): keep one
                same.width = max(same.width, mine.width)
                same.observed = min(same.width, max(same.observed, mine.observed))
                continue
            # a step only this process has seen (running, or not in Redis yet): it follows the others'
            mine.k = min(visits.get(mine.role, 0) + 1, K_MAX)
            visits[mine.role] = mine.k
            steps.append(mine)
        wf.steps = steps
        wf.visits = visits
        wf.epoch += 1
        self.counters["live_merged"] += 1
        wf.last_context = max(wf.last_context, int(state.get("last_context", 0)))
        wf.peak_context = max(wf.peak_context, int(state.get("peak_context", 0)))
        wf.out_tokens = sum(st.out_tokens for st in steps)

    def finish_checked(self, app: str, wid: str, mine: bool) -> None:
        """The store's verdict on a workflow that went idle here: end it (`mine`), or drop this copy
        because another gateway process served later calls of it or has already ended it."""
        wf = self._finishing.pop((app, wid), None)
        if wf is not None and mine:
            self._finish(wf)

    # ------------------------------------------------------------------ prediction

    def _predict(self, tags: Tags, f: RequestFeatures, now: float) -> Prediction:
        app, role, role_inferred = self._resolve_role(tags, f)
        model = self.models.get(app)
        if model is None:
            model = self.models[app] = AppModel(app)
        # leading blocks of the system prompt: every use of it also needs the prompt's block hashes
        sys_blocks = _system_blocks(f) if f.prefix_hashes else 0
        if tags.workflow:
            wid, linked, joined = tags.workflow, False, False
            wf = self.live.get(app, wid)
        elif tags.session:
            wid, linked, joined = "session:" + tags.session, False, False
            wf = self.live.get(app, wid)
        else:
            wid, joined, wf = self._link(app, role, f, now, model, sys_blocks)
            linked = True
        if wf is None:
            wf = LiveWorkflow(app=app, wid=wid, created=now, last_seen=now, local_only=linked)
            self.live.add(wf)
        if not linked and self._share_live:
            self.store.want_live(app, wid)  # other gateway processes may have served calls of it meanwhile
        # one step = the parallel calls of one role; a same-role call while the step is running joins it
        cur = wf.steps[-1] if wf.steps else None
        if cur is not None and self._is_sibling(wf, cur, role, f, now, sys_blocks):
            cur.width += 1
            step = cur
        else:
            k = min(wf.visits.get(role, 0) + 1, K_MAX)
            wf.visits[role] = k
            step = StepRec(role=role, k=k, started=now, width=1, prompt_tokens=f.prompt_tokens,
                           hashes=f.prefix_hashes)
            wf.steps.append(step)
        call_index = wf.calls - 1
        wf.in_flight += 1
        self.live.touch(wf, now)
        if linked:  # index untagged prompts so the calls that continue them can be linked
            if f.prefix_hashes:
                self.live.set_prompt(wf, f.prefix_hashes, sys_blocks)
            if f.content_hashes:
                self.live.set_content(wf, f.content_hashes)
            if f.message_fingerprints:
                self.live.set_messages(wf, f.message_fingerprints)
        else:
            wf.last_hashes = f.prefix_hashes
        if f.messages:
            wf.last_messages = f.messages
        if f.prompt_tokens > wf.peak_context:  # max(), without the builtin's call
            wf.peak_context = f.prompt_tokens
        pred = self._from_model(model, wf, step, role, f)
        pred.role = role
        pred.role_inferred = role_inferred
        pred.workflow = wid
        pred.workflow_linked = linked
        pred.step = call_index
        extra = pred.extra
        extra["linked_existing"] = 1.0 if joined else 0.0
        extra["step_index"] = float(len(wf.steps) - 1)
        extra["epoch"] = float(wf.epoch)  # a merge moves step indexes: observe() then finds the step by role
        return pred

    def _from_model(self, model: AppModel, wf: LiveWorkflow, step: StepRec, role: str,
                    f: RequestFeatures) -> Prediction:
        s = self.settings
        cap = f.max_tokens
        if model.lengths.total < s.min_workflows:  # self._cold(model), inlined on the hot path
            p = _reactive(f)
            rv = self._role_view(model, role)
            if rv.calls >= s.min_state_count:  # lengths of a known role are worth having even when cold
                p.output_tokens_expected = _cap(rv.out_mean, cap)
                p.output_tokens_bound = int(_cap(rv.out_bound, cap))
            return p
        rv = self._role_view(model, role)
        sv = self._state_view(model, role, step.k)
        out_mean = _cap(rv.out_mean, cap) if rv.calls > 0 else float(cap or 0)
        out_bound = int(_cap(rv.out_bound, cap)) if rv.calls > 0 else int(cap or 0)
        # (max(a, b) and min(a, b) below are written out, b only when b > a or b < a: same values
        # and types without the builtins' calls)
        # calls of this step still to come (fan-out siblings not launched yet)
        siblings = rv.fanout_mean - step.width
        if not siblings > 0.0:
            siblings = 0.0
        rem = siblings + sv.remaining_mean
        rem_bound = math.ceil(siblings) + sv.remaining_bound
        rem_out = siblings * out_mean + sv.remaining_out_mean
        growth = sv.growth_bound if sv.growth_bound > out_bound else out_bound
        peak = f.prompt_tokens + growth
        if not peak > wf.peak_context:
            peak = wf.peak_context
        likely = f.prompt_tokens + int(sv.growth_median if sv.growth_median > out_mean else out_mean)
        if not likely > wf.peak_context:
            likely = wf.peak_context
        next_roles = tuple(NextRole(n.role, n.probability, self._role_view(model, n.role).fanout_mean)
                           for n in sv.next_roles)
        prefix: tuple[dict[str, str], ...] = ()
        prefix_conf = 0.0
        if next_roles:
            top = next_roles[0]
            text = model.texts.get(top.role, "")
            carry = model.role(role).carry(top.role)
            if text:
                prefix = ({"role": "system", "content": text},)
                prefix_conf = top.probability * self._role_view(model, top.role).fp_share
            if carry >= 0.5 and wf.last_messages:
                body = tuple(m for m in wf.last_messages if m.get("role") not in ("system", "developer"))
                prefix = prefix + body if text else tuple(wf.last_messages)
                prefix_conf = top.probability * carry * (self._role_view(model, top.role).fp_share if text else 1.0)
        support = sv.support / (4 * s.min_state_count)
        if not support < 1.0:
            support = 1.0
        return Prediction(
            cold=False,
            output_tokens_expected=out_mean,
            output_tokens_bound=out_bound,
            next_roles=next_roles,
            remaining_steps=rem,
            remaining_steps_bound=rem_bound,
            remaining_output_tokens=rem_out,
            peak_context_tokens=int(peak),
            peak_context_likely_tokens=likely,
            next_prefix_messages=prefix,
            next_prefix_confidence=_round4(self._rounded, prefix_conf),
            confidence=_round4(self._rounded, support * (next_roles[0].probability if next_roles else 1.0)),
        )

    def _cold(self, model: AppModel) -> bool:
        return model.workflows_finished < self.settings.min_workflows

    def _fresh(self, at: int, gen: int, model: AppModel, updates: int) -> bool:
        """A cached view stays until its role has had 5% more updates (every update while it is young)."""
        return gen == model.generation and updates - at < max(1, updates // 20)

    def _role_view(self, model: AppModel, role: str) -> RoleView:
        """Cached per-role predictions: computed on first use; a stale one is served (and the tick
        recomputes it) unless the role is young, when every update counts."""
        key = (model.app, role)
        v = self._role_views.get(key)
        if v is not None and (v.calls >= 64 or self._fresh(v.version, v.generation, model, _updates(model, role))):
            return v
        v = self._role_views[key] = self._compute_role_view(model, role)
        return v

    def _compute_role_view(self, model: AppModel, role: str) -> RoleView:
        r = model.roles.get(role)
        upd = r.updates if r is not None else 0
        if r is None:
            return RoleView(upd, model.generation, 0.0, 0.0, 0, 1.0, (), 0.0)
        fps = r.fingerprints
        fp_total = sum(fps.values())
        n = sum(r.fanout.values())
        dist = tuple(sorted((w, c / n) for w, c in r.fanout.items())) if n > 0 else ()
        return RoleView(upd, model.generation, r.calls, r.output.mean, r.output.quantile(self._bound_q(r.output.total)),
                        r.fanout_mean(), dist, max(fps.values()) / fp_total if fp_total > 0 else 0.0)

    def _bound_q(self, n: float) -> float:
        """The quantile to report as a bound from `n` samples (see `bound_confidence_z`)."""
        q = self.settings.bound_quantile
        if n <= 0:
            return q
        return min(0.999, q + self.settings.bound_confidence_z * math.sqrt(q * (1 - q) / n))

    def _state_view(self, model: AppModel, role: str, k: int) -> StateView:
        """Cached per-state predictions, refreshed like `_role_view`."""
        key = (model.app, role, k)
        v = self._state_views.get(key)
        if v is not None and (v.support >= 64 or self._fresh(v.version, v.generation, model, _updates(model, role))):
            return v
        v = self._compute_state_view(model, role, k)
        v.version = _updates(model, role)
        self._state_views[key] = v
        return v

    def _compute_state_view(self, model: AppModel, role: str, k: int) -> StateView:
        s = self.settings
        q = s.bound_quantile
        st = model.states.get((role, k))
        trans: dict[str, float] = dict(st.trans) if st is not None else {}
        support = sum(trans.values())
        if support < s.min_state_count:  # back off to the role, whatever its loop count
            trans = dict(model.role_trans.get(role, {}))
            support = sum(trans.values())
        kept = {n: c for n, c in trans.items() if support > 0 and c / support >= s.prune_share}
        kept_total = sum(kept.values())
        ordered = sorted(kept.items(), key=lambda kv: -kv[1])
        next_roles = tuple(NextRole(n, c / kept_total) for n, c in ordered if n != END) if kept_total else ()
        top = ordered[0][0] if ordered else ""
        # remaining work after this step: from this state, else the role summed over k, else the app
        rs = model.roles.get(role) or RoleStats()
        enough = st is not None and st.remaining.total >= s.min_state_count
        rem_sk = st.remaining if enough and st is not None else rs.remaining
        out_sk = st.remaining_out if enough and st is not None else rs.remaining_out
        gr_sk = st.growth if enough and st is not None else rs.growth
        if rem_sk.total > 0:
            rem_mean, rem_bound = rem_sk.mean, rem_sk.quantile(q)
        else:
            rem_mean, rem_bound = max(0.0, model.lengths.mean - 1.0), model.lengths.quantile(q)
        return StateView(0, support, next_roles, top, rem_mean, rem_bound,
                         out_sk.mean, out_sk.quantile(q), gr_sk.quantile(q), rem_sk.total, model.generation,
                         gr_sk.quantile(0.5))

    # ------------------------------------------------------------------ untagged traffic

    def _resolve_app(self, tags: Tags, fp: str) -> str:
        """The app a call counts under: its tag, else the app its system prompt is known in."""
        app = tags.app
        if not app and fp:
            hit = self.fp_index.get(fp)
            if hit is not None:
                app = hit[0]
        app = app or DEFAULT_APP
        if app not in self.models and len(self.models) >= self.settings.max_apps:
            app = OVERFLOW  # memory bound: tags are client input
        return app

    def _resolve_role(self, tags: Tags, f: RequestFeatures) -> tuple[str, str, bool]:
        fp = f.system_fingerprint
        app = self._resolve_app(tags, fp)
        s = self.settings
        model = self.models.get(app)
        if tags.agent:
            role, inferred = clean_role(tags.agent), False
        else:
            role, inferred = (model.role_for_fingerprint(fp) if fp and model is not None else ""), True
            if not role:
                role = ("sys-" + fp[:8]) if fp else NO_SYSTEM_ROLE
        if model is not None and role not in model.roles and len(model.roles) >= s.max_roles_per_app:
            role = OVERFLOW  # e.g. system prompts that change every call: one bucket, not a role each
        return app, role, inferred

    def _link(self, app: str, role: str, f: RequestFeatures, now: float, model: AppModel,
              sys_blocks: int) -> tuple[str, bool, LiveWorkflow | None]:
        """The live workflow an untagged call belongs to: (id, True, it), or a new id, False, None.
        `sys_blocks` is `_system_blocks(f)` (0 when the call has no prefix hashes)."""
        s = self.settings
        # a prompt that shares more than the role's system prompt with a live workflow's latest prompt
        # (it continues it, or repeats the task text of a running fan-out) belongs to that workflow
        # (block _system_blocks(f) still mixes the system prompt's end with generic markers: not evidence)
        wid, _blocks = self.live.longest_prefix(app, f.prefix_hashes, sys_blocks + 2)
        if wid:
            wf = self.live.get(app, wid)
            if wf is not None:
                self.counters["linked_prefix"] += 1
                return wid, True, wf
        if f.content_hashes:  # the same task text behind another role's system prompt
            wid, _blocks = self.live.longest_content(app, f.content_hashes)
            if wid:
                wf = self.live.get(app, wid)
                if wf is not None:
                    self.counters["linked_content"] += 1
                    return wid, True, wf
        if f.message_fingerprints:  # it quotes a response (or a message) of a live workflow
            wid = self.live.find_message(app, f.message_fingerprints)
            if wid:
                wf = self.live.get(app, wid)
                if wf is not None:
                    self.counters["linked_message"] += 1
                    return wid, True, wf
        # no prompt continues: the workflow whose automaton expects this role now, most recent first
        best: LiveWorkflow | None = None
        best_score = s.link_min_prob
        start_p = 0.0
        r = model.roles.get(role)
        started = model.workflows_started
        if r is not None and started > 0:
            start_p = r.starts / started
        preds = self._predecessors(model, role)
        for wf in self.live.recent(app, s.link_scan):
            if not wf.steps:
                continue
            cur = wf.steps[-1]
            if cur.role == role:
                if self._is_sibling(wf, cur, role, f, now, sys_blocks, need_evidence=True):
                    score = self._p_wider(model, role, cur.width)  # a sibling of a running fan-out
                elif cur.observed < cur.width or role not in preds:
                    continue
                else:
                    score = self._p_next(model, cur.role, cur.k, role)
            elif cur.role not in preds or cur.observed < cur.width:
                continue  # never leads to this role, or its step is still running
            else:
                score = self._p_next(model, cur.role, cur.k, role)
            if score > best_score:
                best, best_score = wf, score
        if best is not None and best_score >= start_p * 0.5:
            self.counters["linked_automaton"] += 1
            return best.wid, True, best  # live.recent() hands out the table's own entries
        self._seq += 1
        self.counters["new_untagged"] += 1
        wid = f"{app}~{self._token}{self._seq}"
        return wid, False, self.live.get(app, wid)

    def _is_sibling(self, wf: LiveWorkflow, cur: StepRec, role: str, f: RequestFeatures, now: float,
                    sys_blocks: int, need_evidence: bool = False) -> bool:
        """Whether a call of `role` joins the workflow's running step `cur` as one more parallel call.

        Siblings of a fan-out share the task context beyond the system prompt; a call that continues
        the latest prompt is the next turn instead. Without prompt hashes, timing decides (a same-role
        call while the step runs), unless `need_evidence` (linking untagged calls, where it would
        merge unrelated concurrent calls).
        """
        if cur.role != role:
            return False
        if f.prefix_hashes and cur.hashes:
            last = wf.last_hashes
            if last and len(f.prefix_hashes) > len(last) and _common_prefix(f.prefix_hashes, last) >= len(last):
                return False  # it continues the latest prompt: the next turn of a loop, not a sibling
            if _common_prefix(f.prefix_hashes, cur.hashes) >= sys_blocks + 2:
                return now - cur.started <= self.settings.sibling_window_s  # same task context: a fan-out
            if need_evidence:
                return False
        elif need_evidence:
            return False
        return cur.observed < cur.width or now - cur.started <= self.settings.fanout_window_s

    def _predecessors(self, model: AppModel, role: str) -> frozenset[str]:
        """Roles whose steps lead to `role` often enough to be predicted, and whose prompt it does not
        continue (a continuing call would have been linked by its prompt already)."""
        key = (model.app, role)
        gen = (model.generation, model.version // 256)  # refreshed as the model grows
        hit = self._preds_cache.get(key)
        if hit is not None and hit[0] == gen:
            return hit[1]
        out = set()
        for src, trans in model.role_trans.items():
            total = sum(trans.values())
            c = trans.get(role, 0.0)
            if total > 0 and c / total >= self.settings.prune_share and model.role(src).carry(role) < 0.5:
                out.add(src)
        fs = frozenset(out)
        self._preds_cache[key] = (gen, fs)
        return fs

    def _p_next(self, model: AppModel, role: str, k: int, nxt: str) -> float:
        for n in self._state_view(model, role, k).next_roles:
            if n.role == nxt:
                return n.probability
        return 0.0

    def _p_wider(self, model: AppModel, role: str, width: int) -> float:
        dist = self._role_view(model, role).fanout_dist
        if not dist:
            return 0.5
        return sum(p for w, p in dist if w > width)

    def _index_fingerprint(self, app: str, fp: str, roles: Mapping[str, float]) -> None:
        if len(roles) == 1:  # the usual case: one role per system prompt (same result as below, no max() passes)
            cur = self.fp_index.get(fp)
            if cur is None or cur[0] == app:
                role = next(iter(roles))
                if cur is None or cur[1] != role:
                    self.fp_index[fp] = (app, role)
                return
        best = max(roles.values()) if roles else 0.0
        cur = self.fp_index.get(fp)
        if cur is None or cur[0] == app or best > self.models[cur[0]].fp_roles.get(fp, {}).get(cur[1], 0.0):
            self.fp_index[fp] = (app, max(roles.items(), key=lambda kv: kv[1])[0])

    # ------------------------------------------------------------------ learning

    def _learn(self, model: AppModel, key: str, delta: float = 1.0) -> None:
        model.apply(key, delta)
        if self._persists:
            self.store.record(model.app, key, delta)

    def _observe(self, tags: Tags, f: RequestFeatures, pred: Prediction, out: Outcome) -> None:
        now = out.finished_s or f.arrival_s
        if now - self._last_tick > 2 * self.settings.tick_interval_s:  # no background tick: end one here
            for wf_done in self.live.expired(now, self.settings.workflow_idle_s, limit=1):
                self._end(wf_done)
        role = pred.role
        if role:  # predict() named the role: only the app is needed (resolved as predict() did)
            app = self._resolve_app(tags, f.system_fingerprint)
        else:
            app, role, _ = self._resolve_role(tags, f)
        model = self.models.get(app)
        if model is None:
            model = self.models[app] = AppModel(app)
        # max(0, ...) and max(a, b) below are written as comparisons: same values, no builtin calls
        outp = int(out.output_tokens)
        if outp < 0:
            outp = 0
        prompt = int(out.prompt_tokens or f.prompt_tokens)
        if prompt < 0:
            prompt = 0
        wf = self.live.get(app, pred.workflow) if pred.workflow else None
        if wf is None or not wf.steps:
            self._learn_call(model, role, f, prompt, outp)  # its workflow is gone: only the role's lengths
            return
        steps = wf.steps
        extra = pred.extra
        si = int(extra.get("step_index", -1.0))
        if extra.get("epoch", -1.0) != wf.epoch or not 0 <= si < len(steps) or steps[si].role != role:
            si = next((i for i in range(len(steps) - 1, -1, -1) if steps[i].role == role), -1)
        if si < 0:
            self._learn_call(model, role, f, prompt, outp)
            return
        step = steps[si]
        if step.observed == 0:  # the step's first outcome: it records the transition into the step
            if si == 0:
                self._learn(model, f"S|{step.role}")
            else:
                prev = steps[si - 1]
                self._learn(model, f"T|{prev.role}|{prev.k}|{step.role}")
                if prev.hashes and step.hashes:
                    kept = _common_prefix(prev.hashes, step.hashes) / len(prev.hashes)
                    self._learn(model, f"CR|{prev.role}|{step.role}", kept)
                    self._learn(model, f"CN|{prev.role}|{step.role}")
        keys = self._learn_call(model, step.role, f, prompt, outp)
        if wf.last_context > 0:
            share = min(prompt / wf.last_context, 4.0)
            if keys is None:
                self._learn(model, f"X|{step.role}", share)
                self._learn(model, f"XN|{step.role}")
            else:
                model.learn_context(keys, share)
                if self._persists:
                    self.store.record(model.app, keys.context, share)
                    self.store.record(model.app, keys.context_n, 1.0)
        if out.output_fingerprint and wf.local_only:  # the next role may quote this response
            self.live.set_messages(wf, (out.output_fingerprint,))
        context = prompt + outp
        step.observed += 1
        step.out_tokens += outp
        if context > step.max_context:
            step.max_context = context
        wf.out_tokens += outp
        wf.in_flight = wf.in_flight - 1 if wf.in_flight > 1 else 0
        wf.last_context = context
        if context > wf.peak_context:
            wf.peak_context = context
        if out.finished_s > 0:
            self.live.touch(wf, out.finished_s)
        if self._share_live and not wf.local_only:
            self.store.record_live(app, wf.wid, _live_state(wf))

    def _learn_call(self, model: AppModel, role: str, f: RequestFeatures, prompt: int,
                    outp: int) -> RoleKeys | None:
        """Learn one call's lengths and system prompt; returns the role's cached keys (None: a role
        whose keys `apply` must parse, learned through `_learn` like every rarer key)."""
        keys = model.role_keys(role)
        if keys is None:
            self._learn(model, f"C|{role}")
            self._learn(model, f"O|{role}|{bucket_of(outp)}")
            self._learn(model, f"OS|{role}", outp)
            self._learn(model, f"P|{role}|{bucket_of(prompt)}")
            self._learn(model, f"PS|{role}", prompt)
        else:  # the same counter updates, from keys built once (the hot path)
            okey, pkey = model.learn_call(keys, bucket_of(outp), outp, bucket_of(prompt), prompt)
            if self._persists:
                record, app = self.store.record, model.app
                record(app, keys.calls, 1.0)
                record(app, okey, 1.0)
                record(app, keys.out_sum, outp)
                record(app, pkey, 1.0)
                record(app, keys.prompt_sum, prompt)
        fp = f.system_fingerprint
        r = model.roles.get(role)
        if fp and (r is None or fp in r.fingerprints or len(r.fingerprints) < self.settings.max_fingerprints_per_role):
            fkey = model.learn_fingerprint(keys, fp) if keys is not None else None
            if fkey is None:
                self._learn(model, f"FP|{role}|{fp}")
            elif self._persists:
                self.store.record(model.app, fkey, 1.0)
            self._index_fingerprint(model.app, fp, model.fp_roles.get(fp, {}))
            if f.system_prompt and model.texts.get(role) != f.system_prompt:
                model.texts[role] = f.system_prompt
                self.store.record_text(model.app, role, f.system_prompt)
        return keys

    def _end(self, wf: LiveWorkflow) -> None:
        """A workflow went idle here: end it now, or (shared store) once Redis says no one saw more of it."""
        if self._share_live and not wf.local_only:
            self._finishing[(wf.app, wf.wid)] = wf
            self.store.check_finish(wf.app, wf.wid, wf.calls)
        else:
            self._finish(wf)

    def _finish(self, wf: LiveWorkflow) -> None:
        """A workflow ended: learn its end, length, fan-outs, loops and per-step remaining work."""
        if not wf.steps:
            return
        model = self.models.get(wf.app)
        if model is None:
            return
        self.counters["finished"] += 1
        self.store.end_live(wf.app, wf.wid, wf.calls)
        last = wf.steps[-1]
        self._learn(model, f"T|{last.role}|{last.k}|{END}")
        calls = sum(st.width for st in wf.steps)
        self._learn(model, f"L|{bucket_of(calls)}")
        self._learn(model, "LS", calls)
        visits: dict[str, int] = {}
        for st in wf.steps:
            visits[st.role] = visits.get(st.role, 0) + 1
            self._learn(model, f"F|{st.role}|{st.width}")
        for r, v in visits.items():
            self._learn(model, f"V|{r}|{v}")
        after_calls = calls
        after_out = sum(st.out_tokens for st in wf.steps)
        peak_after = 0
        peaks = [0] * len(wf.steps)
        for i in range(len(wf.steps) - 1, -1, -1):
            peak_after = max(peak_after, wf.steps[i].max_context)
            peaks[i] = peak_after
        for i, st in enumerate(wf.steps):
            after_calls -= st.width
            after_out -= st.out_tokens
            growth = max(0, peaks[i] - st.prompt_tokens)
            if "|" in st.role:  # its keys parse as another role's: apply() handles them
                for kind, value in (("R", after_calls), ("Q", after_out), ("G", growth)):
                    self._learn(model, f"{kind}|{st.role}|{st.k}|{bucket_of(value)}")
                    self._learn(model, f"{kind}S|{st.role}|{st.k}", value)
                continue
            # the same six counters in one pass (a workflow's end learns these for every step)
            keys = model.learn_remaining(st.role, st.k, after_calls, after_out, growth)
            if self._persists:
                record, app = self.store.record, model.app
                record(app, keys[0], 1.0)
                record(app, keys[1], after_calls)
                record(app, keys[2], 1.0)
                record(app, keys[3], after_out)
                record(app, keys[4], 1.0)
                record(app, keys[5], growth)

    def _error(self, where: str) -> None:
        self.counters["errors"] += 1
        now = time.monotonic()
        if now - self._last_error_log >= self.settings.error_log_interval_s:
            self._last_error_log = now
            log.exception("predictor %s failed (%d errors so far); answering reactively", where,
                          self.counters["errors"])


def _updates(model: AppModel, role: str) -> int:
    r = model.roles.get(role)
    return r.updates if r is not None else 0


def _reactive(f: RequestFeatures) -> Prediction:
    """A cold prediction from the request alone."""
    cap = f.max_tokens or 0
    return Prediction(cold=True, output_tokens_expected=float(cap), output_tokens_bound=cap,
                      peak_context_tokens=f.prompt_tokens + cap)


def _cap(x: float, cap: int | None) -> float:
    return cap if cap and cap < x else x  # min(x, cap) without the builtin's call (same value, same type)


def _round4(memo: dict[float, float], x: float) -> float:
    """round(x, 4), remembered in `memo`: the same confidences come back call after call (they come
    from cached views), and round() to digits costs about ten dict lookups. Only floats other than
    zeros and NaN are remembered (1 == 1.0 and -0.0 == 0.0 as keys, and NaN matches nothing)."""
    if type(x) is not float or x == 0.0 or x != x:
        return round(x, 4)
    r = memo.get(x)
    if r is None:
        r = round(x, 4)
        if len(memo) >= 4096:  # confidences are few per state; a bound all the same
            memo.clear()
        memo[x] = r
    return r


def _system_blocks(f: RequestFeatures) -> int:
    """Leading prompt blocks that hold only the system prompt (shared by every workflow of a role)."""
    if not f.system_prompt:
        return 0
    text = f.system_prompt
    n = len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))  # ASCII: bytes == characters
    return (n + SYSTEM_BLOCK_OVERHEAD) // BLOCK_CHARS


def _common_prefix(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    """Leading blocks two chained-hash sequences share: equal hashes at i mean equal prefixes up to i,
    so a binary search finds the boundary in O(log n)."""
    if a == b:  # the usual case of a repeated prompt: one C comparison
        return len(a)
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[mid - 1] == b[mid - 1]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _live_state(wf: LiveWorkflow) -> dict[str, Any]:
    return {
        "calls": wf.calls,
        "steps": [[s.role, s.k, s.started, s.width, s.out_tokens, s.prompt_tokens, s.max_context] for s in wf.steps],
        "last_context": wf.last_context,
        "peak_context": wf.peak_context,
        "out_tokens": wf.out_tokens,
    }


def make_predictor(redis_url: str = "", key_prefix: str = "pythia:", **settings: Any) -> Predictor:
    """A predictor on the MemoryStore (`redis_url` empty) or on a RedisStore shared through `redis_url`."""
    cfg = build_settings(**settings)
    if not redis_url:
        return Predictor(MemoryStore(), cfg)
    from predictor.redis_store import RedisStore

    return Predictor(RedisStore(redis_url, key_prefix, cfg), cfg)
