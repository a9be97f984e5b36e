"""One `sh benchmarks/bench_cpu.sh` run as a row of benchmarks/results/bench_cpu_runs.json (its
"fields" say what each number is), printed, and appended with --append.

    python benchmarks/runs_row.py --start "2026-12-06 21:10" --host zen2 --code 5ce2f1a
                                  [--results benchmarks/results] [--spec ~/.cache/meshlm/local.json]
                                  [--append]

Reads the run's vs_transformers.json, vs_llamacpp.json, bench_cpu_prefill.json, bench_cpu_grid.json,
bench_cpu_long.json and the calibration it ran against (--spec: the chip spec `meshlm calibrate`
wrote at the start of the run). Every number is derived from those files: mbu_cmp, the int8
batch-1 step of the llama.cpp comparison as a share of the calibrated bandwidth, prices it at the
weights and a 192-position KV cache (128 prompt + 64 generated tokens), both taken from the grid's
int8 batch-1 rows (bytes per step at 16 and at 128 input tokens give the bytes per cached position).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from meshlm.hardware import local_spec_path


def _load(results: Path, name: str) -> dict:
    path = results / f"{name}.json"
    if not path.exists():
        raise SystemExit(f"error: {path} is missing: run `sh benchmarks/bench_cpu.sh` first")
    return json.loads(path.read_text())


def _row(rows: list[dict], **want) -> dict:
    hits = [r for r in rows if all(r.get(k) == v for k, v in want.items())]
    if len(hits) != 1:
        raise SystemExit(f"error: {len(hits)} rows match {want}, expected one")
    return hits[0]


def _pct_errors(rows: list[dict]) -> list[float]:
    return [100 * abs(r[k]) for r in rows for k in ("ttft_rel_err", "decode_rel_err")]


def summarize(results: Path, spec: dict, start: str, host: str, code: str) -> dict:
    hf, ll = _load(results, "vs_transformers")["rows"], _load(results, "vs_llamacpp")["rows"]
    pre, grid, long = (_load(results, n)["rows"] for n in ("bench_cpu_prefill", "bench_cpu_grid", "bench_cpu_long"))
    bw = spec["hbm_bw"]
    hf_i8, hf_f32 = _row(hf, batch=1, weights="int8"), _row(hf, batch=1, weights="f32")
    l1, l8, l8f = _row(ll, batch=1, weights="int8"), _row(ll, batch=8, weights="int8"), _row(ll, batch=8, weights="f32")

    def b1(w: str) -> list[dict]:  # batch-1 decode at 16, 128 and 1024 tokens (f32 cache)
        return [_row(grid, weights=w, batch=1, input_len=16), _row(grid, weights=w, batch=1, input_len=128),
                _row(long, weights=w, batch=1, input_len=1024, kv_cache="f32")]

    def step_bytes(r: dict) -> float:
        return r["decode_mbu"] * r["decode_p50_s"] * r["chip_mem_bw"]

    i8, f32 = b1("int8"), b1("f32")
    i16, i128 = i8[:2]  # caches of 16 + gen and 128 + gen positions
    per_pos = (step_bytes(i128) - step_bytes(i16)) / (i128["input_len"] - i16["input_len"])
    weights = step_bytes(i16) - per_pos * (i16["input_len"] + i16["gen_len"])
    cmp_bytes = weights + per_pos * 192
    f32_cache = [r for r in grid + long if r["kv_cache"] == "f32"]
    errs, bf16 = _pct_errors(f32_cache), _pct_errors([r for r in long if r["kv_cache"] == "bf16"])
    return {
        "start_utc": start, "host": host, "code": code,
        "hf_i8": hf_i8["ratio_tokens_per_s"], "hf_f32": hf_f32["ratio_tokens_per_s"],
        "hf_ms": 1e3 * hf_f32["hf_decode_s_per_token"],
        "i8_ms_hf": 1e3 * hf_i8["meshlm_decode_p50_s"], "f32_ms_hf": 1e3 * hf_f32["meshlm_decode_p50_s"],
        "l1": l1["ratio_tokens_per_s"], "l8": l8["ratio_tokens_per_s"], "l8f": l8f["ratio_tokens_per_s"],
        "l1_ms": [1e3 * l1["meshlm_decode_p50_s"], 1e3 * l1["llama_decode_p50_s"]],
        "l8_ms": [1e3 * l8["meshlm_decode_p50_s"], 1e3 * l8["llama_decode_p50_s"]],
        "mbu": [100 * r["decode_mbu"] for r in i8], "mbu_f32": [100 * r["decode_mbu"] for r in f32],
        "mbu_cmp": 100 * cmp_bytes / (l1["meshlm_decode_p50_s"] * bw),
        "dec_ms": [1e3 * r["decode_p50_s"] for r in i8],
        "pre_f32": 100 * _row(pre, weights="f32")["prefill_mfu"], "pre_i8": 100 * _row(pre, weights="int8")["prefill_mfu"],
        "med": statistics.median(errs), "worst": max(errs), "within": sum(e <= 30 for e in errs), "n_errs": len(errs),
        "bw": bw / 1e9, "peak": spec["peak_flops"] / 1e9,
        "tput": {w: [_row(grid, weights=w, batch=b, input_len=16)["tokens_per_s"] for b in (1, 4, 16, 64)]
                 for w in ("f32", "int8")},
        "kv_bf16_1024": {f"{w} B={b}": [1e3 * _row(long, weights=w, batch=b, kv_cache=kv)["decode_p50_s"]
                                        for kv in ("f32", "bf16")] for w in ("f32", "int8") for b in (1, 4, 16)},
        "bf16_errs": {"median": statistics.median(bf16), "worst": max(bf16), "n": len(bf16)},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--start", required=True, help='when the run began, "YYYY-MM-DD HH:MM" (UTC)')
    ap.add_argument("--host", required=True, help="which host group (docs/performance.md), e.g. zen2, zen4, intel")
    ap.add_argument("--code", required=True, help="the commit the run measured")
    ap.add_argument("--results", default="benchmarks/results")
    ap.add_argument("--spec", default=str(local_spec_path()), help="the run's calibration (default: $MESHLM_HOME/local.json)")
    ap.add_argument("--append", action="store_true", help="append the row to bench_cpu_runs.json")
    a = ap.parse_args()
    results = Path(a.results)
    spec = json.loads(Path(a.spec).read_text())
    row = summarize(results, spec, a.start, a.host, a.code)
    print(json.dumps(row))
    if a.append:
        runs_path = results / "bench_cpu_runs.json"
        runs = json.loads(runs_path.read_text())
        runs["runs"].append(row)
        runs_path.write_text(json.dumps(runs, indent=1))
        print(f"appended to {runs_path}")


if __name__ == "__main__":
    main()
