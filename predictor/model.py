"""The learned workflow model of one app, kept as flat additive counters plus indexes over them.

Every fact the predictor learns is a counter increment on a flat key (``T|coder|2|tester``
+= 1). Counters add up across processes, so the Redis store merges gateways by HINCRBYFLOAT
and any process rebuilds the same model by replaying them through `AppModel.apply`.

Key schema (``|``-separated; roles never contain ``|``; k = how many steps of that role the
workflow has had, this one included, capped at K_MAX):

====================  =========================================================
``S|R``               workflows that started with role R
``T|R|k|N``           step transitions from state (R, k) to role N (``$end`` = workflow ended)
``C|R``               calls of role R
``O|R|b`` ``OS|R``    output-token sketch bucket b / sum of role R
``P|R|b`` ``PS|R``    prompt-token sketch bucket b / sum of role R
``F|R|w``             steps of role R that launched w parallel calls (fan-out)
``V|R|v``             finished workflows in which role R ran v steps (loops, retries)
``L|b`` ``LS``        calls per finished workflow (sketch / sum)
``R|R|k|b`` ``RS|..`` calls remaining after a step in state (R, k) (sketch / sum)
``Q|R|k|b`` ``QS|..`` output tokens remaining after a step in state (R, k)
``G|R|k|b`` ``GS|..`` peak context growth from a step in state (R, k): peak - its prompt
``FP|R|fp``           calls of role R whose system prompt had fingerprint fp
``CR|R|N`` ``CN|R|N`` share of the previous prompt's blocks that role N's prompt kept after R
``X|R`` ``XN|R``      prompt tokens / accumulated context before the call, for role R
====================  =========================================================
"""

from __future__ import annotations

from dataclasses import dataclass, field

from predictor.sketch import LogSketch, bucket_of

END = "$end"
K_MAX = 12

# Parsed form of the keys calls and workflow ends learn: (kind, role, int field, str field).
# Parsing a key (split, int) cost about as much as applying it; the same keys come back call
# after call, and workflow after workflow (F, V, L, LS: a workflow's end).
_ROLE_KINDS = frozenset(("C", "OS", "PS", "X", "XN", "S"))  # KIND|R
_BUCKET_KINDS = frozenset(("O", "P", "F", "V"))  # KIND|R|b (or width, visits)
_PAIR_KINDS = frozenset(("FP", "CR", "CN"))  # KIND|R|x
_PARSED: dict[str, tuple[str, str, int, str]] = {}
_PARSED_MAX = 65536  # distinct keys remembered (then the cache starts over)


def _parse(key: str) -> tuple[str, str, int, str] | None:
    """The fast path's parse of a well-formed key of a frequent kind, else None."""
    p = key.split("|")
    kind = p[0]
    n = len(p)
    if n == 2 and kind in _ROLE_KINDS:
        return kind, p[1], 0, ""
    if n == 3 and kind in _PAIR_KINDS:
        return kind, p[1], 0, p[2]
    if n == 1 and kind == "LS":
        return kind, "", 0, ""
    try:
        if n == 3 and kind in _BUCKET_KINDS:
            return kind, p[1], int(p[2]), ""
        if n == 4 and kind == "T":
            return kind, p[1], int(p[2]), p[3]
        if n == 2 and kind == "L":
            return kind, "", int(p[1]), ""
    except ValueError:
        return None
    return None


def clean_role(role: str) -> str:
    """A role name safe inside a counter key."""
    return role.replace("|", "/")[:128]


@dataclass(slots=True)
class StateStats:
    """What happens after a step in state (role, k)."""

    trans: dict[str, float] = field(default_factory=dict)  # next role (or END) -> count
    remaining: LogSketch = field(default_factory=LogSketch)  # calls after the step
    remaining_out: LogSketch = field(default_factory=LogSketch)  # output tokens after the step
    growth: LogSketch = field(default_factory=LogSketch)  # peak context - this step's prompt
    updates: int = 0  # counter updates applied (cached predictions refresh from it)


@dataclass(slots=True)
class RoleStats:
    """Per-role lengths, fan-out, loops and prompt shape."""

    calls: float = 0.0
    starts: float = 0.0
    output: LogSketch = field(default_factory=LogSketch)
    prompt: LogSketch = field(default_factory=LogSketch)
    fanout: dict[int, float] = field(default_factory=dict)  # width -> steps
    visits: dict[int, float] = field(default_factory=dict)  # steps per finished workflow -> workflows
    fingerprints: dict[str, float] = field(default_factory=dict)
    carry_sum: dict[str, float] = field(default_factory=dict)  # next role -> sum of kept-prefix share
    carry_n: dict[str, float] = field(default_factory=dict)
    context_sum: float = 0.0
    context_n: float = 0.0
    updates: int = 0  # counter updates of this role or any of its states (cached predictions refresh from it)
    # the per-state remaining-work sketches summed over k (what a state with little history backs off to)
    remaining: LogSketch = field(default_factory=LogSketch)
    remaining_out: LogSketch = field(default_factory=LogSketch)
    growth: LogSketch = field(default_factory=LogSketch)

    def fanout_mean(self) -> float:
        """Mean parallel width of this role's steps (1 when unknown)."""
        n = sum(self.fanout.values())
        return sum(w * c for w, c in self.fanout.items()) / n if n > 0 else 1.0

    def carry(self, nxt: str) -> float:
        """Mean share of this role's prompt blocks that the next role's prompt starts with."""
        n = self.carry_n.get(nxt, 0.0)
        return self.carry_sum.get(nxt, 0.0) / n if n > 0 else 0.0


@dataclass(slots=True)
class RoleKeys:
    """The counter keys every call of one role learns, built once per role.

    Formatting a fresh key string per counter, then hashing it and looking up its parse, cost
    about as much as applying it; these strings come back call after call with their hash cached.
    Only for roles without ``|`` (any other role's keys parse as another role's: `apply` handles them).
    """

    role: str
    calls: str  # C|R
    out_sum: str  # OS|R
    prompt_sum: str  # PS|R
    context: str  # X|R
    context_n: str  # XN|R
    out_buckets: dict[int, str] = field(default_factory=dict)  # b -> O|R|b
    prompt_buckets: dict[int, str] = field(default_factory=dict)  # b -> P|R|b
    fingerprints: dict[str, str] = field(default_factory=dict)  # fp -> FP|R|fp, once learned


@dataclass(slots=True)
class AppModel:
    """All counters of one app and the indexes `apply` keeps over them."""

    app: str
    counts: dict[str, float] = field(default_factory=dict)
    texts: dict[str, str] = field(default_factory=dict)  # role -> system prompt text (latest seen)
    roles: dict[str, RoleStats] = field(default_factory=dict)
    states: dict[tuple[str, int], StateStats] = field(default_factory=dict)
    # role -> transitions summed over k (the automaton as drawn)
    role_trans: dict[str, dict[str, float]] = field(default_factory=dict)
    lengths: LogSketch = field(default_factory=LogSketch)  # calls per finished workflow
    fp_roles: dict[str, dict[str, float]] = field(default_factory=dict)  # fingerprint -> role -> calls
    version: int = 0  # bumped on every applied counter
    generation: int = 0  # a new model object (snapshot reload) gets a new one; cached views key on it
    # role -> its per-call keys (a cache, not learned state: `learn_call` and friends use it)
    keys: dict[str, RoleKeys] = field(default_factory=dict, repr=False, compare=False)

    @property
    def workflows_finished(self) -> float:
        """How many workflows of this app have ended (the model's history)."""
        return self.lengths.total

    @property
    def workflows_started(self) -> float:
        """How many workflows of this app have been seen starting."""
        return sum(r.starts for r in self.roles.values())

    def role(self, name: str) -> RoleStats:
        """Stats of a role, created empty on first use."""
        r = self.roles.get(name)
        if r is None:
            r = self.roles[name] = RoleStats()
        return r

    def state(self, role: str, k: int) -> StateStats:
        """Stats of state (role, k), created empty on first use."""
        s = self.states.get((role, k))
        if s is None:
            s = self.states[(role, k)] = StateStats()
        return s

    def role_keys(self, role: str) -> RoleKeys | None:
        """The cached per-call keys of `role`, or None when its name holds ``|`` (use `apply`)."""
        k = self.keys.get(role)
        if k is None:
            if "|" in role:
                return None
            k = self.keys[role] = RoleKeys(role, f"C|{role}", f"OS|{role}", f"PS|{role}", f"X|{role}", f"XN|{role}")
        return k

    def learn_call(self, keys: RoleKeys, out_bucket: int, out_tokens: float, prompt_bucket: int,
                   prompt_tokens: float) -> tuple[str, str]:
        """Apply one call's lengths: exactly `apply` of C|R +1, O|R|out_bucket +1, OS|R +out_tokens,
        P|R|prompt_bucket +1 and PS|R +prompt_tokens, in that order, in one pass. Returns the
        O and P keys (with the keys in `keys`, what a persisting store records)."""
        role = keys.role
        okey = keys.out_buckets.get(out_bucket)
        if okey is None:
            okey = keys.out_buckets[out_bucket] = f"O|{role}|{out_bucket}"
        pkey = keys.prompt_buckets.get(prompt_bucket)
        if pkey is None:
            pkey = keys.prompt_buckets[prompt_bucket] = f"P|{role}|{prompt_bucket}"
        counts = self.counts
        get = counts.get
        counts[keys.calls] = get(keys.calls, 0.0) + 1.0
        counts[okey] = get(okey, 0.0) + 1.0
        counts[keys.out_sum] = get(keys.out_sum, 0.0) + out_tokens
        counts[pkey] = get(pkey, 0.0) + 1.0
        counts[keys.prompt_sum] = get(keys.prompt_sum, 0.0) + prompt_tokens
        self.version += 5
        r = self.roles.get(role)
        if r is None:
            r = self.roles[role] = RoleStats()
        r.updates += 5
        r.calls += 1.0
        sk = r.output  # LogSketch.add_bucket(out_bucket, 1.0), inlined, then the sum
        sk.counts[out_bucket] = sk.counts.get(out_bucket, 0.0) + 1.0
        sk.total += 1.0
        sk.sum += out_tokens
        sk = r.prompt
        sk.counts[prompt_bucket] = sk.counts.get(prompt_bucket, 0.0) + 1.0
        sk.total += 1.0
        sk.sum += prompt_tokens
        return okey, pkey

    def learn_fingerprint(self, keys: RoleKeys, fp: str) -> str | None:
        """`apply` of FP|R|fp +1 in one pass; returns its key, or None (nothing applied) when `fp`
        holds ``|`` (then the key does not parse as this fingerprint's: use `apply`)."""
        key = keys.fingerprints.get(fp)
        if key is None:
            if "|" in fp:
                return None
            key = keys.fingerprints[fp] = f"FP|{keys.role}|{fp}"
        counts = self.counts
        counts[key] = counts.get(key, 0.0) + 1.0
        self.version += 1
        role = keys.role
        r = self.roles.get(role)
        if r is None:
            r = self.roles[role] = RoleStats()
        r.updates += 1
        r.fingerprints[fp] = r.fingerprints.get(fp, 0.0) + 1.0
        fr = self.fp_roles.get(fp)
        if fr is None:
            fr = self.fp_roles[fp] = {}
        fr[role] = fr.get(role, 0.0) + 1.0
        return key

    def learn_context(self, keys: RoleKeys, share: float) -> None:
        """`apply` of X|R +share then XN|R +1, in one pass."""
        counts = self.counts
        counts[keys.context] = counts.get(keys.context, 0.0) + share
        counts[keys.context_n] = counts.get(keys.context_n, 0.0) + 1.0
        self.version += 2
        r = self.roles.get(keys.role)
        if r is None:
            r = self.roles[keys.role] = RoleStats()
        r.updates += 2
        r.context_sum += share
        r.context_n += 1.0

    def learn_remaining(self, role: str, k: int, calls: int, out: int, growth: int) -> tuple[str, ...]:
        """What a finished workflow learns of one step in state (role, k): exactly `apply` of
        R|R|k|b(calls) +1, RS|R|k +calls, Q|R|k|b(out) +1, QS|R|k +out, G|R|k|b(growth) +1 and
        GS|R|k +growth, in that order, in one pass (b = the value's bucket). Returns those keys;
        `role` must not hold ``|`` (its keys would parse as another role's)."""
        rb, qb, gb = bucket_of(calls), bucket_of(out), bucket_of(growth)
        keys = (f"R|{role}|{k}|{rb}", f"RS|{role}|{k}", f"Q|{role}|{k}|{qb}", f"QS|{role}|{k}",
                f"G|{role}|{k}|{gb}", f"GS|{role}|{k}")
        counts = self.counts
        get = counts.get
        counts[keys[0]] = get(keys[0], 0.0) + 1.0
        counts[keys[1]] = get(keys[1], 0.0) + calls
        counts[keys[2]] = get(keys[2], 0.0) + 1.0
        counts[keys[3]] = get(keys[3], 0.0) + out
        counts[keys[4]] = get(keys[4], 0.0) + 1.0
        counts[keys[5]] = get(keys[5], 0.0) + growth
        self.version += 6
        r = self.role(role)
        r.updates += 6
        st = self.state(role, k)
        st.remaining.add_bucket(rb, 1.0)
        r.remaining.add_bucket(rb, 1.0)
        st.remaining.sum += calls
        r.remaining.sum += calls
        st.remaining_out.add_bucket(qb, 1.0)
        r.remaining_out.add_bucket(qb, 1.0)
        st.remaining_out.sum += out
        r.remaining_out.sum += out
        st.growth.add_bucket(gb, 1.0)
        r.growth.add_bucket(gb, 1.0)
        st.growth.sum += growth
        r.growth.sum += growth
        return keys

    def apply(self, key: str, delta: float) -> None:
        """Add `delta` to one counter and to the index it feeds; unknown keys are only counted."""
        op = _PARSED.get(key)
        if op is None:
            op = _parse(key)
            if op is None:  # a rarer kind, or a malformed key: the general path
                self._apply_general(key, delta)
                return
            if len(_PARSED) >= _PARSED_MAX:
                _PARSED.clear()
            _PARSED[key] = op
        # the kinds every call learns, from a cached parse of the key (same effect as _apply_general)
        counts = self.counts
        counts[key] = counts.get(key, 0.0) + delta
        self.version += 1
        kind, name, n, other = op
        if kind == "L":  # the app's kinds: no role
            self.lengths.add_bucket(n, delta)
            return
        if kind == "LS":
            self.lengths.sum += delta
            return
        r = self.roles.get(name)
        if r is None:
            r = self.roles[name] = RoleStats()
        r.updates += 1
        if kind == "C":
            r.calls += delta
        elif kind == "O":
            r.output.add_bucket(n, delta)
        elif kind == "OS":
            r.output.sum += delta
        elif kind == "P":
            r.prompt.add_bucket(n, delta)
        elif kind == "PS":
            r.prompt.sum += delta
        elif kind == "FP":
            r.fingerprints[other] = r.fingerprints.get(other, 0.0) + delta
            fr = self.fp_roles.get(other)
            if fr is None:
                fr = self.fp_roles[other] = {}
            fr[name] = fr.get(name, 0.0) + delta
        elif kind == "T":
            st = self.state(name, n)
            st.updates += 1
            st.trans[other] = st.trans.get(other, 0.0) + delta
            rt = self.role_trans.setdefault(name, {})
            rt[other] = rt.get(other, 0.0) + delta
        elif kind == "X":
            r.context_sum += delta
        elif kind == "XN":
            r.context_n += delta
        elif kind == "CR":
            r.carry_sum[other] = r.carry_sum.get(other, 0.0) + delta
        elif kind == "CN":
            r.carry_n[other] = r.carry_n.get(other, 0.0) + delta
        elif kind == "S":
            r.starts += delta
        elif kind == "F":
            r.fanout[n] = r.fanout.get(n, 0.0) + delta
        elif kind == "V":
            r.visits[n] = r.visits.get(n, 0.0) + delta

    def _apply_general(self, key: str, delta: float) -> None:
        """`apply` for any key: parsed each time; malformed keys are counted and otherwise ignored."""
        self.counts[key] = self.counts.get(key, 0.0) + delta
        self.version += 1
        p = key.split("|")
        kind = p[0]
        if len(p) > 1 and kind not in ("L", "LS"):
            self.role(p[1]).updates += 1
        try:
            if kind == "T":
                st = self.state(p[1], int(p[2]))
                st.updates += 1
                st.trans[p[3]] = st.trans.get(p[3], 0.0) + delta
                rt = self.role_trans.setdefault(p[1], {})
                rt[p[3]] = rt.get(p[3], 0.0) + delta
            elif kind == "O":
                self.role(p[1]).output.add_bucket(int(p[2]), delta)
            elif kind == "OS":
                self.role(p[1]).output.sum += delta
            elif kind == "C":
                self.role(p[1]).calls += delta
            elif kind == "S":
                self.role(p[1]).starts += delta
            elif kind == "P":
                self.role(p[1]).prompt.add_bucket(int(p[2]), delta)
            elif kind == "PS":
                self.role(p[1]).prompt.sum += delta
            elif kind == "F":
                fo = self.role(p[1]).fanout
                fo[int(p[2])] = fo.get(int(p[2]), 0.0) + delta
            elif kind == "V":
                vi = self.role(p[1]).visits
                vi[int(p[2])] = vi.get(int(p[2]), 0.0) + delta
            elif kind == "L":
                self.lengths.add_bucket(int(p[1]), delta)
            elif kind == "LS":
                self.lengths.sum += delta
            elif kind in ("R", "Q", "G"):
                st = self.state(p[1], int(p[2]))
                r = self.role(p[1])
                b = int(p[3])
                if kind == "R":
                    st.remaining.add_bucket(b, delta)
                    r.remaining.add_bucket(b, delta)
                elif kind == "Q":
                    st.remaining_out.add_bucket(b, delta)
                    r.remaining_out.add_bucket(b, delta)
                else:
                    st.growth.add_bucket(b, delta)
                    r.growth.add_bucket(b, delta)
            elif kind in ("RS", "QS", "GS"):
                st = self.state(p[1], int(p[2]))
                r = self.role(p[1])
                if kind == "RS":
                    st.remaining.sum += delta
                    r.remaining.sum += delta
                elif kind == "QS":
                    st.remaining_out.sum += delta
                    r.remaining_out.sum += delta
                else:
                    st.growth.sum += delta
                    r.growth.sum += delta
            elif kind == "FP":
                r = self.role(p[1])
                r.fingerprints[p[2]] = r.fingerprints.get(p[2], 0.0) + delta
                fr = self.fp_roles.setdefault(p[2], {})
                fr[p[1]] = fr.get(p[1], 0.0) + delta
            elif kind == "CR":
                r = self.role(p[1])
                r.carry_sum[p[2]] = r.carry_sum.get(p[2], 0.0) + delta
            elif kind == "CN":
                r = self.role(p[1])
                r.carry_n[p[2]] = r.carry_n.get(p[2], 0.0) + delta
            elif kind == "X":
                self.role(p[1]).context_sum += delta
            elif kind == "XN":
                self.role(p[1]).context_n += delta
        except (IndexError, ValueError):
            pass  # a malformed key (another version wrote it): kept in counts, ignored by the indexes

    def role_for_fingerprint(self, fp: str) -> str:
        """The role whose calls most often carried system-prompt fingerprint `fp` ('' if none)."""
        roles = self.fp_roles.get(fp)
        if not roles:
            return ""
        if len(roles) == 1:  # the usual case: one role per system prompt
            return next(iter(roles))
        return max(roles.items(), key=lambda kv: kv[1])[0]

    def to_json(self, prune_share: float = 0.05, bound_quantile: float = 0.95) -> dict[str, object]:
        """The model as plain JSON: automaton, structure and per-role length statistics."""
        roles: dict[str, object] = {}
        for name, r in sorted(self.roles.items()):
            out_t = self.role_trans.get(name, {})
            total = sum(out_t.values())
            roles[name] = {
                "calls": r.calls,
                "starts": r.starts,
                "output_tokens": {"mean": round(r.output.mean, 1), "bound": r.output.quantile(bound_quantile),
                                  "p50": r.output.quantile(0.5)},
                "prompt_tokens": {"mean": round(r.prompt.mean, 1), "bound": r.prompt.quantile(bound_quantile),
                                  "p50": r.prompt.quantile(0.5)},
                "fanout": {str(w): c for w, c in sorted(r.fanout.items())},
                "fanout_mean": round(r.fanout_mean(), 3),
                "visits_per_workflow": {str(v): c for v, c in sorted(r.visits.items())},
                "system_fingerprint": max(r.fingerprints.items(), key=lambda kv: kv[1])[0] if r.fingerprints else "",
                "context_carried": round(r.context_sum / r.context_n, 3) if r.context_n else None,
                "transitions": {
                    n: {"count": c, "share": round(c / total, 4), "pruned": c / total < prune_share,
                        "prefix_kept": round(r.carry(n), 3)}
                    for n, c in sorted(out_t.items(), key=lambda kv: -kv[1])
                } if total > 0 else {},
            }
        starts_total = sum(r.starts for r in self.roles.values())
        return {
            "app": self.app,
            "workflows_started": starts_total,
            "workflows_finished": self.workflows_finished,
            "workflow_calls": {"mean": round(self.lengths.mean, 2), "bound": self.lengths.quantile(bound_quantile)},
            "start": {n: round(r.starts / starts_total, 4) for n, r in sorted(self.roles.items())
                      if r.starts > 0} if starts_total else {},
            "end": {n: round(t.get(END, 0.0) / sum(t.values()), 4) for n, t in sorted(self.role_trans.items())
                    if sum(t.values()) > 0 and t.get(END)},
            "roles": roles,
            "prune_share": prune_share,
            "bound_quantile": bound_quantile,
        }
