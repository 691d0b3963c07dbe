"""The beat lease in the database: one holder, handed over on release or when it lapses."""

from __future__ import annotations

import time

import pytest

from scheduling.lease import Lease

pytestmark = [pytest.mark.django_db(transaction=True)]


def test_only_one_process_holds_it() -> None:
    first, second = Lease(duration=20, renew_every=5), Lease(duration=20, renew_every=5)

    assert first.hold() is True
    assert second.hold() is False
    assert first.current_holder() == first.holder


def test_the_holder_keeps_it_by_renewing() -> None:
    first, second = Lease(duration=2, renew_every=0.5), Lease(duration=2, renew_every=0.5)
    assert first.hold()

    deadline = time.monotonic() + 3  # longer than the lease
    while time.monotonic() < deadline:
        assert first.hold() is True
        assert second.hold() is False
        time.sleep(0.25)


def test_a_standby_takes_it_once_the_holder_stops_renewing() -> None:
    first, second = Lease(duration=2, renew_every=0.5), Lease(duration=2, renew_every=0.5)
    assert first.hold()

    time.sleep(2.3)  # the holder "died": no renewal

    assert second.hold() is True
    assert first.hold() is False  # and the old holder knows it lost it
    assert second.current_holder() == second.holder


def test_a_released_lease_is_taken_at_once() -> None:
    first, second = Lease(duration=20, renew_every=5), Lease(duration=20, renew_every=5)
    assert first.hold()

    first.release()

    assert second.hold() is True
    assert first.held is False


def test_a_lease_must_be_renewed_well_within_its_length() -> None:
    with pytest.raises(ValueError, match=r"renewed at most every 5\.0 s"):
        Lease(duration=10, renew_every=6)
