"""Concrete workflows: the calls a load generator sends, their dependencies and timing.

Produced by `loadgen.workload.expand_workload` (templates) and `loadgen.traces` (trace files);
consumed by the live driver (`loadgen.driver`) and the virtual-time harness (`loadgen.simulate`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from loadgen.synth_text import TOKEN_BYTES, labelled_text, synth_text

MESSAGE_ROLES = ("system", "user", "assistant")


@dataclass(slots=True, frozen=True)
class Segment:
    """One chat message whose content is deterministic text: `label` then filler keyed by `key`."""

    role: str  # system | user | assistant
    label: str
    key: str
    tokens: int  # exact tokens of the content (label included)

    def message(self) -> dict[str, str]:
        """The OpenAI chat message this segment stands for."""
        return {"role": self.role, "content": labelled_text(self.label, self.key, self.tokens)}


def segment(role: str, label: str, key: str, tokens: int) -> Segment:
    """A segment whose token count accounts for a label longer than `tokens`."""
    head = label.rstrip() + " "
    head_tokens = -(-len(head.encode()) // TOKEN_BYTES)
    return Segment(role, label, key, max(tokens, head_tokens))


def _marker_bytes(role: str) -> int:
    return len(f"<|{role}|>".encode())  # pools.prefix_hash.flatten_messages wraps each message so


@dataclass(slots=True)
class Call:
    """One LLM call of a workflow.

    A call is *ready* when every call in `depends_on` has completed (or, with no
    dependencies, when its workflow arrives) and is sent `think_time_s` after that
    (tool or user time). Calls that share a `parallel_group` are a fan-out.
    """

    workflow_id: str
    app: str
    index: int  # position in the workflow; dependencies always point to lower indices
    role: str  # agent role ("" when a trace gives none)
    output_tokens: int  # sent as max_tokens with ignore_eos, so the engine generates exactly this many
    depends_on: tuple[int, ...] = ()
    parallel_group: int | None = None
    think_time_s: float = 0.0
    session: str = ""
    model: str = ""
    segments: tuple[Segment, ...] = ()  # the messages, built lazily (templates, Mooncake traces)
    literal_messages: list[dict[str, Any]] | None = None  # given as-is (workflow-form traces)
    literal_prompt: str | None = None  # completions-style prompt given as-is (workflow-form traces)
    completion: bool = False  # /v1/completions with the segments' text joined (Mooncake traces)
    tagged: bool = True  # whether X-Pythia-* tags may be sent (traces without tags set False)
    _prompt_tokens: int = field(default=-1, repr=False)

    @property
    def chat(self) -> bool:
        """True for /v1/chat/completions, False for /v1/completions."""
        return self.literal_prompt is None and not self.completion

    @property
    def prompt(self) -> str | None:
        """The completions prompt (None for chat calls), built on demand."""
        if self.literal_prompt is not None:
            return self.literal_prompt
        if self.completion:
            return "".join(labelled_text(s.label, s.key, s.tokens) if s.label else synth_text(s.key, s.tokens)
                           for s in self.segments)
        return None

    @property
    def messages(self) -> list[dict[str, Any]]:
        """The OpenAI chat messages (built on demand; templates keep only their recipe in memory)."""
        if self.literal_messages is not None:
            return self.literal_messages
        return [s.message() for s in self.segments]

    @property
    def prompt_tokens(self) -> int:
        """Prompt tokens under the 4-bytes-per-token rule, counted as the gateway flattens the prompt."""
        if self._prompt_tokens < 0:
            if self.literal_prompt is not None:
                n = len(self.literal_prompt.encode("utf-8", "surrogatepass"))
            elif self.completion:
                n = sum(s.tokens for s in self.segments) * TOKEN_BYTES
            elif self.literal_messages is not None:
                from pools.prefix_hash import flatten_messages

                n = len(flatten_messages(self.literal_messages).encode("utf-8", "surrogatepass"))
            else:
                n = sum(_marker_bytes(s.role) + s.tokens * TOKEN_BYTES for s in self.segments)
            self._prompt_tokens = -(-n // TOKEN_BYTES)
        return self._prompt_tokens

    def body(self, stream: bool = True, model: str | None = None, ignore_eos: bool = True) -> dict[str, Any]:
        """The OpenAI request body: exact output length via max_tokens + ignore_eos, streamed with usage."""
        b: dict[str, Any] = {"model": self.model if model is None else model}
        if not self.chat:
            b["prompt"] = self.prompt
        else:
            b["messages"] = self.messages
        b["max_tokens"] = self.output_tokens
        if ignore_eos:
            b["ignore_eos"] = True
        b["stream"] = stream
        if stream:
            b["stream_options"] = {"include_usage": True}
        return b

    def tags(self) -> dict[str, str]:
        """The X-Pythia-* headers of this call (empty values left out)."""
        if not self.tagged:
            return {}
        h = {"X-Pythia-App": self.app, "X-Pythia-Workflow": self.workflow_id, "X-Pythia-Agent": self.role}
        if self.session:
            h["X-Pythia-Session"] = self.session
        return {k: v for k, v in h.items() if v}


@dataclass(slots=True)
class Workflow:
    """One job: its calls in dependency order and when it arrives (seconds from the run's start)."""

    workflow_id: str
    app: str
    calls: list[Call]
    arrival_s: float = 0.0
    template: str = ""

    @property
    def roots(self) -> list[int]:
        """Indices of the calls sent on arrival (after their own think time)."""
        return [c.index for c in self.calls if not c.depends_on]

    def dependents(self) -> list[list[int]]:
        """For each call, the calls that wait on it."""
        out: list[list[int]] = [[] for _ in self.calls]
        for c in self.calls:
            for d in c.depends_on:
                out[d].append(c.index)
        return out

    @property
    def total_output_tokens(self) -> int:
        return sum(c.output_tokens for c in self.calls)

    @property
    def peak_context_tokens(self) -> int:
        """The largest prompt + output of any call: what decides the workflow's context-length class."""
        return max((c.prompt_tokens + c.output_tokens for c in self.calls), default=0)
