"""The jobs the router keeps, in memory and in its journal, and which settled ones it evicts first.

Settled jobs are kept for their sites to read until ``max_jobs_kept`` or ``journal_max_bytes`` is
reached; then the site keeping the most gives up its oldest settled job, so a site that floods the
router evicts its own results, not another site's. A kept job an ``Idempotency-Key`` made stays
findable by its key (:meth:`KeptJobs.by_key`).
"""

from __future__ import annotations

import logging
import shutil
import time
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from serve.router.idempotency import KEEP_KEYED_S
from serve.router.journal import JobJournal
from serve.router.state import Job

if TYPE_CHECKING:  # the settings class lives with the facade that composes this part
    from serve.router.service import RouterSettings

log = logging.getLogger(__name__)


class KeptJobs:
    """The kept jobs (oldest first), their ``Idempotency-Key`` index, and eviction within the bounds."""

    def __init__(self, journal: JobJournal, settings: RouterSettings, busy: Callable[[str], bool]):
        """Args:
            journal: the job journal (the records evicted jobs leave).
            settings: the router's settings (``max_jobs_kept``, ``journal_max_bytes``, ``results_dir``), read
                at each eviction.
            busy: whether a job id still has work in flight (never evicted).
        """
        self.journal, self.settings, self.busy = journal, settings, busy
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        # (site, Idempotency-Key) -> job id, for every kept job a keyed POST made; rebuilt from the journal
        self._keys: dict[tuple[str, str], str] = {}

    def load(self, job: Job) -> None:
        """Keep a job read from the journal at start (no eviction: the journal was within bounds).

        Args:
            job: the journalled job.
        """
        self.jobs[job.id] = job
        self.index(job)

    def index(self, job: Job) -> None:
        """Make ``job`` findable by its ``Idempotency-Key``, where it has one.

        Args:
            job: a kept job.
        """
        if job.idempotency_key is not None:
            self._keys[(job.site, job.idempotency_key)] = job.id

    def by_key(self, site: str, key: str) -> Job | None:
        """The kept job ``site`` made with ``key``.

        Args:
            site: the site's name.
            key: the ``Idempotency-Key``.

        Returns:
            The job, or None where none is kept.
        """
        job = self.jobs.get(self._keys.get((site, key), ""))
        return job if job is not None and job.site == site else None

    def remember(self, job: Job) -> None:
        """Keep ``job``, evicting settled jobs while more than ``max_jobs_kept`` are kept or their journal
        records take more than ``journal_max_bytes``.

        Args:
            job: the job to keep (already journalled).
        """
        self.jobs[job.id] = job
        while True:
            if len(self.jobs) > self.settings.max_jobs_kept:
                old = self._evictable(lambda j: 1)
            elif self.journal.total_bytes > self.settings.journal_max_bytes:
                old = self._evictable(lambda j: self.journal.size(j.id))
            else:
                break
            if old is None:
                break
            self.jobs.pop(old.id)
            if old.idempotency_key is not None and self._keys.get((old.site, old.idempotency_key)) == old.id:
                del self._keys[(old.site, old.idempotency_key)]
            self.journal.remove(old.id)
            shutil.rmtree(Path(self.settings.results_dir) / old.site / old.id, ignore_errors=True)

    def _evictable(self, weight: Callable[[Job], int]) -> Job | None:
        """The oldest settled job of the site keeping the most (jobs, or journal bytes: ``weight`` per job):
        a site that floods the router with jobs evicts its own results, not another site's. Running jobs
        (and a cancelled job whose thread may still write) are never evicted, nor do they block later ones.
        Of that site's jobs, one an ``Idempotency-Key`` made less than 24 h ago goes only when nothing else
        of the site can: its key is promised for that long (docs/api.md), as far as the limits allow."""
        counts: dict[str, int] = {}
        for j in self.jobs.values():
            counts[j.site] = counts.get(j.site, 0) + weight(j)
        promised_after = time.time() - KEEP_KEYED_S
        for site in sorted(counts, key=counts.__getitem__, reverse=True):
            promised = None
            for j in self.jobs.values():  # oldest first
                if j.site == site and j.done and not self.busy(j.id):
                    if j.idempotency_key is None or j.created <= promised_after:
                        return j
                    promised = promised or j
            if promised is not None:
                log.warning("site %s: a job whose Idempotency-Key is less than a day old is evicted "
                            "(router.max_jobs_kept or journal_max_bytes too small for a day of its jobs)", site)
                return promised
        return None
