"""`meshlm generate` (stream a continuation) and `meshlm chat` (interactive, with the chat template)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from meshlm.cli import positive_int
from meshlm.errors import MeshlmError


def add_deploy_args(p: argparse.ArgumentParser) -> None:
    """Which model, on which devices, in which layouts (shared with `meshlm serve`)."""
    p.add_argument("--model", default="default",
                   help="'default' (SmolLM2-135M-Instruct), a .gguf file or a Hugging Face checkpoint directory")
    p.add_argument("--devices", type=positive_int, help="devices to use; on a CPU-only host, simulate N devices")
    p.add_argument("--mesh", help="mesh XxYxZ (default: the planner's choice for the devices)")
    p.add_argument("--prefill-layout", metavar="FFN/ATTN", help="force the prefill layout, e.g. wg-xyz/heads")
    p.add_argument("--decode-layout", metavar="FFN/ATTN", help="force the decode layout, e.g. ws2d/batch")
    p.add_argument("--quantize", choices=["int8"], help="quantize the weights at load time")
    p.add_argument("--kv-cache", choices=["f32", "bf16"],
                   help="the KV cache's format (default: the activation dtype, f32 on CPU); bf16 halves the bytes a "
                        "long-context decode step streams")
    add_steps_arg(p)


STEPS_HELP_DEFAULT = 8  # meshlm.engine.DEFAULT_STEPS_PER_DISPATCH (not imported: the CLI parses before jax loads)


def add_steps_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps-per-dispatch", type=positive_int, metavar="K",
                   help=f"decode steps per jitted call (default {STEPS_HELP_DEFAULT}): fewer launches of the "
                        "host's ~1 ms each; tokens stream K at a time and new requests join between calls")


def steps_kw(args: argparse.Namespace) -> dict:
    """deploy()'s steps_per_dispatch when --steps-per-dispatch was given (else its default)."""
    return {"steps_per_dispatch": args.steps_per_dispatch} if args.steps_per_dispatch else {}


def deploy_kw(args: argparse.Namespace) -> dict:
    """deploy()'s keyword arguments from add_deploy_args' options (shared with `meshlm serve`)."""
    return {"prefill": args.prefill_layout, "decode": args.decode_layout, "quantize": args.quantize,
            "kv_cache": args.kv_cache, **steps_kw(args)}


def _add_model_args(p: argparse.ArgumentParser) -> None:
    add_deploy_args(p)
    p.add_argument("--max-tokens", type=positive_int, default=64, help="maximum new tokens (default 64)")
    p.add_argument("--max-len", type=positive_int, default=512, help="context length of a slot (default 512)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the K most likely tokens (0: off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar while loading")


def register(sub: Any) -> None:
    p = sub.add_parser("generate", help="generate text from a prompt on a device mesh (streams to stdout)")
    p.add_argument("prompt")
    _add_model_args(p)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--json", action="store_true", help="print one JSON object (ids, text, timings, layouts)")
    p.set_defaults(func=cmd_generate)
    c = sub.add_parser("chat", help="interactive chat with the model's chat template")
    _add_model_args(c)
    c.add_argument("--system", help="a system message")
    c.set_defaults(func=cmd_chat)


def setup_devices(args: argparse.Namespace):
    """--mesh / --devices -> (mesh or None, device count or None), simulating that many CPU
    devices before JAX starts its backends (only the CPU backend; GPUs/TPUs are used as they are)."""
    from meshlm.layouts import MeshShape
    from meshlm.mesh import simulate_cpu_devices

    mesh = MeshShape.parse(args.mesh) if args.mesh else None
    n = args.devices or (mesh.n if mesh else None)
    if n:
        simulate_cpu_devices(n)
    return mesh, n


def _setup(args: argparse.Namespace):
    """Devices first, then load and plan."""
    mesh, n = setup_devices(args)
    from meshlm.deploy import deploy
    from meshlm.sampling import SamplingParams

    sp = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                        max_tokens=args.max_tokens, stop=tuple(args.stop))
    d = deploy(args.model, n_devices=n, mesh=mesh, max_len=args.max_len, gen_len=args.max_tokens,
               progress=not args.no_progress, **deploy_kw(args))
    return d, sp


def warmup(d, ids: list[int]) -> float:
    """Compile this prompt's prefill bucket, insert and the decode step, so timings exclude compilation."""
    import time

    from meshlm.sampling import SamplingParams

    t = time.perf_counter()
    d.engine.generate_ids([ids], SamplingParams(max_tokens=2, ignore_eos=True))
    return time.perf_counter() - t


def _describe(d) -> str:
    lay = d.layouts
    return (f"{d.model.cfg.name} on {lay['decode'].mesh} ({d.chip.name}), weights {lay['decode'].weights}: "
            f"prefill {lay['prefill'].short}, decode {lay['decode'].short}")


def cmd_generate(args: argparse.Namespace) -> int:
    from meshlm.deploy import measured_vs_predicted

    d, sp = _setup(args)
    ids = d.text.encode(args.prompt, chat=args.chat)
    compile_s = warmup(d, ids)
    if args.json:
        out = {}
        for _, _, dt in d.text.stream_many([ids], sp):
            out = {"token_ids": dt.ids, "text": dt.text}
        st = d.engine.stats
        print(json.dumps({"model": d.model.source, "prompt": args.prompt, "prompt_token_ids": ids, **out,
                          "finish_reason": st.finish.get(0, "length"), "ttft_s": st.ttft_s,
                          "decode_s_per_token": st.decode_s_per_step, "layouts": d.layouts_json(),
                          "latency": measured_vs_predicted(d), "compile_s": compile_s,
                          "chip": d.chip.name}))
        return 0
    print(_describe(d), file=sys.stderr)
    for delta in d.text.stream_many([ids], sp):
        sys.stdout.write(delta[1])
        sys.stdout.flush()
    sys.stdout.write("\n")
    _print_timing(d)
    return 0


def _print_timing(d) -> None:
    from meshlm.deploy import measured_vs_predicted

    m = measured_vs_predicted(d)
    p, dd = m["prefill"], m["decode"]
    print(f"prefill {d.layouts['prefill'].short}: {p['measured_s'] * 1e3:.1f} ms measured "
          f"(predicted {p['predicted_s'] * 1e3:.1f} ms); decode {d.layouts['decode'].short}: "
          f"{dd['measured_s_per_token'] * 1e3:.1f} ms/token measured "
          f"(predicted {dd['predicted_s_per_token'] * 1e3:.1f} ms)", file=sys.stderr)


def cmd_chat(args: argparse.Namespace) -> int:
    d, sp = _setup(args)
    if not d.model.tokenizer.chat_template:
        raise MeshlmError("this model has no chat template; use `meshlm generate`")
    print(_describe(d) + "\n(empty line or Ctrl-D to quit)", file=sys.stderr)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        messages.append({"role": "user", "content": line})
        ids = d.text.encode(messages, chat=True)
        reply = []
        for delta in d.text.stream_many([ids], sp):
            reply.append(delta[1])
            sys.stdout.write(delta[1])
            sys.stdout.flush()
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": "".join(reply)})
    return 0


DEMO_PROMPT = "What is the capital of France? Answer in one sentence."
DEMO_RUNS = ((None, None), ("wg-xyz/heads", "ws2d/batch"))  # the planner's choice, then a mixed pair


def real_model_demo(n_devices: int = 8, max_tokens: int = 24, console: Any = None, runs=DEMO_RUNS) -> list[dict]:
    """SmolLM2 answers DEMO_PROMPT on n simulated devices, first with the planner's layouts, then
    with weight-gathered prefill + ws2d/batch decode; prints each answer and a table of the layouts
    with predicted vs measured latency. Call before anything initialises JAX (device simulation)."""
    from meshlm.mesh import simulate_cpu_devices

    simulate_cpu_devices(n_devices)
    from rich.table import Table

    from meshlm.checkpoints import load_model
    from meshlm.deploy import deploy, measured_vs_predicted
    from meshlm.sampling import SamplingParams

    host = load_model("default", placer_for=lambda cfg: (lambda path, a: a))  # read once, placed per run
    if console is None:
        from meshlm.cli.plan import console as wide_console
        console = wide_console()
    rows = []
    sp = SamplingParams(max_tokens=max_tokens)
    for prefill, decode in runs:
        d = deploy("default", n_devices=n_devices, prefill=prefill, decode=decode, max_len=256,
                   input_len=48, gen_len=max_tokens, host=host)
        ids = d.text.encode(DEMO_PROMPT, chat=True)
        warmup(d, ids)
        how = "planner's choice" if prefill is None else "forced"
        console.print(f"[bold]{_describe(d)}[/bold] ({how})\n> {DEMO_PROMPT}")
        answer = "".join(d.text.stream(DEMO_PROMPT, sp, chat=True))
        console.print(answer.strip() + "\n")
        m = measured_vs_predicted(d)
        for phase in ("prefill", "decode"):
            lay, r = d.layouts[phase], m[phase]
            pred = r.get("predicted_s", r.get("predicted_s_per_token"))
            meas = r.get("measured_s", r.get("measured_s_per_token"))
            rows.append({"run": how, "phase": phase, "layout": lay.short, "mesh": str(lay.mesh),
                         "weights": lay.weights, "batch": r["batch"], "predicted_ms": pred * 1e3,
                         "measured_ms": meas * 1e3, "answer": answer})
    t = Table(title=f"SmolLM2-135M-Instruct on {n_devices} simulated devices: predicted vs measured "
                    f"(prefill: whole prompt; decode: per token)")
    for col in ("run", "phase", "layout", "mesh", "weights", "batch", "predicted", "measured"):
        t.add_column(col)
    for r in rows:
        t.add_row(r["run"], r["phase"], r["layout"], r["mesh"], r["weights"], str(r["batch"]),
                  f"{r['predicted_ms']:.1f} ms", f"{r['measured_ms']:.1f} ms")
    console.print(t)
    console.print("Simulated devices share this host's cores and memory, so measured times exceed the "
                  "cost model's (priced for the generic CPU spec, see docs/engine.md).")
    return rows
