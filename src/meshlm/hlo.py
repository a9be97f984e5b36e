"""Count the collectives of a compiled program and the bytes each moves per device, from the
compiled HLO text (`jax.jit(f).lower(...).compile().as_text()`), so tests can hold the executor
to meshlm.comm's inventory.

Rules (docs/layouts.md, "HLO byte rounding rule"):
- ops: all-gather, reduce-scatter, all-reduce, all-to-all, collective-permute, and their async
  -start forms (the -done half is not counted again);
- bytes per device: all-gather its output; reduce-scatter its input (= output x group size);
  all-reduce, all-to-all (summed over a tuple), collective-permute their buffer;
- an op inside a while body counts known_trip_count times (nested loops multiply); a computation
  reached from several call sites counts once per site.
No rounding is needed: the bytes are exact integers and are compared exactly.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from meshlm.comm import COLLECTIVE_KINDS

DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "f64": 8, "s32": 4, "u32": 4, "s64": 8, "u64": 8, "s8": 1, "u8": 1,
               "s16": 2, "u16": 2, "pred": 1, "s4": 0.5, "u4": 0.5, "f8e4m3fn": 1, "f8e5m2": 1}
_OP = re.compile(r"\s(all-gather|reduce-scatter|all-reduce|all-to-all|collective-permute)(-start)?\(")
_ARRAY = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]")
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(")
_CALLS = re.compile(r"\b(body|condition|calls|to_apply|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


@dataclass(frozen=True)
class Op:
    kind: str
    bytes: float  # per device per execution (see module docstring)
    group: int  # devices in a replica group (collective-permute: 0)
    times: int  # executions per program run (loop trip counts multiplied)
    computation: str


def _arrays(text: str) -> list[float]:
    out = []
    for dt, dims in _ARRAY.findall(text):
        if dt in DTYPE_BYTES:
            out.append(math.prod(int(d) for d in dims.split(",") if d) * DTYPE_BYTES[dt])
    return out


def _group_size(line: str) -> int:
    m = re.search(r"replica_groups=\{\{([0-9,]*)\}", line)
    if m:
        return len(m.group(1).split(","))
    m = re.search(r"replica_groups=\[([0-9,]+)\]<=", line)
    if m:
        return int(m.group(1).split(",")[-1])
    return 0


def parse(text: str) -> list[Op]:
    """Every collective op in the program with its bytes and execution count."""
    comps: dict[str, list[str]] = {}
    entry, cur = None, None
    for line in text.splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith("{"):
            m = _HEADER.match(line)
            if m:
                cur = m.group(1)
                comps[cur] = []
                if line.startswith("ENTRY"):
                    entry = cur
                continue
        if cur is not None and line.startswith(" "):
            comps[cur].append(line)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    edges: dict[str, list[tuple[str, int]]] = {c: [] for c in comps}
    for c, lines in comps.items():
        for line in lines:
            trip = 1
            if " while(" in line:
                t = _TRIP.search(line)
                if not t:
                    raise ValueError(f"while loop without known_trip_count in {c}: cannot count its collectives")
                trip = int(t.group(1))
            for kind, callee in _CALLS.findall(line):
                edges[c].append((callee, trip if kind == "body" else 1))
            for group in _BRANCHES.findall(line):
                for callee in group.split(","):
                    edges[c].append((callee.strip().lstrip("%"), 1))
    times: dict[str, int] = {}

    def visit(c: str, k: int) -> None:
        times[c] = times.get(c, 0) + k
        for callee, f in edges.get(c, []):
            visit(callee, k * f)

    visit(entry, 1)
    ops = []
    for c, lines in comps.items():
        if c not in times:
            continue
        for line in lines:
            m = _OP.search(line)
            if not m:
                continue
            kind, start = m.group(1), bool(m.group(2))
            sizes = _arrays(line[line.index("=") + 1: m.start()])  # the result shape
            if start and kind in ("all-gather", "collective-permute") and len(sizes) >= 2:
                sizes = sizes[len(sizes) // 2:]  # (inputs, outputs[, contexts]): keep the outputs
                sizes = [s for s in sizes if s > 8] or sizes
            nbytes = float(sum(sizes))
            g = _group_size(line)
            if kind == "reduce-scatter":
                nbytes *= g
            ops.append(Op(kind, nbytes, g, times[c], c))
    return ops


def totals(text_or_ops) -> dict[str, float]:
    """Bytes per device per collective kind (every kind present)."""
    ops = parse(text_or_ops) if isinstance(text_or_ops, str) else text_or_ops
    t = {k: 0.0 for k in COLLECTIVE_KINDS}
    for o in ops:
        t[o.kind] += o.bytes * o.times
    return t


def counts(text_or_ops) -> dict[str, int]:
    """Executions per collective kind."""
    ops = parse(text_or_ops) if isinstance(text_or_ops, str) else text_or_ops
    c = {k: 0 for k in COLLECTIVE_KINDS}
    for o in ops:
        c[o.kind] += o.times
    return c
