"""Simulated vLLM engine: V1 scheduler + prefix-cached KV blocks + roofline step times.

Stands alone (imports nothing else of ours). API: pools/sim/README.md.
"""

from pools.sim.engine import EngineConfig, RequestRejected, SimEngine
from pools.sim.presets import Preset, load_preset, preset_names
from pools.sim.request import EventKind, RequestEvent, RequestResult, SimRequest
from pools.sim.tokenizer import TextStream, count_tokens, flatten_messages, tokenize

__all__ = [
    "EngineConfig",
    "EventKind",
    "Preset",
    "RequestEvent",
    "RequestRejected",
    "RequestResult",
    "SimEngine",
    "SimRequest",
    "TextStream",
    "count_tokens",
    "flatten_messages",
    "load_preset",
    "preset_names",
    "tokenize",
]
