"""The upload spool: queued uploads wait on the router's disk, not in its memory, until their jobs settle.

A spooled file is named by its job's id (plus the upload's suffix), so a restarted router finds the
upload of each job it resumes, and removes those no journalled job owns.
"""

from __future__ import annotations

from pathlib import Path
from typing import Collection


class Spool:
    """The folder of spooled uploads (``{results_dir}/.incoming``)."""

    def __init__(self, root: Path):
        """Args:
            root: the folder (made where missing).
        """
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)

    def path_for(self, job_id: str, suffix: str) -> Path:
        """Where a job's upload is spooled.

        Args:
            job_id: the job's id.
            suffix: the upload's suffix (``.nii.gz``, ...).

        Returns:
            The file's path.
        """
        return self.root / f"{job_id}{suffix}"

    def find(self, job_id: str) -> Path | None:
        """The job's spooled upload, if it is still there.

        Args:
            job_id: the job's id.

        Returns:
            The file, or None.
        """
        return next(iter(self.root.glob(f"{job_id}*")), None)

    def remove(self, job_id: str) -> None:
        """Remove the job's spooled upload, if any.

        Args:
            job_id: the job's id.
        """
        for f in self.root.glob(f"{job_id}*"):
            f.unlink(missing_ok=True)

    def keep_only(self, job_ids: Collection[str]) -> None:
        """Remove every spooled file no job in ``job_ids`` owns (spooled by a router that died before it
        journalled the job).

        Args:
            job_ids: the unsettled jobs' ids.
        """
        for f in self.root.iterdir():
            if f.name.split(".", 1)[0] not in job_ids:
                f.unlink(missing_ok=True)

    def files(self) -> list[Path]:
        """The spooled uploads.

        Returns:
            Their paths, in no particular order.
        """
        return list(self.root.iterdir())
