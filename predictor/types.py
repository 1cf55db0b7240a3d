"""Plain data exchanged between the gateway, the routing core and the predictor.

These types are the contract of the hot path: the gateway (or the virtual-time
harness) builds `Tags` and `RequestFeatures` once per request, asks the predictor
for a `Prediction`, hands all three to the routing core, and after the response
reports an `Outcome` back to the predictor.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True, frozen=True)
class Tags:
    """Who sent a call: app, workflow instance, agent role, session. Empty string = not given."""

    app: str = ""
    workflow: str = ""
    agent: str = ""
    session: str = ""


@dataclass(slots=True)
class RequestFeatures:
    """What routing and prediction need from one request, extracted from one JSON parse."""

    model: str
    prompt_tokens: int  # estimated: ceil(len(prompt text as UTF-8) / 4), the simulator's tokenizer rule
    max_tokens: int | None  # as requested; None = engine default
    stream: bool = False
    # hash of the system prompt (first system message, or "" when there is none)
    system_fingerprint: str = ""
    # chained hashes of fixed-size character blocks of the flattened prompt (pools.prefix_hash)
    prefix_hashes: tuple[int, ...] = ()
    # the system prompt text itself, kept so the predictor can build the next call's prefix
    system_prompt: str = ""
    priority: int | None = None  # vLLM `priority` field if the client set one
    arrival_s: float = 0.0  # when the gateway received it (monotonic seconds)
    # the chat messages as parsed (optional, by reference, not copied): lets the predictor give the
    # next call's predicted prefix as messages (Prediction.next_prefix_messages) for pre-warm
    messages: tuple[dict[str, str], ...] = ()
    # chained block hashes (as prefix_hashes) of the prompt *after* the system message: calls of
    # different roles of one workflow share its task text here, behind different system prompts,
    # which lets the predictor link untagged calls across roles (optional; () = not computed)
    content_hashes: tuple[int, ...] = ()
    # predictor.fingerprint.message_fingerprints(messages): one fingerprint per non-system message (its
    # first characters); lets an untagged call be linked to the workflow whose response it quotes
    message_fingerprints: tuple[str, ...] = ()
    # where the prompt's last assistant message ends (tokens, by the estimate of prompt_tokens; 0 when
    # there is none): an engine that generated that message for the previous call also caches it
    reply_end_tokens: int = 0

    @property
    def total_tokens_requested(self) -> int:
        """Prompt tokens plus requested output tokens (0 output when max_tokens is unset)."""
        return self.prompt_tokens + (self.max_tokens or 0)


@dataclass(slots=True, frozen=True)
class NextRole:
    """One role that may be called next, with its probability and expected parallel width."""

    role: str
    probability: float
    fanout: float = 1.0


@dataclass(slots=True)
class Prediction:
    """What the predictor expects of this call and of the rest of its workflow.

    A cold prediction (`cold=True`) carries only reactive estimates from the request
    itself; callers must not rely on its workflow fields.
    """

    cold: bool = True
    role: str = ""  # agent role, tagged or inferred ("" = unknown)
    role_inferred: bool = False
    workflow: str = ""  # workflow id, tagged or linked ("" = unknown)
    workflow_linked: bool = False
    step: int = 0  # calls of this workflow seen before this one
    output_tokens_expected: float = 0.0  # this call
    output_tokens_bound: int = 0  # this call, high quantile (0 = unknown)
    next_roles: tuple[NextRole, ...] = ()
    remaining_steps: float = 0.0  # expected calls after this one
    remaining_steps_bound: int = 0
    remaining_output_tokens: float = 0.0  # expected, over the calls after this one
    peak_context_tokens: int = 0  # predicted max prompt+output tokens over the workflow's life
    # the likely peak (median): a pool sized for the bound above would take every workflow that *might* grow
    peak_context_likely_tokens: int = 0
    # the messages the next call is predicted to start with (for pre-warm), and how sure we are
    next_prefix_messages: tuple[dict[str, str], ...] = ()
    next_prefix_confidence: float = 0.0
    confidence: float = 0.0  # overall confidence in the workflow fields, 0..1
    extra: dict[str, float] = field(default_factory=dict)


@dataclass(slots=True)
class Outcome:
    """What happened to a call, reported to the predictor after the response ends."""

    ok: bool
    prompt_tokens: int
    output_tokens: int
    cached_tokens: int = 0
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    finished_s: float = 0.0  # monotonic seconds when the response ended
    replica: str = ""
    pool: str = ""
    # predictor.fingerprint.output_fingerprint(response text) (optional): a later call that quotes this
    # response is linked to this call's workflow even behind another role's system prompt
    output_fingerprint: str = ""
