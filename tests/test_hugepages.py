"""meshlm.hugepages: the 2 MiB pages under CPU buffers advised and collapsed, contents unchanged."""

import platform
import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meshlm import hugepages

PAGE = hugepages.PAGE
THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
thp_on = sys.platform.startswith("linux") and THP.exists() and "[never]" not in THP.read_text()
collapse = thp_on and tuple(int(v) for v in re.findall(r"\d+", platform.release())[:2]) >= (6, 1)


def test_pages_cover_every_byte_and_no_more():
    assert list(hugepages.pages(PAGE, PAGE)) == [PAGE]
    assert list(hugepages.pages(PAGE + 1, PAGE)) == [PAGE, 2 * PAGE]
    assert list(hugepages.pages(PAGE - 1, 2)) == [0, PAGE]
    assert list(hugepages.pages(3 * PAGE + 5, 10)) == [3 * PAGE]
    assert list(hugepages.pages(3 * PAGE + 5, 0)) == []


def _anon_huge_kb(ptr: int) -> int:
    """AnonHugePages of the mapping that holds ptr (/proc/self/smaps)."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        m = re.match(r"([0-9a-f]+)-([0-9a-f]+) ", line)
        if m:
            inside = int(m.group(1), 16) <= ptr < int(m.group(2), 16)
        elif inside and line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return 0


@pytest.mark.skipif(not thp_on, reason="transparent huge pages unavailable on this host")
def test_advise_collapses_the_pages_and_keeps_the_contents():
    host = np.random.default_rng(0).standard_normal((3 << 20,), np.float32)  # 12 MiB: 6-7 pages
    x = jax.device_put(host, jax.devices("cpu")[0])
    ptr = x.unsafe_buffer_pointer()
    info = hugepages.advise({"w": x, "not an array": 3})
    assert info["skipped"] is None and info["pages"] >= 6, info
    assert np.array_equal(np.asarray(x), host)
    assert np.asarray(jnp.sum(x)) == pytest.approx(host.sum(dtype=np.float64), rel=1e-4)
    if collapse:  # MADV_COLLAPSE (Linux 6.1+): every page inside the buffer now, the mapping says so
        assert info["collapsed"] >= info["pages"] - 2, info  # the two edge pages may reach past its mapping
        assert _anon_huge_kb(ptr + PAGE) >= 2048


def test_switched_off_it_touches_nothing(monkeypatch):
    monkeypatch.setenv("MESHLM_HUGEPAGES", "0")
    x = jax.device_put(np.ones((1 << 20,), np.float32), jax.devices("cpu")[0])
    assert hugepages.advise(x) == {"pages": 0, "collapsed": 0, "skipped": "MESHLM_HUGEPAGES=0"}


def test_nothing_to_advise_says_so():
    assert hugepages.advise({"a": np.ones(4), "b": None})["skipped"] in ("no CPU buffers", "not Linux")


@pytest.mark.skipif(not thp_on, reason="transparent huge pages unavailable on this host")
def test_placed_weights_are_advised_and_unchanged(monkeypatch):
    from meshlm import reference
    from meshlm.config import preset
    from meshlm.layouts import MeshShape
    from meshlm.sharded import ShardedModel

    cfg = preset("tiny-llama")
    params = reference.init_params(cfg, jax.random.key(0))
    sm = ShardedModel(cfg, MeshShape(1, 1, 1))
    placed = sm.shard_params(params, "int8")
    assert sm.hugepages["skipped"] is None and sm.hugepages["pages"] >= 1, sm.hugepages
    monkeypatch.setenv("MESHLM_HUGEPAGES", "0")
    plain = sm.shard_params(params, "int8")
    assert sm.hugepages["pages"] == 0
    for a, b in zip(jax.tree.leaves(placed), jax.tree.leaves(plain), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
