"""One way to run a per-item function over many items: in this process or in a pool, with progress.

Stages that process images one by one (generation, saliency, export, evaluation) share it, so the
pool is always torn down (also on an error or a kill of the consumer) and the progress bar closed.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
from typing import Any, Callable, Iterable, Iterator, Sequence


@contextlib.contextmanager
def parallel_map(fn: Callable[[Any], Any], items: Sequence[Any], *, workers: int,
                 initializer: Callable[..., None] | None = None, initargs: tuple = (),
                 local_initializer: Callable[[], None] | None = None, start_method: str = "fork",
                 ordered: bool = True, chunksize: int = 1, progress: bool = False,
                 desc: str = "", unit: str = "img", **bar_options: Any) -> Iterator[Iterable[Any]]:
    """Yields an iterator over ``fn(item)`` for every item.

    ``workers <= 1`` (or one item): in this process, after ``local_initializer()`` (default:
    ``initializer(*initargs)``). Otherwise a pool of ``min(workers, len(items))`` processes started
    with ``start_method`` ("fork" where the platform has it; "spawn" for libraries whose threads do
    not survive a fork), each running ``initializer(*initargs)`` once; ``ordered=False`` yields
    results as they finish. A tqdm bar (``desc``, ``unit``, ``bar_options``) advances per result.
    """
    pool = None
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(items), desc=desc, unit=unit, **bar_options)
    try:
        if workers > 1 and len(items) > 1:
            if start_method not in mp.get_all_start_methods():
                start_method = None
            pool = mp.get_context(start_method).Pool(min(workers, len(items)), initializer=initializer,
                                                     initargs=initargs)
            results: Iterable[Any] = (pool.imap if ordered else pool.imap_unordered)(fn, items, chunksize=chunksize)
        else:
            if local_initializer is not None:
                local_initializer()
            elif initializer is not None:
                initializer(*initargs)
            results = map(fn, items)
        yield _counted(results, bar)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        if bar is not None:
            bar.close()


def _counted(results: Iterable[Any], bar: Any) -> Iterator[Any]:
    for result in results:
        if bar is not None:
            bar.update(1)
        yield result
