"""`meshlm serve`: the OpenAI-compatible HTTP server (continuous batching, streaming)."""

from __future__ import annotations

import sys
from typing import Any

from meshlm.cli import positive_int
from meshlm.cli.generate import add_deploy_args, deploy_kw, setup_devices


def register(sub: Any) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching and streaming",
                       description="Serve /v1/completions and /v1/chat/completions (streaming with \"stream\": "
                                   "true) from a model laid out on the local devices.")
    add_deploy_args(p)
    p.add_argument("--slots", type=positive_int, default=8, help="decode slots: requests decoded together (default 8)")
    p.add_argument("--max-len", type=positive_int, default=1024, help="context length of a slot (default 1024)")
    p.add_argument("--max-waiting", type=positive_int, default=256,
                   help="requests queued beyond the slots before new ones get HTTP 429 (default 256)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.set_defaults(func=run)


def run(args) -> int:
    mesh, n = setup_devices(args)
    import uvicorn

    from meshlm.deploy import deploy
    from meshlm.server import Scheduler, create_app

    d = deploy(args.model, n_devices=n, mesh=mesh, slots=args.slots, max_len=args.max_len, **deploy_kw(args))
    lay = ", ".join(f"{ph} {d.layouts[ph].short}" for ph in ("prefill", "decode"))
    print(f"meshlm serve: {d.model.cfg.name} on {d.layouts['decode'].mesh} ({lay}), {d.engine.slots} slots, "
          f"http://{args.host}:{args.port}/v1", file=sys.stderr)
    sched = Scheduler(d.engine, d.model.tokenizer, max_waiting=args.max_waiting)
    try:
        uvicorn.run(create_app(sched, d.model.cfg.name), host=args.host, port=args.port, log_level="warning")
    finally:
        sched.close()
    return 0
