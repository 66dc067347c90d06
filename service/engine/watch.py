"""Reload a model when its file changes (`server.model_watch_interval_s`).

Every interval, each served model's file is looked at off the event loop (its
size, mtime and inode: a copy in place and a rename over it both change one). A
change is acted on once it has settled, that is once two looks in a row agree,
so that a file still being written is not loaded half done. The reload is the
engine's (engine/repository.py): the old version serves until the new one is
up, and serves on if the new file does not load (logged; the watch tries again
at the file's next change). A missing file is logged and not acted on.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable, Iterable, Mapping

from trtserve.service.errors import ServeError

log = logging.getLogger(__name__)

# (mtime in ns, size, inode); None: the file is missing or unreadable.
Signature = tuple[int, int, int] | None


def signature(path: str) -> Signature:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


def _signatures(paths: Mapping[str, str]) -> dict[str, Signature]:
    return {name: signature(path) for name, path in paths.items()}


class FileWatch:
    """Watches the files of the models `served` lists, and `reload`s one when its
    file has changed. `served` returns {model name: its file} on the event loop."""

    def __init__(self, served: Callable[[], Iterable[tuple[str, str]]],
                 reload: Callable[[str], Awaitable[object]], interval_s: float) -> None:
        self._served = served
        self._reload = reload
        self._interval_s = interval_s
        # name -> (the file, its signature when last loaded or first seen).
        self._loaded: dict[str, tuple[str, Signature]] = {}
        # name -> a changed signature seen once, waiting to be seen again (settled).
        self._changed: dict[str, Signature] = {}
        self.reloads = 0  # reloads started by the watch (tests, the log)

    async def run(self) -> None:
        log.info("watching model files every %g s; a changed file is reloaded",
                 self._interval_s)
        await self.check()  # the files as they are now: the baseline
        while True:
            await asyncio.sleep(self._interval_s)
            await self.check()

    async def check(self) -> None:
        """One look at every served model's file; reloads those changed and settled."""
        paths = dict(self._served())
        found = await asyncio.to_thread(_signatures, paths)
        for name in list(self._loaded):
            if name not in paths:  # unloaded: forget it, a later load starts afresh
                self._loaded.pop(name)
                self._changed.pop(name, None)
        for name, path in paths.items():
            now = found[name]
            known = self._loaded.get(name)
            if known is None or known[0] != path:  # a new model, or loaded from another file
                self._loaded[name] = (path, now)
                self._changed.pop(name, None)
                continue
            if now == known[1]:
                self._changed.pop(name, None)
                continue
            if now is None:
                if self._changed.get(name, ()) is not None:
                    log.warning("model '%s': its file %s is gone; the loaded version serves on",
                                name, path)
                self._changed[name] = None
                continue
            if self._changed.get(name, ()) != now:  # changed since the last look: wait
                self._changed[name] = now
                continue
            self._changed.pop(name)
            self._loaded[name] = (path, now)
            await self._reload_one(name, path)

    async def _reload_one(self, name: str, path: str) -> None:
        log.info("model '%s': %s changed; reloading", name, path)
        self.reloads += 1
        try:
            await self._reload(name)
        except ServeError as e:  # the old version serves on; the next change tries again
            log.error("model '%s': reload after the file changed failed: %s", name, e)
