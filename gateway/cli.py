"""`pythia` command: dispatches to the gateway, the simulated engine and the predictor tools."""

from __future__ import annotations

import sys
from collections.abc import Callable

USAGE = """usage: pythia COMMAND [options]

commands:
  serve        run the gateway (every PYTHIA_* variable is also a --flag)
  sim-engine   run one simulated vLLM engine (OpenAI API + vLLM metrics)
  model        inspect what the predictor learned (pythia model show APP --png out.png)
"""


def _serve() -> Callable[[list[str]], int]:
    from gateway.serve import main

    return main


def _sim_engine() -> Callable[[list[str]], int]:
    from pools.sim.cli import main

    return main


def _model() -> Callable[[list[str]], int]:
    from predictor.cli import main

    return main


COMMANDS: dict[str, Callable[[], Callable[[list[str]], int]]] = {
    "serve": _serve,
    "sim-engine": _sim_engine,
    "model": _model,
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `pythia` console script."""
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if args else 2
    command = COMMANDS.get(args[0])
    if command is None:
        print(f"pythia: unknown command {args[0]!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    return command()(args[1:])


if __name__ == "__main__":
    sys.exit(main())
