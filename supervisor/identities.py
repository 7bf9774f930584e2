"""Per-job identities (SPEC §6): when we are root and `user_per_job` is on, each job's plugin
runs as a uid (and the same-numbered gid) of its own from `uid_range`.

A job keeps its uid across restarts: the map is kept in state_dir/identities.json, written
atomically whenever it changes. A new job's uid starts at a point drawn from its uuid and
probes upward (wrapping) past every uid already given to another job and every uid or gid
the passwd or group databases know; new jobs are placed in uuid order, so the same set of
jobs gets the same uids on every host. A job's uid is released when the job is gone (its
runner stopped, its scratch folder removed), and may then go to another job.
"""

from __future__ import annotations

import grp
import hashlib
import logging
import os
import pwd
import stat

import msgspec

from supervisor.files import set_aside, write_atomic

log = logging.getLogger(__name__)

FILE = "identities.json"


class IdentityError(Exception):
    pass


class Identities:
    def __init__(self, state_dir: str, first: int, last: int):
        self.path = os.path.join(state_dir, FILE)
        self.state_dir = state_dir
        self.first, self.last = first, last
        self.uids: dict[str, int] = {}
        self._load()

    def _load(self) -> None:
        recovered = False
        try:
            with open(self.path, "rb") as f:
                stored = msgspec.json.decode(f.read(), type=dict[str, int])
        except FileNotFoundError:
            return
        except (OSError, msgspec.DecodeError, msgspec.ValidationError) as e:
            stored, recovered = self._from_scratch(), True
            log.error("%s is unreadable (%s): %s; %d job(s) keep the uid that owns their scratch folder, "
                      "the others get new uids", self.path, e, set_aside(self.path, self.state_dir), len(stored))
        seen: set[int] = set()
        for uuid, uid in sorted(stored.items()):
            # a uid outside today's range, or one the databases now know, is given out again
            if self.first <= uid <= self.last and uid not in seen and not _known(uid):
                self.uids[uuid] = uid
                seen.add(uid)
        if recovered:
            self._save()

    def _from_scratch(self) -> dict[str, int]:
        """Each job's uid as its scratch folder (state_dir/scratch/<job uuid>, owned by it) tells."""
        found: dict[str, int] = {}
        scratch = os.path.join(self.state_dir, "scratch")
        try:
            names = os.listdir(scratch)
        except OSError:
            return found
        for name in names:
            try:
                st = os.lstat(os.path.join(scratch, name))
            except OSError:
                continue
            if stat.S_ISDIR(st.st_mode) and st.st_uid != 0:
                found[name] = st.st_uid
        return found

    def assign(self, uuids) -> dict[str, int]:
        """Give every job in `uuids` its uid (keeping those it has). Raises IdentityError when
        the range is full."""
        taken = set(self.uids.values())
        changed = False
        for uuid in sorted(u for u in uuids if u not in self.uids):
            self.uids[uuid] = uid = self._free_uid(uuid, taken)
            taken.add(uid)
            changed = True
        if changed:
            self._save()
        return self.uids

    def release(self, keep) -> list[str]:
        """Forget the uids of jobs not in `keep`; returns those jobs."""
        gone = [u for u in self.uids if u not in keep]
        for uuid in gone:
            del self.uids[uuid]
        if gone:
            self._save()
        return gone

    def _free_uid(self, uuid: str, taken: set[int]) -> int:
        size = self.last - self.first + 1
        start = int.from_bytes(hashlib.sha256(uuid.encode()).digest()[:8], "big") % size
        for step in range(size):
            uid = self.first + (start + step) % size
            if uid not in taken and not _known(uid):
                return uid
        raise IdentityError(f"jobs.uid_range {self.first}-{self.last} has no free uid left for job {uuid}")

    def _save(self) -> None:
        try:
            write_atomic(self.path, msgspec.json.encode(dict(sorted(self.uids.items()))) + b"\n", 0o600)
        except OSError as e:
            # the uids still hold for this run; after a restart jobs may get others
            log.error("cannot write %s: %s", self.path, e)


def _known(uid: int) -> bool:
    """Whether the passwd or group database knows this number (as a uid, or as a gid)."""
    for lookup in (pwd.getpwuid, grp.getgrgid):
        try:
            lookup(uid)
            return True
        except KeyError:
            pass
    return False
