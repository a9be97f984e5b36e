"""Back the weights on CPU devices by 2 MiB pages (Linux transparent huge pages).

A decode step streams every weight from memory once. On 4 KiB pages that stream crosses a page,
and so a TLB miss and a stop for the hardware prefetchers (they do not cross pages), every 64
cache lines; on 2 MiB pages, every 32768. XLA allocates device buffers with malloc, which hosts
with THP set to `madvise` (the usual default) keep on 4 KiB pages. So once the weights are placed,
every 2 MiB page that holds part of one is advised (MADV_HUGEPAGE) and collapsed now
(MADV_COLLAPSE, Linux 6.1+; else khugepaged collapses it later). Most of a model's buffers are
smaller than 2 MiB (SmolLM2's per-layer matrices: 0.3-1.8 MB) and sit side by side on malloc's
heap, so the pages are the ones around each buffer, shared with its neighbours: advising and
collapsing change how memory is mapped, never what it holds. Pages that cannot be collapsed (a
range that is not one mapping) are left as they are.

Set MESHLM_HUGEPAGES=0 to leave the buffers as XLA made them. Where it cannot apply (not Linux,
THP off, an accelerator's memory) `advise` does nothing and says why in its return value.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import sys

import jax

from meshlm.paths import switched_off

PAGE = 2 << 20
MADV_HUGEPAGE, MADV_COLLAPSE = 14, 25  # <asm-generic/mman-common.h>


def enabled() -> bool:
    return not switched_off("MESHLM_HUGEPAGES")


@functools.cache
def _madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return fn


def pages(ptr: int, nbytes: int) -> range:
    """The start of every 2 MiB page that holds part of [ptr, ptr + nbytes)."""
    return range(ptr // PAGE * PAGE, -(-(ptr + nbytes) // PAGE) * PAGE if nbytes else 0, PAGE)


def advise(tree) -> dict:
    """Advise and collapse the 2 MiB pages under the CPU buffers of every jax.Array in `tree` (a
    pytree). -> {"pages": pages advised, "collapsed": pages collapsed now, "skipped": why nothing
    was done (None when something was)}."""
    out = {"pages": 0, "collapsed": 0, "skipped": None}
    if not enabled():
        out["skipped"] = "MESHLM_HUGEPAGES=0"
        return out
    madvise = _madvise()
    if madvise is None:
        out["skipped"] = "not Linux"
        return out
    todo = set()
    arrays = [leaf for leaf in jax.tree.leaves(tree) if isinstance(leaf, jax.Array)]
    jax.block_until_ready(arrays)  # device_put returns before its copy is done: a page being written fails to collapse
    for leaf in arrays:
        for shard in leaf.addressable_shards:
            if shard.device.platform == "cpu":
                todo.update(pages(shard.data.unsafe_buffer_pointer(), shard.data.nbytes))
    again = []
    for page in sorted(todo):
        if madvise(page, PAGE, MADV_HUGEPAGE) != 0:
            err = ctypes.get_errno()
            if err == errno.EINVAL and not out["pages"]:  # THP off ("never") or compiled out: nothing to gain
                out["skipped"] = f"madvise(MADV_HUGEPAGE): {os.strerror(err)}"
                return out
            continue  # e.g. part of the page is not mapped
        out["pages"] += 1
        if madvise(page, PAGE, MADV_COLLAPSE) == 0:
            out["collapsed"] += 1
        elif ctypes.get_errno() == errno.EAGAIN:  # transient (a page still on a per-CPU list): once more at the end
            again.append(page)
    out["collapsed"] += sum(madvise(page, PAGE, MADV_COLLAPSE) == 0 for page in again)
    if not todo:
        out["skipped"] = "no CPU buffers"
    return out
