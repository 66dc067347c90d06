"""Follow the repository folder (`server.model_repository` with
`server.model_watch_interval_s` above 0), as Triton's `--model-control-mode=poll`.

Every interval the folder is read off the event loop (engine/folder.py). A model
whose entry differs from the one last acted on is acted on once the change has
settled, that is once two looks in a row agree (a file still being copied changes
its size or mtime between looks, so it is not loaded half done):

- a new model, a new highest version, a changed model file or config.toml: the
  model is loaded, or reloaded beside the version serving (engine/repository.py);
- a model gone from the folder (or left with no version): unloaded, what it
  accepted answered, and dropped from the index;
- an entry that cannot be loaded (a bad config.toml, a file the backend refuses):
  logged with the reason and listed UNAVAILABLE; a version serving serves on. It is
  tried again only when its files change.

The watch acts on changes of the folder, not on differences between the folder
and what is served: a model unloaded (or loaded from another file) by a client
stays so until its files change. A folder that cannot be read (an unmounted
volume) changes nothing: it is logged, and everything serves on. One entry that cannot
be read (a symlink loop, a config.toml that is not UTF-8) is that model's error only.
"""

from __future__ import annotations

import asyncio
import logging

from trtserve.service.engine.folder import FolderModel, scan
from trtserve.service.engine.repository import ModelRepository
from trtserve.service.errors import ServeError

log = logging.getLogger(__name__)


class FolderWatch:
    def __init__(self, repository: ModelRepository, root: str, interval_s: float,
                 baseline: dict[str, FolderModel]) -> None:
        self._repository = repository
        self._root = root
        self._interval_s = interval_s
        # The folder as last acted on (at start: as loaded), and as last looked at.
        self._acted = dict(baseline)
        self._seen = dict(baseline)
        self._unreadable = False
        self.changes = 0  # changes acted on (tests, the log)

    async def run(self) -> None:
        log.info("watching the repository folder %s every %g s", self._root, self._interval_s)
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                await self.check()
            except Exception:  # a look that fails unforeseen must not end the watch for good
                log.exception("the watch of the repository folder %s failed one look; it "
                              "looks again in %g s", self._root, self._interval_s)

    async def check(self) -> None:
        """One look at the folder; acts on each model whose change has settled."""
        try:
            now = await asyncio.to_thread(scan, self._root)
        except OSError as e:
            if not self._unreadable:
                log.error("cannot read the repository folder %s (%s); the models loaded "
                          "serve on", self._root, e.strerror or e)
            self._unreadable = True
            return
        if self._unreadable:
            log.info("the repository folder %s can be read again", self._root)
            self._unreadable = False
        settled = [name for name in sorted({*now, *self._seen, *self._acted})
                   if now.get(name) == self._seen.get(name)
                   and now.get(name) != self._acted.get(name)]
        self._seen = now
        for name in settled:
            entry = now.get(name)
            if entry is None:
                self._acted.pop(name, None)
            else:
                self._acted[name] = entry
        self.changes += len(settled)
        # Models change concurrently (the repository serializes each model's own).
        await asyncio.gather(*(self._act(name, now.get(name)) for name in settled))

    async def _act(self, name: str, entry: FolderModel | None) -> None:
        if entry is None:
            log.info("model '%s' left the repository folder; unloading it", name)
            await self._repository.remove(name)
        elif entry.empty:
            log.info("model '%s' has no version left in the repository folder; unloading "
                     "it", name)
            await self._repository.remove(name, entry.error)
        elif entry.config is None:
            await self._repository.mark_unavailable(name, entry.error)
        else:
            log.info("model '%s': version %s in the repository folder (%s); loading it",
                     name, entry.version, entry.config.path)
            try:
                await self._repository.load_version(entry.config, entry.version)
            except ServeError as e:  # logged by the repository; retried when files change
                log.error("model '%s' from the repository folder did not load: %s", name, e)
