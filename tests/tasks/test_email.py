"""The email service and task arguments, without a worker (the mail goes to Django's locmem outbox)."""

from __future__ import annotations

import smtplib
import uuid

import pytest
from django.core import mail
from django.core.mail import EmailMultiAlternatives

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
