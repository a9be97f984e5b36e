"""meshlm vs transformers `generate` on the same machine, in the same run: the same weights
(SmolLM2-135M-Instruct's GGUF, dequantized once and handed to both), the same prompt ids, greedy.

    python benchmarks/vs_transformers.py [--model default] [--batch 1,8] [--prompt-len 128]
                                         [--gen-len 64] [--quantize none,int8] [--threads 2]
                                         [--out benchmarks/results/vs_transformers.json]

transformers runs in f32 (torch, `--threads` intra-op threads); meshlm runs on the local devices
(1 on a plain host) in f32 and, with int8, with weights quantized at load. Both are warmed up
first. Decode time per token: transformers' (time for gen_len tokens - time for 1) / (gen_len - 1);
meshlm's is the median decode step (meshlm.bench). The greedy tokens of meshlm f32 are compared
with transformers'.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

TEXT = ("The history of the city begins with a small settlement on the river, where traders met to "
        "exchange grain, salt and wool. Over the centuries it grew into a busy port. ")


def hf_model(cfg, params):
    """A transformers LlamaForCausalLM holding exactly meshlm's (dequantized) f32 weights."""
    import numpy as np
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    E, H, K, D, F = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.d_head, cfg.d_ff
    hc = LlamaConfig(vocab_size=cfg.vocab, hidden_size=E, intermediate_size=F, num_hidden_layers=cfg.n_layers,
                     num_attention_heads=H, num_key_value_heads=K, head_dim=D, rms_norm_eps=cfg.norm_eps,
                     rope_theta=cfg.rope_theta, max_position_embeddings=cfg.max_seq_len,
                     tie_word_embeddings=cfg.tie_embeddings, torch_dtype="float32")
    m = LlamaForCausalLM(hc).eval()
    lp = params["layers"]
    t = lambda a: torch.from_numpy(np.array(a, np.float32))  # a writable copy
    sd = {"model.embed_tokens.weight": t(params["embed"]), "model.norm.weight": t(params["final_norm"]["scale"])}
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        sd |= {p + "self_attn.q_proj.weight": t(lp["wq"][i].reshape(E, H * D).T),
               p + "self_attn.k_proj.weight": t(lp["wk"][i].reshape(E, K * D).T),
               p + "self_attn.v_proj.weight": t(lp["wv"][i].reshape(E, K * D).T),
               p + "self_attn.o_proj.weight": t(lp["wo"][i].reshape(H * D, E).T),
               p + "mlp.gate_proj.weight": t(lp["w_gate"][i].T), p + "mlp.up_proj.weight": t(lp["w_up"][i].T),
               p + "mlp.down_proj.weight": t(lp["w_out"][i].T),
               p + "input_layernorm.weight": t(lp["attn_norm"]["scale"][i]),
               p + "post_attention_layernorm.weight": t(lp["mlp_norm"]["scale"][i])}
    if not cfg.tie_embeddings:
        sd["lm_head.weight"] = t(params["lm_head"].T)
    missing, unexpected = m.load_state_dict(sd, strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k and "rotary" not in k]:
        raise SystemExit(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    return m


def time_hf(m, ids, gen_len: int, repeats: int) -> dict:
    import torch

    x = torch.tensor(ids)
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)

    def gen(n):
        t = time.perf_counter()
        with torch.inference_mode():
            out = m.generate(x, max_new_tokens=n, min_new_tokens=n, **kw)
        return time.perf_counter() - t, out

    gen(2)  # warm-up
    one = statistics.median(gen(1)[0] for _ in range(repeats))
    runs = [gen(gen_len) for _ in range(repeats)]
    full = statistics.median(r[0] for r in runs)
    tokens = runs[0][1][:, len(ids[0]):].tolist()
    per = (full - one) / (gen_len - 1)
    return {"ttft_s": one, "decode_s_per_token": per, "tokens_per_s": len(ids) / per, "tokens": tokens}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--batch", default="1")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen-len", type=int, default=64)
    ap.add_argument("--quantize", default="none,int8")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "vs_transformers.json"))
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)

    from meshlm import bench

    host = bench.load_host(args.model)
    cfg = host.cfg
    ids1 = (host.tokenizer.encode(TEXT * 64))[:args.prompt_len]
    hf = hf_model(cfg, host.params)
    rows = []
    for B in [int(b) for b in args.batch.split(",")]:
        ids = [ids1] * B
        load = os.getloadavg()[0]
        h = time_hf(hf, ids, args.gen_len, args.repeats)
        print(f"transformers f32  B={B}: TTFT {h['ttft_s'] * 1e3:7.1f} ms  decode {h['decode_s_per_token'] * 1e3:6.1f} "
              f"ms/token  {h['tokens_per_s']:6.1f} tokens/s  (load {load:.1f})", flush=True)
        for w in args.quantize.split(","):
            m = bench.on_prompts(host, ids, None if w == "none" else w, args.gen_len, args.repeats)
            same = sum(a == b for a, b in zip(m["tokens"][0], h["tokens"][0]))
            row = {"batch": B, "weights": m["weights"], "hf_ttft_s": h["ttft_s"],
                   "hf_decode_s_per_token": h["decode_s_per_token"], "hf_tokens_per_s": h["tokens_per_s"],
                   "meshlm_ttft_s": m["ttft_s"], "meshlm_decode_p50_s": m["decode_p50_s"],
                   "meshlm_tokens_per_s": m["tokens_per_s"], "ratio_tokens_per_s": m["tokens_per_s"] / h["tokens_per_s"],
                   "greedy_tokens_equal_to_hf": f"{same}/{len(m['tokens'][0])}", "loadavg_1m": load}
            rows.append(row)
            print(f"meshlm {row['weights']:4s}       B={B}: TTFT {m['ttft_s'] * 1e3:7.1f} ms  decode "
                  f"{m['decode_p50_s'] * 1e3:6.1f} ms/token  {m['tokens_per_s']:6.1f} tokens/s  -> "
                  f"{row['ratio_tokens_per_s']:.2f}x transformers; greedy tokens equal to HF: "
                  f"{row['greedy_tokens_equal_to_hf']}", flush=True)
    out = {**bench.machine(), "model": cfg.name, "prompt_len": args.prompt_len, "gen_len": args.gen_len,
           "torch_threads": args.threads, "rows": rows}
    bench.write_json(args.out, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
