"""ml-lifecycle: the machine-learning lifecycle as Dagster software-defined assets."""

import os


def _numpy_without_hugepage_advice() -> None:
    """Stop numpy from asking the kernel for transparent huge pages for its large arrays.

    numpy advises huge pages for every array of 4 MB or more. Where the kernel's THP `defrag`
    setting is `madvise` (Debian's default), each such fault may compact memory first: a fresh
    27 MB array (3.4M float64) then costs ~50 ms instead of ~11 ms to touch, measured on the
    2-CPU machines this project runs on (40 fresh arrays: 2.0 s with the advice, 0.44 s
    without). The stage-1 aggregates allocate hundreds of such arrays. `NUMPY_MADVISE_HUGEPAGE`
    set in the environment (numpy's own switch) is respected."""
    if "NUMPY_MADVISE_HUGEPAGE" in os.environ:
        return
    try:
        from numpy._core.multiarray import _set_madvise_hugepage
    except ImportError:  # pragma: no cover - numpy moved its private switch
        return
    _set_madvise_hugepage(False)


_numpy_without_hugepage_advice()
