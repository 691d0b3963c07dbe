"""A lease in the database that lets one beat dispatch while others stand by.

The holder renews it every `renew_every` seconds; it lapses `duration` seconds
after the last renewal, when a standby (which tries every `renew_every` seconds)
takes it. Expiry is computed by the database's clock (`Now()`), so clocks that
differ between beat hosts do not matter. A holder that cannot renew stops
dispatching once its lease may have lapsed, before anybody else can take it.

It lives in the database, not Redis, so it works with either broker (Redis or
RabbitMQ) and in development on SQLite.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from datetime import timedelta

from django.db import DatabaseError, close_old_connections
from django.db.models import DateTimeField, ExpressionWrapper, Q, Value
from django.db.models.functions import Now
from django.utils import timezone

from scheduling.models import BeatLease

logger = logging.getLogger(__name__)


def process_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class Lease:
    def __init__(self, name: str = "beat", *, duration: float = 20.0, renew_every: float = 5.0) -> None:
        if renew_every * 2 > duration:
            raise ValueError(f"a lease of {duration} s must be renewed at most every {duration / 2} s")
        self.name = name
        self.holder = f"{process_name()}:{os.urandom(3).hex()}"
        self.duration = duration
        self.renew_every = renew_every
        self._valid_until = 0.0  # time.monotonic() before which this process surely holds it
        self._renewed_at = float("-inf")
        self._database_away = False

    @property
    def held(self) -> bool:
        return time.monotonic() < self._valid_until

    def hold(self) -> bool:
        """Takes or renews the lease when due; whether this process may dispatch now."""
        if time.monotonic() - self._renewed_at < self.renew_every and self.held:
            return True
        started = time.monotonic()
        try:
            close_old_connections()
            taken = self._take_or_renew()
        except DatabaseError as exc:
            if not self._database_away:  # once per outage, not at every tick
                logger.warning("beat lease %r: the database is away (%s); trying again", self.name, exc)
            self._database_away = True
            return self.held  # keep dispatching only while the last renewal surely holds
        self._database_away = False
        if taken:
            # Counted from before the query: the database's expiry is later than this.
            self._valid_until = started + self.duration - 1.0
            self._renewed_at = started
        else:
            self._valid_until = 0.0
        return taken

    def _take_or_renew(self) -> bool:
        BeatLease.objects.get_or_create(
            name=self.name, defaults={"holder": "", "expires_at": timezone.now() - timedelta(days=1)}
        )
        expires = ExpressionWrapper(
            Now() + Value(timedelta(seconds=self.duration)), output_field=DateTimeField()
        )
        renewed = BeatLease.objects.filter(name=self.name, holder=self.holder).update(expires_at=expires)
        if renewed:
            return True
        taken = (
            BeatLease.objects.filter(name=self.name)
            .filter(Q(holder="") | Q(expires_at__lt=Now()))
            .update(holder=self.holder, expires_at=expires, acquired_at=Now())
        )
        return bool(taken)

    def release(self) -> None:
        """Gives the lease up at once (a clean shutdown), so a standby need not wait for it to lapse."""
        self._valid_until = 0.0
        try:
            BeatLease.objects.filter(name=self.name, holder=self.holder).update(holder="", expires_at=Now())
        except DatabaseError:
            logger.warning("beat lease %r: could not release it; it lapses by itself", self.name)

    def current_holder(self) -> str:
        lease = BeatLease.objects.filter(name=self.name, expires_at__gte=Now()).first()
        return lease.holder if lease else ""
