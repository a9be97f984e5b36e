"""meshlm vs llama.cpp (through llama-cpp-python) on the same GGUF, the same prompt ids, greedy,
in the same run: time to first token and decode time per token at each batch size.

    python benchmarks/vs_llamacpp.py [--batch 1,8] [--prompt-len 128] [--gen-len 64] [--threads 2]
                                     [--quantize none,int8] [--repeats 3] [--visits 1] [--llama-python PATH]
                                     [--out benchmarks/results/vs_llamacpp.json]

llama-cpp-python compiles from source (~10 minutes on 2 cores), so it is not a project
dependency: install it into its own virtualenv, e.g.
    python -m venv /work/llamacpp-venv && /work/llamacpp-venv/bin/pip install llama-cpp-python
On a CPU with AMX (Intel Sapphire Rapids and later) llama.cpp 0.3.36's -march=native build crashed in
its AMX matmul (ldtilecfg: general protection fault) on the 2026-12-06 Intel VM; build it without AMX:
    CMAKE_ARGS="-DCMAKE_C_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16' \\
                -DCMAKE_CXX_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16'" \\
        /work/llamacpp-venv/bin/pip install --force-reinstall --no-deps --no-cache-dir llama-cpp-python==0.3.36
llama.cpp is then driven by that interpreter (--llama-python, or $MESHLM_LLAMA_PYTHON, default
/work/llamacpp-venv/bin/python; or this one when it can import llama_cpp), in a child process
running this file with --worker. Without it the script says so and exits 2.

llama.cpp runs the GGUF's own quantization (SmolLM2: Q4_1) with --threads threads, all batch
sequences in one llama_batch per step (n_seq_max = batch). meshlm runs the same file dequantized
(f32) or re-quantized to int8 at load, on the local devices. With --visits V both engines are
measured V times, alternately (meshlm a fresh deployment each visit), and compared by the medians
of their visits: on a shared host a slow stretch then meets both rather than one.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time


def worker(args) -> dict:
    """Runs under the llama-cpp-python interpreter: prefill + greedy decode of `prompts`."""


    import llama_cpp as lc
    import numpy as np

    prompts = json.loads(sys.stdin.read())
    B, P, G = len(prompts), len(prompts[0]), args.gen_len
    lc.llama_backend_init()
    mp = lc.llama_model_default_params()
    model = lc.llama_model_load_from_file(args.gguf.encode(), mp)
    cp = lc.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = B * (P + G + 16), B * P, B * P, B
    cp.n_threads = cp.n_threads_batch = args.threads
    ctx = lc.llama_init_from_model(model, cp)
    V = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(model))
    batch = lc.llama_batch_init(B * P, 0, B)

    def decode(items):  # [(token, pos, seq, want_logits)]
        batch.n_tokens = len(items)
        for i, (tok, pos, seq, out) in enumerate(items):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = tok, pos, 1
            batch.seq_id[i][0], batch.logits[i] = seq, out
        if lc.llama_decode(ctx, batch) != 0:
            raise SystemExit("llama_decode failed")
        return [int(np.argmax(np.ctypeslib.as_array(lc.llama_get_logits_ith(ctx, j), shape=(V,))))
                for j, it in enumerate(items) if it[3]]

    def run(gen):
        lc.llama_memory_clear(lc.llama_get_memory(ctx), True)
        t = time.perf_counter()
        nxt = decode([(tok, p, s, p == P - 1) for s, pr in enumerate(prompts) for p, tok in enumerate(pr)])
        ttft = time.perf_counter() - t
        out, steps = [[n] for n in nxt], []
        for g in range(gen):
            t = time.perf_counter()
            nxt = decode([(nxt[s], P + g, s, True) for s in range(B)])
            steps.append(time.perf_counter() - t)
            for s in range(B):
                out[s].append(nxt[s])
        return ttft, steps, out

    run(2)  # warm-up
    ttfts, steps, tokens = [], [], None
    for r in range(args.repeats):
        ttft, st, out = run(G - 1 if r == 0 else 0)
        ttfts.append(ttft)
        steps += st
        tokens = tokens or out
    lc.llama_batch_free(batch)
    p50 = statistics.median(steps)

    return {"ttft_s": statistics.median(ttfts), "decode_p50_s": p50, "tokens_per_s": B / p50, "tokens": tokens}


def median_visit(B: int, xs: list[dict]) -> dict:
    """One engine's visits as one measurement, as `meshlm bench --visits` merges them: the medians of
    their TTFT and decode p50; the rest (weights, tokens) from the first visit."""
    p50 = statistics.median(x["decode_p50_s"] for x in xs)
    return {**xs[0], "ttft_s": statistics.median(x["ttft_s"] for x in xs), "decode_p50_s": p50, "tokens_per_s": B / p50}


def llama_python(explicit: str | None) -> str | None:
    try:
        import llama_cpp  # noqa: F401

        return sys.executable
    except ImportError:
        pass
    for p in (explicit, os.environ.get("MESHLM_LLAMA_PYTHON"), "/work/llamacpp-venv/bin/python"):
        if p and os.path.exists(p):
            r = subprocess.run([p, "-c", "import llama_cpp"], capture_output=True)
            if r.returncode == 0:
                return p
    return None


def worker_failure(returncode: int, stderr: str) -> str:
    """One message for a worker that failed: how it ended (a signal by name: llama.cpp crashes in C,
    with its log as the last thing on stderr) and the lines that say why, not the last of its log."""
    how = f"exit status {returncode}"
    if returncode < 0:
        try:
            how = f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            how = f"killed by signal {-returncode}"
    lines = stderr.strip().splitlines()
    why = [ln for ln in lines if ln.startswith(("Traceback", "  File", "Error", "error")) or "Error:" in ln]
    hint = ("; a crash inside llama.cpp's CPU backend usually means the wheel was built for an ISA this host "
            "runs badly (on the Intel host of 2026-12-06 its AMX path crashed: rebuild with AMX off, see this "
            "file's docstring)") if returncode < 0 else ""
    tail = "\n".join((why or lines)[-12:])
    return f"llama.cpp worker failed ({how}){hint}:\n{tail}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default", help="a GGUF file (default: SmolLM2-135M-Instruct Q4_1)")
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen-len", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quantize", default="none,int8")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--visits", type=int, default=1,
                    help="measure both engines this many times, alternately (meshlm a fresh deployment each "
                         "time); the medians of the visits' TTFT and decode p50 are compared")
    ap.add_argument("--llama-python", default=None)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--gguf", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "vs_llamacpp.json"))
    args = ap.parse_args(argv)
    if args.visits < 1 or args.repeats < 1:
        ap.error("--visits and --repeats must be at least 1")
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    py = llama_python(args.llama_python)
    if py is None:
        print("llama_cpp is not importable (here, --llama-python, $MESHLM_LLAMA_PYTHON or /work/llamacpp-venv): "
              "install llama-cpp-python into its own virtualenv (see this file's docstring); nothing measured",
              file=sys.stderr)
        return 2


    from meshlm import bench
    from meshlm.checkpoints import default_model_path

    gguf = str(default_model_path()) if args.model == "default" else args.model
    if not gguf.endswith(".gguf"):
        print(f"--model must be a GGUF file (llama.cpp reads only GGUF), got {gguf}", file=sys.stderr)
        return 2
    host = bench.load_host(gguf)
    from vs_transformers import TEXT  # the same prompt text as the transformers comparison

    ids1 = host.tokenizer.encode(TEXT * 64)[:args.prompt_len]
    weights = args.quantize.split(",")
    rows = []
    for B in [int(b) for b in args.batch.split(",")]:
        ids = [ids1] * B
        load, lls, ms = os.getloadavg()[0], [], {w: [] for w in weights}
        for v in range(args.visits):  # both engines once a visit: a slow stretch of the host meets both
            r = subprocess.run([py, os.path.abspath(__file__), "--worker", "--gguf", gguf, "--gen-len",
                                str(args.gen_len), "--threads", str(args.threads), "--repeats", str(args.repeats)],
                               input=json.dumps(ids), capture_output=True, text=True)
            if r.returncode != 0:
                print(worker_failure(r.returncode, r.stderr), file=sys.stderr)
                return 2
            lls.append(json.loads(r.stdout.strip().splitlines()[-1]))
            for w in weights:  # a fresh deployment each visit, as `meshlm bench --visits`
                ms[w].append(bench.on_prompts(host, ids, None if w == "none" else w, args.gen_len, args.repeats))
            if args.visits > 1:
                print(f"visit {v + 1}/{args.visits} B={B}: llama.cpp {lls[-1]['decode_p50_s'] * 1e3:.2f} ms/step, "
                      + ", ".join(f"meshlm {ms[w][-1]['weights']} {ms[w][-1]['decode_p50_s'] * 1e3:.2f}" for w in weights),
                      flush=True)
        ll = median_visit(B, lls)
        print(f"llama.cpp (GGUF quant, {args.threads} threads) B={B}: TTFT {ll['ttft_s'] * 1e3:7.1f} ms  decode "
              f"{ll['decode_p50_s'] * 1e3:6.2f} ms/step  {ll['tokens_per_s']:6.1f} tokens/s  (load {load:.1f})",
              flush=True)
        for w in weights:
            m = median_visit(B, ms[w])
            same = sum(a == b for a, b in zip(m["tokens"][0], ll["tokens"][0]))  # first visits' (median_visit)
            row = {"batch": B, "weights": m["weights"], "llama_ttft_s": ll["ttft_s"],
                   "llama_decode_p50_s": ll["decode_p50_s"], "llama_tokens_per_s": ll["tokens_per_s"],
                   "meshlm_ttft_s": m["ttft_s"], "meshlm_decode_p50_s": m["decode_p50_s"],
                   "meshlm_tokens_per_s": m["tokens_per_s"],
                   "ratio_tokens_per_s": m["tokens_per_s"] / ll["tokens_per_s"],
                   "greedy_tokens_equal_to_llama": f"{same}/{len(m['tokens'][0])}", "loadavg_1m": load,
                   "visits": args.visits, "llama_decode_p50_visits_s": [x["decode_p50_s"] for x in lls],
                   "meshlm_decode_p50_visits_s": [x["decode_p50_s"] for x in ms[w]]}
            rows.append(row)
            print(f"meshlm {row['weights']:4s}                      B={B}: TTFT {m['ttft_s'] * 1e3:7.1f} ms  decode "
                  f"{m['decode_p50_s'] * 1e3:6.2f} ms/step  {m['tokens_per_s']:6.1f} tokens/s  -> "
                  f"{row['ratio_tokens_per_s']:.2f}x llama.cpp (greedy tokens equal: {row['greedy_tokens_equal_to_llama']})",
                  flush=True)
    out = {**bench.machine(), "gguf": os.path.basename(gguf), "threads": args.threads,
           "prompt_len": args.prompt_len, "gen_len": args.gen_len, "rows": rows}
    bench.write_json(args.out, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
