"""The email service and task arguments, without a worker (the mail goes to Django's locmem outbox)."""

from __future__ import annotations

import smtplib
import uuid
from pathlib import Path
from typing import Any

import pytest
from django.core import mail
from django.core.mail import EmailMultiAlternatives
from django.core.mail.backends import locmem
from django.db import connection
from django.db.models import Count
from django.test.utils import CaptureQueriesContext

from tasks.base import InvalidArguments, PermanentJobError, TransientJobError, mask_email
from tasks.email import newsletter, send
from tasks.models import EmailLog
from tasks.services import email as service


def test_it_renders_a_one_line_subject_and_both_bodies() -> None:
    subject, text, html = service.render("welcome", {"name": "Ann\nBcc: evil@example.com"})

    assert "\n" not in subject and subject.startswith("Welcome to Jobs, Ann")
    assert "Hello Ann" in text
    assert "<p>Hello Ann" in html


@pytest.mark.parametrize("name", ["../secrets", "Welcome", "a//b", ""])
def test_it_refuses_template_names_outside_the_email_folder(name: str) -> None:
    with pytest.raises(PermanentJobError, match="not a valid template name"):
        service.render(name, {})


def test_a_missing_template_is_a_permanent_error() -> None:
    with pytest.raises(PermanentJobError, match="'nope' is missing"):
        service.render("nope", {})


def test_the_same_key_gives_the_same_message_id() -> None:
    assert service.message_id_for("k1") == service.message_id_for("k1") != service.message_id_for("k2")


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (smtplib.SMTPRecipientsRefused({"a@example.com": (451, b"try later")}), TransientJobError),
        (smtplib.SMTPRecipientsRefused({"a@example.com": (550, b"no such user")}), PermanentJobError),
        (smtplib.SMTPDataError(452, b"insufficient storage"), TransientJobError),
        (smtplib.SMTPDataError(554, b"rejected"), PermanentJobError),
        (smtplib.SMTPSenderRefused(421, b"busy", "jobs@localhost"), TransientJobError),
        (smtplib.SMTPAuthenticationError(535, b"bad credentials"), PermanentJobError),
        (smtplib.SMTPServerDisconnected("gone"), TransientJobError),
        (ConnectionRefusedError(111, "refused"), TransientJobError),
        (TimeoutError("timed out"), TransientJobError),
    ],
)
def test_smtp_errors_are_transient_or_permanent_by_their_code(error: Exception, kind: type) -> None:
    assert isinstance(service.classify_smtp_error(error), kind)


def test_error_texts_do_not_carry_the_recipient_address() -> None:
    error = service.classify_smtp_error(
        smtplib.SMTPRecipientsRefused({"alice@example.com": (550, b"<alice@example.com>: unknown")})
    )
    assert "alice@example.com" not in str(error)
    assert mask_email("alice@example.com") in str(error)


@pytest.mark.parametrize(
    ("reply", "seconds"),
    [
        ("4.7.1 Greylisted, try again in 300 seconds", 300),
        ("4.2.0 Greylisted for 60 seconds (see http://postgrey.schweikert.ch/)", 60),
        ("4.7.1 Please retry in 5 minutes", 300),
        ("4.7.1 TRY AGAIN IN 2 MIN", 120),
        ("4.3.2 retry after 90s", 90),
        ("4.7.0 come back in 00:05:00", 300),
        ("4.7.0 come back in 04:30", 270),
        ("4.7.1 deferred, try again in 1 hour", 3600),
        ("4.3.2 try again later", None),
        ("4.4.5 Insufficient system storage", None),
    ],
)
def test_a_4xx_reply_that_says_when_sets_the_retrys_least_wait(reply: str, seconds: float | None) -> None:
    rcpt = smtplib.SMTPRecipientsRefused({"a@example.com": (451, reply.encode())})
    data = smtplib.SMTPDataError(451, reply.encode())

    for error in (rcpt, data):
        translated = service.classify_smtp_error(error)
        assert isinstance(translated, TransientJobError)
        assert translated.retry_after == seconds


def test_a_5xx_reply_is_permanent_whatever_it_says_about_time() -> None:
    error = smtplib.SMTPDataError(554, b"5.7.1 rejected; do not try again in 5 minutes")

    assert isinstance(service.classify_smtp_error(error), PermanentJobError)


def test_mask_email_keeps_only_first_letters() -> None:
    assert mask_email("alice@example.com") == "a***@e***.com"
    assert mask_email("not-an-address") == "***"


@pytest.mark.django_db
def test_a_message_is_sent_once_however_often_it_is_asked() -> None:
    first = service.send_logged(key="k-1", to="ann@example.com", template="welcome", context={"name": "Ann"})
    second = service.send_logged(key="k-1", to="ann@example.com", template="welcome", context={"name": "Ann"})

    assert (first, second) == ("sent", "already-sent")
    assert len(mail.outbox) == 1
    message = mail.outbox[0]
    assert isinstance(message, EmailMultiAlternatives)
    assert message.to == ["ann@example.com"]
    assert message.alternatives[0][1] == "text/html"
    log = EmailLog.objects.get(key="k-1")
    assert log.status == "sent" and log.attempts == 1 and log.sent_at is not None


@pytest.mark.django_db
def test_a_message_cut_off_while_sending_is_not_sent_again_unless_replayed() -> None:
    EmailLog.objects.create(key="k-2", recipient="ann@example.com", template="welcome", status="sending")

    with pytest.raises(PermanentJobError, match="may have been delivered"):
        service.send_logged(key="k-2", to="ann@example.com", template="welcome", context={})
    assert EmailLog.objects.get(key="k-2").status == "unknown"
    assert mail.outbox == []

    assert (
        service.send_logged(key="k-2", to="ann@example.com", template="welcome", context={}, replay=True)
        == "sent"
    )
    assert len(mail.outbox) == 1


def test_batches_are_spread_evenly_over_the_window_without_duplicates() -> None:
    recipients = [f"user{i}@example.com" for i in range(250)] + ["USER0@example.com"]

    plan = service.plan_batches(recipients, batch_size=100, window_seconds=3600)

    assert [offset for offset, _ in plan] == [0.0, 1200.0, 2400.0]
    assert [len(batch) for _, batch in plan] == [100, 100, 50]


def test_the_send_rate_holds_across_separate_limiters() -> None:
    """Two limiters, as in two workers on two machines, share one budget in Redis."""
    from django.conf import settings

    name = f"test-{uuid.uuid4()}"
    workers = [service.SendRateLimiter("5/minute", settings.RATE_LIMIT_STORAGE_URL, name) for _ in range(2)]

    granted = sum(worker.try_acquire() for _ in range(5) for worker in workers)

    assert granted == 5


def test_bad_arguments_are_refused_when_sent_naming_the_field() -> None:
    with pytest.raises(InvalidArguments, match="field 'to': is not a valid email address"):
        send.delay(to="not-an-address", template="welcome")
    with pytest.raises(InvalidArguments, match="field 'template'"):
        send.delay(to="ann@example.com", template="../etc/passwd")
    with pytest.raises(InvalidArguments, match="field 'recipients': item 1 is not a valid email address"):
        newsletter.delay(campaign="c1", template="newsletter", recipients=["a@example.com", "b"])
    with pytest.raises(InvalidArguments, match="field 'window_seconds': must be under"):
        newsletter.delay(
            campaign="c1", template="newsletter", recipients=["a@example.com"], window_seconds=7000
        )


class _KilledAfter(locmem.EmailBackend):
    """An SMTP conversation the worker is killed in (BaseException: nothing catches it), after
    `survivors` messages went through. Stands in for a process dying, which a test cannot do to itself."""

    survivors = 3

    def send_messages(self, messages: Any) -> int:
        if len(mail.outbox) >= self.survivors:
            raise KeyboardInterrupt("killed mid-conversation")
        return super().send_messages(messages)


class _BusyAfterTwo(locmem.EmailBackend):
    """A server answering 451 (busy) from the third message on."""

    def send_messages(self, messages: Any) -> int:
        if len(mail.outbox) >= 2:
            raise smtplib.SMTPResponseException(451, b"try again later")
        return super().send_messages(messages)


def _batch(recipients: list[str], **options: Any) -> service.BatchOutcome:
    return service.send_batch(
        campaign="c1",
        template="newsletter",
        recipients=recipients,
        context={"title": "T", "body": "B"},
        limiter=service.SendRateLimiter("1000000/second", "memory://"),
        **options,
    )


@pytest.mark.django_db
def test_a_batch_makes_its_email_log_per_chunk_and_writes_twice_per_message() -> None:
    recipients = [f"reader{i}@example.com" for i in range(200)]

    with CaptureQueriesContext(connection) as queries:
        outcome = _batch(recipients)

    assert outcome.as_dict() == {"sent": 200, "already_sent": 0, "failed": 0, "unknown": 0}
    assert len(mail.outbox) == 200
    chunks = 200 // service.LOG_CHUNK_SIZE
    # per chunk: the rows (insert, select, savepoint/commit); per message: taken (sending), then sent
    assert len(queries) <= 7 * chunks + 2 * 200
    assert EmailLog.objects.filter(campaign="c1", status="sent", attempts=1).count() == 200
    assert EmailLog.objects.filter(sent_at__isnull=True).count() == 0


@pytest.mark.django_db(transaction=True)
def test_on_postgresql_a_message_costs_its_batch_one_round_trip_to_the_database() -> None:
    # As a worker runs it (no transaction around it): each message's `sent` goes with the next
    # one's `sending`, in one simple query (two statements, one commit).
    recipients = [f"reader{i}@example.com" for i in range(200)]

    with CaptureQueriesContext(connection) as queries:
        outcome = _batch(recipients)

    assert outcome.as_dict() == {"sent": 200, "already_sent": 0, "failed": 0, "unknown": 0}
    assert len(mail.outbox) == 200
    assert EmailLog.objects.filter(status="sent", attempts=1, sent_at__isnull=False).count() == 200
    chunks = 200 // service.LOG_CHUNK_SIZE
    writes = [q["sql"] for q in queries.captured_queries if q["sql"].startswith("UPDATE")]
    together = [sql for sql in writes if sql.count("UPDATE") == 2]
    if connection.vendor == "postgresql":
        # the first of each chunk is taken alone (the one before it was marked before the chunk's
        # rows were made), the last of the batch is marked alone
        assert len(together) == 200 - chunks
        assert len(writes) == 200 + chunks
    else:
        assert not together and len(writes) == 2 * 200


@pytest.mark.django_db
def test_a_batch_killed_mid_chunk_sends_nothing_twice_and_leaves_the_unsent_pending(settings: Any) -> None:
    settings.EMAIL_BACKEND = f"{__name__}._KilledAfter"
    recipients = [f"reader{i}@example.com" for i in range(10)]

    with pytest.raises(KeyboardInterrupt):
        _batch(recipients)

    statuses = dict(EmailLog.objects.values_list("recipient", "status"))
    assert [statuses[address] for address in recipients[:3]] == ["sent"] * 3
    assert statuses[recipients[3]] == "sending"  # in the SMTP conversation when killed: may have gone
    assert [statuses[address] for address in recipients[4:]] == ["pending"] * 6
    assert EmailLog.objects.filter(status="pending", attempts=0).count() == 6

    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    outcome = _batch(recipients)

    assert outcome.as_dict() == {"sent": 6, "already_sent": 3, "failed": 1, "unknown": 1}
    assert sorted(to for message in mail.outbox for to in message.to) == sorted(
        recipients[:3] + recipients[4:]
    )
    assert EmailLog.objects.get(recipient=recipients[3]).status == "unknown"


@pytest.mark.django_db
def test_a_batch_whose_worker_died_without_cleaning_up_marks_the_chunk_unknown_and_sends_none_of_it() -> None:
    # What a SIGKILL leaves: the chunk's rows marked sending, none marked sent.
    recipients = [f"reader{i}@example.com" for i in range(5)]
    for address in recipients:
        EmailLog.objects.create(
            key=f"c1:{address}", recipient=address, template="newsletter", status="sending"
        )

    outcome = _batch(recipients)

    assert outcome.as_dict() == {"sent": 0, "already_sent": 0, "failed": 5, "unknown": 5}
    assert mail.outbox == []
    assert set(EmailLog.objects.values_list("status", flat=True)) == {"unknown"}


@pytest.mark.django_db
def test_a_transient_smtp_failure_stops_the_batch_and_the_retry_sends_only_the_rest(settings: Any) -> None:
    settings.EMAIL_BACKEND = f"{__name__}._BusyAfterTwo"
    recipients = [f"reader{i}@example.com" for i in range(6)]

    with pytest.raises(TransientJobError):
        _batch(recipients)

    assert dict(EmailLog.objects.values_list("status").annotate(n=Count("id"))) == {"sent": 2, "pending": 4}
    assert "451" in EmailLog.objects.get(recipient=recipients[2]).last_error

    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    outcome = _batch(recipients)

    assert outcome.as_dict() == {"sent": 4, "already_sent": 2, "failed": 0, "unknown": 0}
    assert len(mail.outbox) == 6


def test_a_template_that_cannot_tell_recipients_apart_is_rendered_once_per_batch() -> None:
    assert service.renders_alike_for_every_recipient("newsletter")
    assert service.renders_alike_for_every_recipient("welcome")


@pytest.mark.django_db
def test_a_template_naming_the_recipient_is_rendered_for_each(settings: Any, tmp_path: Path) -> None:
    folder = tmp_path / "email" / "personal"
    folder.mkdir(parents=True)
    (folder / "subject.txt").write_text("For {{ recipient }}")
    (folder / "body.txt").write_text("Dear {{ recipient }}")
    (folder / "body.html").write_text("<p>Dear {{ recipient }}</p>")
    settings.TEMPLATES = [{**settings.TEMPLATES[0], "DIRS": [tmp_path]}]

    assert not service.renders_alike_for_every_recipient("personal")
    service.send_batch(
        campaign="c2",
        template="personal",
        recipients=["ann@example.com", "bob@example.com"],
        context={},
        limiter=service.SendRateLimiter("1000000/second", "memory://"),
    )
    assert [message.subject for message in mail.outbox] == ["For ann@example.com", "For bob@example.com"]
    assert EmailLog.objects.get(recipient="bob@example.com").subject == "For bob@example.com"


@pytest.mark.django_db
def test_a_batch_takes_its_send_slots_in_groups_and_no_more_than_it_sends() -> None:
    limiter = service.SendRateLimiter("100/minute", "memory://", f"test-{uuid.uuid4()}")
    hits: list[int] = []
    hit = limiter.limiter.hit

    def counted(item: Any, *identifiers: str, cost: int = 1) -> bool:
        hits.append(cost)
        return hit(item, *identifiers, cost=cost)

    limiter.limiter.hit = counted  # type: ignore[method-assign]  # a spy: the window itself is real

    service.send_batch(
        campaign="c3",
        template="newsletter",
        recipients=[f"reader{i}@example.com" for i in range(25)],
        context={},
        limiter=limiter,
    )

    assert hits == [10, 10, 5]  # a tenth of the window's budget at a time
    assert limiter.limiter.get_window_stats(limiter.item, limiter.name).remaining == 75
    assert len(mail.outbox) == 25
