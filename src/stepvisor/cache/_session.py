"""One run's cache: keys made, entries looked up and kept, on the Supervisor's thread.

The run's shell (:mod:`stepvisor.actors._shell`) carries out the machine's
``LookUpCache`` and ``PutInCache`` effects here.  Nothing here may fail the
run: a value that cannot be hashed, a damaged entry or a store that fails
makes the step compute, with a note that says why, and a log line.

Each artifact's content is hashed once per run, when a cached step first
needs it (or when a cached step's result is kept, which hashes its outputs):
``_digests`` keeps the digest by (the rank of its maker, its name), and a
reused step's outputs take the digests stored with its entry, unhashed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

from stepvisor._log import log
from stepvisor.cache._code import code_digest
from stepvisor.cache._digest import UnhashableValue, value_digest
from stepvisor.cache._entry import CacheEntry, UnreadableEntryError, pack, unpack
from stepvisor.cache._key import Key, key_of, why_changed
from stepvisor.cache._spec import Cache
from stepvisor.config import Resolved
from stepvisor.core.effects import LookUpCache
from stepvisor.core.messages import CacheAnswer
from stepvisor.core.model import Step, Workflow
from stepvisor.store.base import CacheStore, RunStore

__all__ = ["NO_ENTRY", "UNREADABLE", "CacheSession", "cached_ranks", "setting_of"]

NO_ENTRY: Final = "computed: no entry"
UNREADABLE: Final = "computed: stored entry unreadable"
EXPIRED: Final = "computed: entry expired"


def setting_of(step: Step, cfg: Resolved) -> Cache | None:
    """The step's cache, or ``None``: its own ``cache=``, else the run's ``cache`` setting."""
    if step.cache is None:
        return Cache() if cfg.cache else None
    return step.cache if isinstance(step.cache, Cache) else None


def cached_ranks(wf: Workflow, cfg: Resolved, store: RunStore, run_id: str) -> frozenset[int]:
    """The ranks of the steps this run looks up in the cache.

    A mapped step's instances are each cached on their own.  A run whose
    store keeps no cache caches nothing, and says so once in the log.
    """
    ranks = [
        r for r, i in enumerate(wf.graph.step_at_rank) if setting_of(wf.steps[i], cfg) is not None
    ]
    if ranks and not isinstance(store, CacheStore):
        log.warning(
            "run %s: %d step(s) ask for the cache, but the run's store keeps none, so nothing "
            "could be cached; give the run a store (store='.stepvisor/runs.db', or a "
            "MemoryStore within one program)",
            run_id, len(ranks),
        )  # fmt: skip
        return frozenset()
    return frozenset(ranks)


class CacheSession:
    """The cache of one run: the store's, seen through this run's keys."""

    def __init__(
        self, wf: Workflow, cfg: Resolved, store: CacheStore, run_id: str, wall: Callable[[], float]
    ) -> None:
        self._wf = wf
        self._cfg = cfg
        self._store = store
        self._run_id = run_id
        self._wall = wall
        #: (rank of the maker, artifact name) -> content digest: each hashed once.
        self._digests: dict[tuple[int, str], str] = {}
        #: Keys of the steps computed after a miss, kept for their PutInCache.
        self._keys: dict[str, Key] = {}
        #: Keys of the entries reused, their use recorded at the run's end (flush).
        self._touched: list[str] = []

    # -- the key --------------------------------------------------------------------

    def _digest_of(self, rank: int, name: str, value: Any) -> str:
        digest = self._digests.get((rank, name))
        if digest is None:
            digest = self._digests[(rank, name)] = value_digest(value)
        return digest

    def _key(
        self, step: Step, uid: str, inputs: Mapping[str, tuple[int, Any]], index: int, item: Any
    ) -> Key | str:
        """The key of the step (or its instance ``uid``), or the note saying which value
        could not be hashed."""
        item_digest: str | None = None
        if index >= 0:
            try:
                item_digest = value_digest(item)
            except UnhashableValue as exc:
                return f"computed: item cannot be hashed: {exc}"
        params: dict[str, str] = {}
        for name, value in step.params.items():
            try:
                params[name] = value_digest(value)
            except UnhashableValue as exc:
                return f"computed: parameter {name} cannot be hashed: {exc}"
        digests: dict[str, str] = {}
        for name, (rank, value) in inputs.items():
            try:
                digests[name] = self._digest_of(rank, name, value)
            except UnhashableValue as exc:
                return f"computed: input {name} cannot be hashed: {exc}"
        cache = setting_of(step, self._cfg) or Cache()
        return key_of(
            self._wf.id, uid, code=code_digest(step.fn), params=params, inputs=digests,
            version=cache.version, item=item_digest,
        )  # fmt: skip

    # -- the effects ----------------------------------------------------------------

    def look_up_many(self, asks: Sequence[LookUpCache]) -> list[CacheAnswer]:
        """What the cache holds for each step (or instance) asked about, in order: its
        outputs to reuse, or why it must compute.  The store is read once for all of them."""
        keyed: list[tuple[int, Step, Key]] = []
        answers: list[CacheAnswer | None] = []
        for ask in asks:
            step = self._wf.steps[self._wf.graph.step_at_rank[ask.rank]]
            answer, key = self._key_or_answer(step, ask)
            answers.append(answer)
            if key is not None:
                keyed.append((len(answers) - 1, step, key))
        entries: Mapping[str, CacheEntry] = {}
        failed: Exception | None = None
        if keyed:
            try:
                entries = self._store.cache_get_many([key.digest for _, _, key in keyed])
            except Exception as exc:  # a store that fails: compute, never fail the run
                failed = exc
        for at, step, key in keyed:
            ask = asks[at]
            self._keys[ask.step_id] = key
            error = failed  # the store failed for all of them, or this entry alone
            try:
                if error is None:
                    answers[at] = self._read(step, ask, key, entries.get(key.digest))
            except Exception as exc:
                error = exc
            if error is not None:
                log.warning(
                    "run %s: the cache entry of step %r cannot be read (%s: %s); computing it",
                    self._run_id, ask.step_id, type(error).__name__, error,
                )  # fmt: skip
                answers[at] = CacheAnswer(ask.step_id, None, None, UNREADABLE)
        return [answer for answer in answers if answer is not None]

    def _key_or_answer(self, step: Step, ask: LookUpCache) -> tuple[CacheAnswer | None, Key | None]:
        try:
            key = self._key(step, ask.step_id, ask.inputs, ask.at, ask.item)
        except Exception as exc:  # a hashing bug must not fail the run
            log.exception("run %s: no cache key for step %r", self._run_id, ask.step_id)
            return CacheAnswer(ask.step_id, None, None, f"computed: no key ({exc})", False), None
        if isinstance(key, str):
            log.info("run %s: step %r %s", self._run_id, ask.step_id, key)
            return CacheAnswer(ask.step_id, None, None, key, False), None
        return None, key

    def _read(
        self, step: Step, ask: LookUpCache, key: Key, entry: CacheEntry | None
    ) -> CacheAnswer:
        uid = ask.step_id
        if entry is None:
            parts = self._store.cache_parts(self._wf.id, uid)
            note = NO_ENTRY if parts is None else why_changed(step.id, parts, key.parts)
            return CacheAnswer(uid, None, None, note)
        cache = setting_of(step, self._cfg) or Cache()
        now = self._wall()
        if cache.expire is not None and now - entry.created > cache.expire:
            return CacheAnswer(uid, None, None, EXPIRED)
        try:
            outputs = unpack(entry)
        except UnreadableEntryError as exc:
            log.warning("run %s: %s; computing step %r again", self._run_id, exc, uid)
            return CacheAnswer(uid, None, None, UNREADABLE)
        if ask.at < 0:  # an instance's outputs reach the steps below as its step's lists
            for name, digest in entry.digests.items():
                self._digests[(ask.rank, name)] = digest
        self._keys.pop(uid, None)
        self._touched.append(key.digest)
        return CacheAnswer(uid, outputs, entry.run_id, f"reused from run {entry.run_id}")

    def flush(self) -> None:
        """Record when the entries reused by this run were used (one write, at its end).

        A use is advisory (``stepvisor cache prune`` orders by it): a failing
        store or a killed program loses it, nothing else.
        """
        touched, self._touched = self._touched, []
        if not touched:
            return
        try:
            self._store.cache_touch(touched, self._wall())
        except Exception as exc:
            log.warning("run %s: the cache's last uses were not recorded (%s)", self._run_id, exc)

    def put(self, step_id: str, rank: int, outputs: Mapping[str, Any]) -> None:
        """Keep a computed step's outputs (already stored with its record) in the cache."""
        key = self._keys.pop(step_id, None)
        if key is None:
            return
        try:
            if step_id == self._wf.graph.order[rank]:
                digests = {name: self._digest_of(rank, name, v) for name, v in outputs.items()}
            else:  # an instance: its outputs are not what the steps below see
                digests = {name: value_digest(v) for name, v in outputs.items()}
            entry = pack(
                key.digest, workflow_id=self._wf.id, step_id=step_id, parts=key.parts,
                run_id=self._run_id, outputs=outputs, digests=digests, now=self._wall(),
            )  # fmt: skip
            self._store.cache_put(entry)
        except Exception as exc:  # an output that does not pickle, a store that fails
            log.warning(
                "run %s: the result of step %r was not cached (%s: %s); the run goes on",
                self._run_id, step_id, type(exc).__name__, exc,
            )  # fmt: skip
