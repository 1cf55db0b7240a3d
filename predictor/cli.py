"""`pythia model ...`: print and draw what the predictor has learned (from Redis or a running gateway)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.parse
import urllib.request
from typing import Any

from predictor.api import Predictor


def _from_redis(url: str, prefix: str, app: str | None) -> tuple[list[str], dict[str, Any] | None]:
    """The apps stored under `prefix`, and `app`'s model JSON rebuilt from its counters."""
    import redis

    from predictor.redis_store import GEN_FIELD

    client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5, decode_responses=True)
    apps = sorted(str(a) for a in client.smembers(f"{prefix}apps"))
    if app is None:
        return apps, None
    counts: dict[str, str] = client.hgetall(f"{prefix}model:{app}")  # type: ignore[assignment]
    texts: dict[str, str] = client.hgetall(f"{prefix}text:{app}")  # type: ignore[assignment]
    counts.pop(GEN_FIELD, None)  # the hash's write counter, not a model counter
    if not counts:
        return apps, None
    p = Predictor()
    p.load_snapshot(app, {k: float(v) for k, v in counts.items()}, texts, {})
    return apps, p.model_json(app)


def _from_gateway(base: str, app: str | None) -> tuple[list[str], dict[str, Any] | None]:
    """The same through the gateway's /pythia/apps endpoints."""
    def get(path: str) -> Any:
        with urllib.request.urlopen(base.rstrip("/") + path, timeout=10) as r:
            return json.loads(r.read())

    apps = list(get("/pythia/apps").get("apps", []))
    if app is None or app not in apps:
        return apps, None
    return apps, get(f"/pythia/apps/{urllib.parse.quote(app, safe='')}/model")


def main(argv: list[str] | None = None) -> int:
    """`pythia model show APP [--png out.png] [--redis-url URL | --gateway URL]` and `pythia model list`."""
    ap = argparse.ArgumentParser(prog="pythia model", description="inspect the learned workflow models")
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name, helptext in (("show", "print an app's model as JSON (and draw it with --png)"),
                           ("list", "list the apps with a learned model")):
        sp = sub.add_parser(name, help=helptext)
        if name == "show":
            sp.add_argument("app")
            sp.add_argument("--png", help="draw the automaton to this PNG file")
        sp.add_argument("--redis-url", default=os.environ.get("PYTHIA_REDIS_URL", ""),
                        help="Redis holding the shared model (default: $PYTHIA_REDIS_URL)")
        sp.add_argument("--key-prefix", default=os.environ.get("PYTHIA_REDIS_KEY_PREFIX", "pythia:"))
        sp.add_argument("--gateway", default="", help="read from a running gateway instead, e.g. http://127.0.0.1:8080")
    args = ap.parse_args(argv)
    app = getattr(args, "app", None)
    try:
        if args.gateway:
            apps, model = _from_gateway(args.gateway, app)
        elif args.redis_url:
            apps, model = _from_redis(args.redis_url, args.key_prefix, app)
        else:
            print("pythia model: give --redis-url (or PYTHIA_REDIS_URL) or --gateway; a gateway on the memory store "
                  "keeps its model in-process, so ask it with --gateway", file=sys.stderr)
            return 2
    except Exception as e:  # unreachable Redis or gateway: say so plainly
        print(f"pythia model: cannot read the model: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    if args.cmd == "list":
        print(json.dumps({"apps": apps}))
        return 0
    if model is None:
        print(f"pythia model: no model for app {app!r}; known apps: {', '.join(apps) or '(none)'}", file=sys.stderr)
        return 1
    print(json.dumps(model, indent=2))
    if args.png:
        from predictor.draw import draw_automaton

        draw_automaton(model, args.png)
        print(f"wrote {args.png}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
