"""Workflow templates (YAML in loadgen/workloads/) and their expansion into concrete workflows.

A template names its roles (fixed system prompt, which context each call carries,
prompt/output length and think-time distributions) and a list of steps: a call,
a parallel fan-out of one role, or a loop whose body repeats with a retry
probability. `expand_workload(name, n, seed)` turns it into `n` `Workflow`s;
workflow `i` depends only on (seed, i), so the first k of a larger run are the
same as a run of k. See loadgen/README.md for the format and the API.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from loadgen.dists import Dist, TemplateError, parse_dist
from loadgen.workflow import Call, Segment, Workflow, segment

CONTEXT_MODES = ("none", "predecessors", "history")
DEFAULT_MODEL = "llama-3.1-8b"
WORKLOADS_DIR = Path(__file__).resolve().parent / "workloads"  # shipped as package data


@dataclass(slots=True, frozen=True)
class RoleSpec:
    """One agent role: a fixed system prompt and the shape of its calls."""

    name: str
    system: str  # leading text of the system prompt, padded with fixed filler to system_tokens
    system_tokens: int
    include_task: bool  # the workflow's task text follows the system prompt
    context: str  # none | predecessors (outputs of the calls it waits on) | history (all ancestor turns)
    instruction: str  # label of the call's own new user content
    prompt_tokens: Dist  # tokens of the new user content (retrieved pages, test logs, user turn...)
    output_tokens: Dist
    think_time_s: Dist  # tool/user time between the predecessors' completion and this call


@dataclass(slots=True, frozen=True)
class CallStep:
    role: str


@dataclass(slots=True, frozen=True)
class ParallelStep:
    role: str
    count: Dist


@dataclass(slots=True, frozen=True)
class LoopStep:
    body: tuple[Step, ...]
    retry_probability: float  # after each iteration, another one with this probability
    min_iterations: int
    max_iterations: int


Step = CallStep | ParallelStep | LoopStep


@dataclass(slots=True, frozen=True)
class Template:
    """A parsed workload: either a workflow (roles + steps) or a weighted mix of other templates."""

    name: str
    app: str
    description: str
    task_tokens: Dist
    roles: dict[str, RoleSpec]
    steps: tuple[Step, ...]
    mix: tuple[tuple[Template, float], ...] = ()


@dataclass(slots=True, frozen=True)
class ExpandOptions:
    """Knobs applied on expansion (model name and scale factors for quick demos)."""

    model: str = DEFAULT_MODEL
    think_scale: float = 1.0
    prompt_scale: float = 1.0
    output_scale: float = 1.0
    tagged: bool = True


# ---------------------------------------------------------------- loading


def builtin_workloads() -> list[str]:
    """Names of the templates shipped in loadgen/workloads/."""
    return sorted(p.stem for p in WORKLOADS_DIR.glob("*.yaml"))


def load_template(name_or_path: str) -> Template:
    """A built-in template by name, or a template from a YAML file path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise TemplateError(f"workload file {name_or_path!r} not found")
        return parse_template(yaml.safe_load(path.read_text()), source=str(path), base_dir=path.parent)
    res = WORKLOADS_DIR / f"{name_or_path}.yaml"
    if not res.is_file():
        raise TemplateError(f"unknown workload {name_or_path!r}; built-ins: {', '.join(builtin_workloads())}")
    return parse_template(yaml.safe_load(res.read_text()), source=name_or_path)


def parse_template(raw: Any, source: str = "<template>", base_dir: Path | None = None) -> Template:
    """A `Template` from parsed YAML; raises TemplateError naming the bad field."""
    if not isinstance(raw, dict):
        raise TemplateError(f"{source}: a template must be a mapping")
    name = str(raw.get("name") or Path(source).stem)
    app = str(raw.get("app") or name)
    description = str(raw.get("description", ""))
    if "mix" in raw:
        mix_raw = raw["mix"]
        if not isinstance(mix_raw, dict) or not mix_raw:
            raise TemplateError(f"{source}.mix: expected a mapping of workload name -> weight")
        mix: list[tuple[Template, float]] = []
        for sub, w in mix_raw.items():
            if isinstance(w, bool) or not isinstance(w, int | float) or w <= 0:
                raise TemplateError(f"{source}.mix.{sub}: weight must be a positive number")
            target = str(base_dir / f"{sub}.yaml") if base_dir and (base_dir / f"{sub}.yaml").exists() else str(sub)
            mix.append((load_template(target), float(w)))
        return Template(name, app, description, Dist("fixed", 0), {}, (), tuple(mix))
    roles_raw = raw.get("roles")
    if not isinstance(roles_raw, dict) or not roles_raw:
        raise TemplateError(f"{source}.roles: expected a non-empty mapping of role name -> spec")
    roles = {str(r): _parse_role(str(r), spec, f"{source}.roles.{r}") for r, spec in roles_raw.items()}
    steps = _parse_steps(raw.get("steps"), roles, f"{source}.steps")
    task = parse_dist(raw.get("task_tokens", 0), f"{source}.task_tokens")
    return Template(name, app, description, task, roles, steps)


def _parse_role(name: str, spec: Any, where: str) -> RoleSpec:
    if not isinstance(spec, dict):
        raise TemplateError(f"{where}: expected a mapping")
    context = spec.get("context", "predecessors")
    if context not in CONTEXT_MODES:
        raise TemplateError(f"{where}.context: expected one of {', '.join(CONTEXT_MODES)}, got {context!r}")
    system_tokens = spec.get("system_tokens", 0)
    if isinstance(system_tokens, bool) or not isinstance(system_tokens, int) or system_tokens < 0:
        raise TemplateError(f"{where}.system_tokens: expected a non-negative integer")
    for key in ("prompt_tokens", "output_tokens"):
        if key not in spec:
            raise TemplateError(f"{where}: missing '{key}'")
    return RoleSpec(
        name=name,
        system=str(spec.get("system", f"You are the {name}.")),
        system_tokens=system_tokens,
        include_task=bool(spec.get("include_task", False)),
        context=context,
        instruction=str(spec.get("instruction", f"[{name} input]")),
        prompt_tokens=parse_dist(spec["prompt_tokens"], f"{where}.prompt_tokens"),
        output_tokens=parse_dist(spec["output_tokens"], f"{where}.output_tokens"),
        think_time_s=parse_dist(spec.get("think_time_s", 0), f"{where}.think_time_s"),
    )


def _parse_steps(raw: Any, roles: dict[str, RoleSpec], where: str) -> tuple[Step, ...]:
    if not isinstance(raw, list) or not raw:
        raise TemplateError(f"{where}: expected a non-empty list of steps")
    steps: list[Step] = []
    for i, s in enumerate(raw):
        w = f"{where}[{i}]"
        if isinstance(s, str):
            s = {"call": s}
        if not isinstance(s, dict) or len(s) != 1:
            raise TemplateError(f"{w}: a step is one of {{call: ROLE}}, {{parallel: ...}}, {{loop: ...}}")
        (kind, body), = s.items()
        if kind == "call":
            steps.append(CallStep(_role(body, roles, f"{w}.call")))
        elif kind == "parallel":
            if not isinstance(body, dict):
                raise TemplateError(f"{w}.parallel: expected a mapping with 'role' and 'count'")
            steps.append(ParallelStep(_role(body.get("role"), roles, f"{w}.parallel.role"),
                                      parse_dist(body.get("count", 1), f"{w}.parallel.count")))
        elif kind == "loop":
            if not isinstance(body, dict):
                raise TemplateError(f"{w}.loop: expected a mapping with 'body' and 'retry_probability'")
            p = body.get("retry_probability", 0.0)
            if isinstance(p, bool) or not isinstance(p, int | float) or not 0 <= p < 1:
                raise TemplateError(f"{w}.loop.retry_probability: expected a number in [0, 1)")
            lo, hi = body.get("min_iterations", 1), body.get("max_iterations", 10)
            if not (isinstance(lo, int) and isinstance(hi, int) and 1 <= lo <= hi):
                raise TemplateError(f"{w}.loop: need integers 1 <= min_iterations <= max_iterations")
            steps.append(LoopStep(_parse_steps(body.get("body"), roles, f"{w}.loop.body"), float(p), lo, hi))
        else:
            raise TemplateError(f"{w}: unknown step kind {kind!r} (call, parallel, loop)")
    return tuple(steps)


def _role(name: Any, roles: dict[str, RoleSpec], where: str) -> str:
    if not isinstance(name, str) or name not in roles:
        raise TemplateError(f"{where}: unknown role {name!r}; roles: {', '.join(roles)}")
    return name


# ---------------------------------------------------------------- expansion


def workflow_rng(seed: int, template: str, index: int) -> random.Random:
    """The random stream of one workflow: depends only on (seed, template, index)."""
    return random.Random(f"{seed}:{template}:{index}")  # str seeds hash with SHA-512: stable everywhere


def expand_one(template: Template, seed: int, index: int, opts: ExpandOptions = ExpandOptions()) -> Workflow:
    """Workflow number `index` of `template` for `seed` (picks the mix member for mixed templates)."""
    if template.mix:
        rng = workflow_rng(seed, template.name, index)
        members = [t for t, _ in template.mix]
        chosen = rng.choices(members, weights=[w for _, w in template.mix])[0]
        wf = expand_one(chosen, seed, index, opts)
        wf.template = f"{template.name}/{chosen.name}"
        return wf
    return _Expander(template, seed, index, opts).run()


def expand_workload(
    name_or_template: str | Template, n: int, seed: int = 0, opts: ExpandOptions = ExpandOptions()
) -> list[Workflow]:
    """`n` concrete workflows of a template (arrival times 0; see `loadgen.arrivals.assign_arrivals`)."""
    t = load_template(name_or_template) if isinstance(name_or_template, str) else name_or_template
    return [expand_one(t, seed, i, opts) for i in range(n)]


class _Expander:
    """Walks the steps of one template for one workflow, emitting calls in dependency order."""

    def __init__(self, template: Template, seed: int, index: int, opts: ExpandOptions) -> None:
        self.t = template
        self.opts = opts
        self.rng = workflow_rng(seed, template.name, index)
        self.wid = f"{template.app}-{seed}-{index:06d}"
        self.calls: list[Call] = []
        self.ancestors: list[frozenset[int]] = []
        self.outputs: list[Segment] = []
        self.inputs: list[Segment] = []
        self.groups = 0
        task_tokens = round(template.task_tokens.sample(self.rng) * opts.prompt_scale)
        self.task = segment("user", "Task:", f"task:{self.wid}", task_tokens) if task_tokens > 0 else None

    def run(self) -> Workflow:
        self._steps(self.t.steps, ())
        return Workflow(self.wid, self.t.app, self.calls, 0.0, self.t.name)

    def _steps(self, steps: tuple[Step, ...], frontier: tuple[int, ...]) -> tuple[int, ...]:
        for s in steps:
            if isinstance(s, CallStep):
                frontier = (self._emit(s.role, frontier, None),)
            elif isinstance(s, ParallelStep):
                n = s.count.sample_int(self.rng, 1)
                self.groups += 1
                frontier = tuple(self._emit(s.role, frontier, self.groups) for _ in range(n))
            else:
                iterations = s.min_iterations
                while iterations < s.max_iterations and self.rng.random() < s.retry_probability:
                    iterations += 1
                for _ in range(iterations):
                    frontier = self._steps(s.body, frontier)
        return frontier

    def _emit(self, role: str, deps: tuple[int, ...], group: int | None) -> int:
        spec = self.t.roles[role]
        o = self.opts
        idx = len(self.calls)
        new_tokens = max(1, round(spec.prompt_tokens.sample_int(self.rng, 1) * o.prompt_scale))
        out_tokens = max(1, round(spec.output_tokens.sample_int(self.rng, 1) * o.output_scale))
        think = max(0.0, spec.think_time_s.sample(self.rng)) * o.think_scale if deps else 0.0
        anc = frozenset().union(*(self.ancestors[d] | {d} for d in deps)) if deps else frozenset()
        segs: list[Segment] = []
        if spec.system_tokens > 0:
            segs.append(segment("system", spec.system, f"sys:{self.t.app}:{role}", spec.system_tokens))
        if spec.include_task and self.task is not None:
            segs.append(self.task)
        if spec.context == "predecessors":
            segs.extend(Segment("user", s.label, s.key, s.tokens) for s in (self.outputs[d] for d in deps))
        elif spec.context == "history":
            for a in sorted(anc):
                segs.append(self.inputs[a])
                segs.append(self.outputs[a])
        new = segment("user", spec.instruction, f"in:{self.wid}:{idx}", new_tokens)
        segs.append(new)
        self.inputs.append(new)
        self.outputs.append(segment("assistant", f"[{role} output]", f"out:{self.wid}:{idx}", out_tokens))
        self.ancestors.append(anc)
        self.calls.append(
            Call(
                workflow_id=self.wid,
                app=self.t.app,
                index=idx,
                role=role,
                output_tokens=out_tokens,
                depends_on=deps,
                parallel_group=group,
                think_time_s=think,
                session=self.wid,
                model=o.model,
                segments=tuple(segs),
                tagged=o.tagged,
            )
        )
        return idx


def generate(
    workload: str | Template,
    rate: float,
    n: int | None = None,
    duration_s: float | None = None,
    seed: int = 0,
    arrival: str = "poisson",
    opts: ExpandOptions = ExpandOptions(),
    burstiness: float = 0.25,
) -> list[Workflow]:
    """Workflows of a template with open-loop arrival times: `n` of them, or all arriving within `duration_s`."""
    from loadgen.arrivals import arrival_times

    times = arrival_times(arrival, rate, n=n, duration_s=duration_s, seed=seed, burstiness=burstiness)
    wfs = expand_workload(workload, len(times), seed, opts)
    for w, t in zip(wfs, times, strict=True):
        w.arrival_s = t
    return wfs
