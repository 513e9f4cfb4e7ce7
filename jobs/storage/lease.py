"""A lease on one storage key: at most one holder at a time, renewed by a heartbeat.

A run is trained by one job at a time: the job's driver holds the run's lease
(`RunLayout.lease`) from before anything is written until the job ends. The module knows
nothing of runs: any key can be leased (a scheduled retraining can lease its schedule).

How it works, on S3:

- **acquire**: read the key first (a live holder is refused at once, `LeaseHeld`, exit 2,
  naming its host, pid and job and how old its heartbeat is); create it with a conditional
  put `If-None-Match: *` (two acquirers at the same moment: the server lets one win).
- **renew**: a heartbeat thread replaces the object every `renew_s` with `If-Match: <etag
  of our last write>`; a refused renewal (412, or the object gone) means someone else holds
  it now: the lease is *lost* (`Lease.lost` is set, `on_lost` is called) and its holder must
  stop. A renewal that fails on a transient storage error is tried again at the next beat:
  the lease stays ours until someone replaces it, which `If-Match` detects.
- **expiry**: a lease whose heartbeat is older than its holder's `ttl_s` (stored in it) is
  free: it is taken over with `If-Match` on the old etag (so of two takers one wins), and
  `Lease.took_over` names the previous holder (the caller records it: a run posts a
  `lease_takeover` event into its metrics log).
- **release**: delete with `If-Match` on our etag (a lease taken over is left alone).

Heartbeat ages are measured on the storage server's clock (the response's `Date` minus the
object's `Last-Modified`), so holders on machines with skewed clocks still agree.

Backends that ignore conditional writes: after a create, the same conditional put is sent
again on the same key (a free probe: no other object); a backend that accepts the second
`If-None-Match: *` does not honour conditions. tlctl then **warns in one line and goes on**
with an advisory lease (the read before every write still refuses a live holder, but two
submits at the same moment could both start): refusing would make such storage unusable,
and S3, MinIO and SeaweedFS all honour them. Checked once per endpoint per process.

A local directory gives the same semantics: the lease file is created with `O_EXCL`, and
replace/delete compare-and-swap under an exclusive `flock` of its directory (one machine, or
a filesystem whose locks work across machines).

TTL and heartbeat: `DEFAULT_TTL_S` (60 s) and a beat every `ttl/6`; the environment
variable `TLCTL_LEASE_TTL_S` sets another TTL (short ones for tests).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from jobs.errors import EXIT_FAILED, TlctlError
from jobs.storage import errors
from jobs.storage.conditional import Backend, Seen, backend_for, where
from jobs.storage.location import Location

DEFAULT_TTL_S = 60.0
TTL_ENV = "TLCTL_LEASE_TTL_S"
RENEWS_PER_TTL = 6
ACQUIRE_ATTEMPTS = 5  # a lease released or taken over between our read and our write
logger = logging.getLogger(__name__)

_PROBED: dict[str | None, bool] = {}  # endpoint → honours conditional writes
_PROBE_LOCK = threading.Lock()


def ttl_from_env(default: float = DEFAULT_TTL_S) -> float:
    """TLCTL_LEASE_TTL_S if set (seconds, > 0), else `default`."""
    text = os.environ.get(TTL_ENV, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise TlctlError(f"{TTL_ENV}: '{text}' is not a positive number of seconds (e.g. 60)")
    return value


@dataclass(frozen=True)
class Holder:
    """Who holds a lease: written into the lease object, shown to whoever is refused."""

    host: str
    pid: int
    job: str  # e.g. "tlctl submit --local" or "Ray job raysubmit_…"
    owner: str = field(default_factory=lambda: uuid.uuid4().hex)  # this acquisition
    ttl_s: float = DEFAULT_TTL_S
    acquired_at: float = 0.0
    beat: int = 0  # renewals so far: every write has a new body, hence a new etag

    @classmethod
    def here(cls, job: str, ttl_s: float) -> Holder:
        return cls(socket.gethostname(), os.getpid(), job, ttl_s=ttl_s, acquired_at=time.time())

    def body(self) -> bytes:
        return json.dumps({**asdict(self), "renewed_at": time.time()}, sort_keys=True).encode()

    @classmethod
    def parse(cls, data: bytes) -> Holder | None:
        try:
            raw = json.loads(data)
            return cls(
                host=str(raw["host"]),
                pid=int(raw["pid"]),
                job=str(raw.get("job", "?")),
                owner=str(raw.get("owner", "")),
                ttl_s=float(raw.get("ttl_s", DEFAULT_TTL_S)),
                acquired_at=float(raw.get("acquired_at", 0.0)),
                beat=int(raw.get("beat", 0)),
            )
        except (ValueError, KeyError, TypeError):
            return None

    def describe(self) -> str:
        return f"{self.job} (host {self.host}, pid {self.pid})"


def expired(seen: Seen) -> bool:
    """A lease whose heartbeat is older than its holder's TTL is free."""
    holder = Holder.parse(seen.data)
    return seen.age_s > (holder.ttl_s if holder is not None else DEFAULT_TTL_S)


class LeaseHeld(TlctlError):
    """Someone else holds the lease and its heartbeat is fresh (exit 2)."""

    def __init__(self, message: str, holder: Holder | None, age_s: float) -> None:
        super().__init__(message)
        self.holder, self.age_s = holder, age_s


class LeaseLost(TlctlError):
    """Our lease was taken over (or removed) while we held it: stop (exit 1)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, exit_code=EXIT_FAILED)


# --- the lease ----------------------------------------------------------------------------


class Lease:
    """A held lease: `start()` its heartbeat, `release()` it (or use it as a context
    manager). `took_over` is the previous holder when an expired lease was taken over, with
    `took_over_age_s` its heartbeat's age then."""

    def __init__(
        self,
        backend: Backend,
        holder: Holder,
        token: str,
        *,
        renew_s: float,
        what: str,
        on_lost: Callable[[LeaseLost], None] | None = None,
        took_over: Holder | None = None,
        took_over_age_s: float | None = None,
        prune_empty_parent: bool = False,
    ) -> None:
        self.backend, self.holder, self.token = backend, holder, token
        self.prune_empty_parent = prune_empty_parent
        self.renew_s, self.what = renew_s, what
        self.on_lost = on_lost
        self.took_over, self.took_over_age_s = took_over, took_over_age_s
        self.lost: LeaseLost | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.released = False

    def renew(self) -> None:
        """Replace the lease object with a fresh heartbeat; LeaseLost if it is not ours."""
        with self._lock:
            if self.lost is not None:
                raise self.lost
            holder = Holder(**{**asdict(self.holder), "beat": self.holder.beat + 1})
            token = self.backend.replace(holder.body(), self.token)
            if token is None:
                self.lost = self._lost_error()
                raise self.lost
            self.holder, self.token = holder, token

    def _lost_error(self) -> LeaseLost:
        try:
            seen = self.backend.read()
        except errors.StorageError:
            seen = None
        now = Holder.parse(seen.data) if seen is not None else None
        by = f"; it is held by {now.describe()} now" if now is not None else " (it was removed)"
        return LeaseLost(
            f"lease lost: {self.what} was taken over while this job held it{by}; this job "
            "stops so that one job writes it (its heartbeat could not be renewed in time)"
        )

    def start(self) -> Lease:
        """Renew every `renew_s` in a daemon thread until released or lost."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._beat, name="tlctl-lease", daemon=True)
            self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.renew_s):
            try:
                self.renew()
            except LeaseLost as exc:
                logger.debug("%s", exc)  # the holder raises it (Lease.check)
                if self.on_lost is not None:
                    self.on_lost(exc)
                return
            except Exception as exc:  # transient: the lease stays ours until replaced
                logger.warning("lease heartbeat for %s failed (%s); retrying", self.what, exc)

    def check(self) -> None:
        """Raise LeaseLost if the heartbeat found the lease taken over."""
        if self.lost is not None:
            raise self.lost

    def release(self) -> None:
        """Stop the heartbeat and delete the lease if it is still ours (never raises for a
        storage failure: an unreleased lease expires after its TTL)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=max(5.0, self.renew_s))
        with self._lock:
            if self.released or self.lost is not None:
                return
            self.released = True
            try:
                if self.backend.delete(self.token) and self.prune_empty_parent:
                    self.backend.prune_parent()
            except Exception as exc:  # it expires on its own
                logger.warning("could not release the lease on %s (%s)", self.what, exc)

    def __enter__(self) -> Lease:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.release()


def acquire(
    loc: Location,
    *,
    job: str,
    what: str | None = None,
    ttl_s: float | None = None,
    renew_s: float | None = None,
    on_lost: Callable[[LeaseLost], None] | None = None,
    warn: Callable[[str], None] | None = None,
    prune_empty_parent: bool = False,
) -> Lease:
    """Hold the lease at `loc` for `job` (not yet renewing: call `start()`), taking over
    an expired one; LeaseHeld (exit 2) when someone else's heartbeat is fresh.

    `what` names the leased thing in messages (default: the key's URI); `ttl_s` defaults to
    TLCTL_LEASE_TTL_S or 60 s, `renew_s` to a sixth of it. `prune_empty_parent`: on
    release, remove the key's directory if nothing else is in it (a run that failed before
    writing anything leaves no trace).
    """
    ttl = ttl_s if ttl_s is not None else ttl_from_env()
    beat = renew_s if renew_s is not None else ttl / RENEWS_PER_TTL
    if not 0 < beat < ttl:
        raise TlctlError(f"lease: renew interval {beat} s must be > 0 and below the TTL {ttl} s")
    backend = backend_for(loc)
    what = what or loc.uri
    holder = Holder.here(job, ttl)

    def held(token: str, **takeover: Any) -> Lease:
        return Lease(
            backend,
            holder,
            token,
            renew_s=beat,
            what=what,
            on_lost=on_lost,
            prune_empty_parent=prune_empty_parent,
            **takeover,
        )

    for _ in range(ACQUIRE_ATTEMPTS):
        seen = backend.read()
        if seen is None:
            data = holder.body()
            token = backend.create(data)
            if token is None:
                continue  # someone created it between our read and our write
            _check_conditions(backend, loc, data, token, warn)
            return held(token)
        if not expired(seen):
            raise held_error(what, seen)
        token = backend.replace(holder.body(), seen.token)
        if token is None:
            continue  # renewed, released or taken over meanwhile: look again
        return held(token, took_over=Holder.parse(seen.data), took_over_age_s=seen.age_s)
    raise TlctlError(
        f"lease: {what} changed hands {ACQUIRE_ATTEMPTS} times while this job tried to take "
        "it; try again",
        exit_code=EXIT_FAILED,
    )


def held_error(what: str, seen: Seen) -> LeaseHeld:
    holder = Holder.parse(seen.data)
    who = holder.describe() if holder is not None else f"an unreadable lease at {seen.token}"
    ttl = holder.ttl_s if holder is not None else DEFAULT_TTL_S
    return LeaseHeld(
        f"{what} is being trained by {who}, last heartbeat {seen.age_s:.0f} s ago; one job "
        f"per run: wait for it to end (a holder that died frees it {ttl:.0f} s after its last "
        "heartbeat), or use another run name",
        holder,
        seen.age_s,
    )


def release_for(loc: Location, job: str) -> bool:
    """Remove the lease at `loc` if `job` holds it (conditional on the version read, so a
    lease renewed or taken over meanwhile stays). For whoever ended that job (`tlctl jobs
    stop`): a stopped driver cannot release its own lease, and the run would otherwise be
    refused for a TTL. True when it was removed."""
    backend = backend_for(loc)
    seen = backend.read()
    holder = Holder.parse(seen.data) if seen is not None else None
    if seen is None or holder is None or holder.job != job:
        return False
    return backend.delete(seen.token)


def check_free(loc: Location, *, what: str | None = None) -> None:
    """Refuse (LeaseHeld) if someone holds a live lease at `loc`; writes nothing."""
    seen = backend_for(loc).read()
    if seen is not None and not expired(seen):
        raise held_error(what or loc.uri, seen)


def _check_conditions(
    backend: Backend,
    loc: Location,
    data: bytes,
    token: str,
    warn: Callable[[str], None] | None,
) -> None:
    """Once per endpoint: does the backend refuse a second `If-None-Match: *`?"""
    key = loc.endpoint if loc.is_s3 else "file"
    with _PROBE_LOCK:
        if key in _PROBED:
            return
        honoured = backend.honours_conditions(data, token)
        _PROBED[key] = honoured
    if not honoured:
        message = (
            f"warning: storage at {where(loc)} ignores conditional writes (If-None-Match); "
            "the one-job-per-run lease is advisory there: two submits at the same moment "
            "could both train"
        )
        (warn or _stderr)(message)


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
