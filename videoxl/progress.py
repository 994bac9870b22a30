"""Progress bars for the long stages (vision, prefill, decode), on stderr and only when asked for."""
from __future__ import annotations


def progress(iterable, total: int | None, desc: str, enabled):
    """A tqdm bar on stderr when `enabled` is True or a collection naming `desc` ("vision", "prefill", ...).
    With `iterable=None`, a bar to advance by hand (`bar.update_to(n)`), or None when disabled."""
    if not (enabled is True or (enabled and not isinstance(enabled, bool) and desc in enabled)):
        return iterable
    from tqdm import tqdm

    bar = tqdm(iterable, total=total, desc=desc, unit="", leave=False, dynamic_ncols=True)
    bar.update_to = lambda n: bar.update(n - bar.n)
    return bar


def close(bar) -> None:
    if bar is not None:
        bar.close()
