"""The email family through a real worker, a real broker and a real SMTP server on loopback."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import pytest
from django.utils import timezone
from django_celery_results.models import TaskResult

from jobs.models import Job
from tasks import retries
from tasks.email import newsletter, send, weekly_newsletter
from tasks.models import DeadLetter, EmailLog
from tests.smtp import SmtpServer
from tests.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def test_a_message_arrives_with_both_parts_and_the_address_stays_out_of_logs(
    celery_worker: object, smtp_server: SmtpServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)

    result = send.delay(to="ann.lee@example.com", template="welcome", context={"name": "Ann"})

    assert result.get(timeout=30)["outcome"] == "sent"
    [message] = smtp_server.wait_for_messages(1)
    assert message.envelope_to == ["ann.lee@example.com"]
    assert message.subject == "Welcome to Jobs, Ann"
    assert "Hello Ann" in (message.text or "")
    assert "<p>Hello Ann,</p>" in (message.html or "")
    assert EmailLog.objects.get(recipient="ann.lee@example.com").status == "sent"
    # The job's row is its record: no result row besides, with or without the address.
    assert not TaskResult.objects.filter(task_id=result.id).exists()
    ours = [r.getMessage() for r in caplog.records if r.name != "mail.log"]  # mail.log: the test server
    assert any("a***@e***.com" in line for line in ours)
    assert not [line for line in ours if "ann.lee@example.com" in line]


def test_a_busy_server_is_retried_with_backoff_until_it_accepts(
    celery_worker: object, smtp_server: SmtpServer
) -> None:
    smtp_server.set_failure(rcpt=(451, "4.3.2 try again later"), times=2)

    result = send.delay(to="bob@example.com", template="welcome", context={"name": "Bob"})

    assert result.get(timeout=30)["outcome"] == "sent"
    assert len(smtp_server.refused) == 2
    assert len(smtp_server.wait_for_messages(1)) == 1
    log = EmailLog.objects.get(recipient="bob@example.com")
    assert (log.status, log.attempts) == ("sent", 3)
    assert not DeadLetter.objects.exists()


def test_a_relay_outage_longer_than_the_old_budget_is_ridden_out(
    celery_worker: object, smtp_server: SmtpServer, settings
) -> None:
    # 40 minutes of 451s (scaled by JOBS_RETRY_DELAY_SCALE, like every wait): the old policy (5
    # attempts, 2 s base) dead-lettered the message after about 11 s of them.
    outage = 40 * 60 * settings.JOBS_RETRY_DELAY_SCALE
    assert retries.configured("email").window()[0] > 40 * 60  # the least the policy waits in all
    smtp_server.set_failure(rcpt=(451, "4.3.0 mail relay unavailable"), times=None)
    recovery = threading.Timer(outage, lambda: smtp_server.set_failure(rcpt=None))
    recovery.start()
    try:
        result = send.delay(to="cy@example.com", template="welcome", context={"name": "Cy"})
        assert result.get(timeout=120)["outcome"] == "sent"
    finally:
        recovery.cancel()

    refused = len(smtp_server.refused)
    assert refused >= 5  # more than the old policy's attempts in all
    assert len(smtp_server.wait_for_messages(1)) == 1
    log = EmailLog.objects.get(recipient="cy@example.com")
    assert (log.status, log.attempts) == ("sent", refused + 1)
    job = Job.objects.get(task_id=result.id)
    assert (job.status, job.attempts) == ("succeeded", refused + 1)
    assert not DeadLetter.objects.exists()


@pytest.mark.parametrize(
    ("reply", "seconds"),
    [
        ("4.7.1 Greylisted, try again in 300 seconds", 300),
        ("4.7.1 greylisting in action, please RETRY IN 5 MINUTES", 300),
        ("4.7.0 Come back in 00:05:00", 300),
    ],
)
def test_a_greylisting_server_gets_the_wait_it_asked_for(
    celery_worker: object, smtp_server: SmtpServer, settings, reply: str, seconds: int
) -> None:
    smtp_server.set_failure(rcpt=(451, reply), times=1)

    result = send.delay(to="di@example.com", template="welcome", context={"name": "Di"})

    assert result.get(timeout=30)["outcome"] == "sent"
    smtp_server.wait_for_messages(1)
    # The first retry's own backoff is 5-10 s (scaled); the server asked for 300 s, and got them.
    assert retries.configured("email").ceiling(0) < seconds
    waited = smtp_server.received_at[0] - smtp_server.refused_at[0]
    assert waited >= seconds * settings.JOBS_RETRY_DELAY_SCALE
    assert EmailLog.objects.get(recipient="di@example.com").attempts == 2


def test_a_refused_recipient_goes_to_the_dead_letters_at_once(
    celery_worker: object, smtp_server: SmtpServer
) -> None:
    smtp_server.set_failure(rcpt=(550, "5.1.1 no such user"), times=None)

    result = send.delay(to="ghost@example.com", template="welcome", context={"name": "Nobody"})

    with pytest.raises(Exception, match="recipient refused: 550"):
        result.get(timeout=30)
    letter = wait_for(lambda: DeadLetter.objects.filter(task_id=result.id).first())
    assert letter.attempts == 1
    assert letter.kwargs["to"] == "ghost@example.com"  # kept as given, for replay
    assert "ghost@example.com" not in letter.exception_message
    assert len(smtp_server.refused) == 1
    assert EmailLog.objects.get(recipient="ghost@example.com").status == "failed"


def test_a_newsletter_reaches_every_recipient_once_even_when_run_twice(
    celery_worker: object, smtp_server: SmtpServer
) -> None:
    recipients = [f"reader{i}@example.com" for i in range(25)] + ["READER0@example.com"]
    arguments = {
        "campaign": "2026-11-weekly",
        "template": "newsletter",
        "recipients": recipients,
        "context": {"title": "Weekly", "body": "News"},
        "batch_size": 10,
        "window_seconds": 2,
    }

    assert newsletter.delay(**arguments).get(timeout=30) == {
        "campaign": "2026-11-weekly",
        "recipients": 25,
        "batches": 3,
    }
    wait_for(lambda: EmailLog.objects.filter(campaign="2026-11-weekly", status="sent").count() == 25)
    newsletter.delay(**arguments).get(timeout=30)
    time.sleep(3)  # the second run's batches are spread over 2 s; let them all run

    arrived = smtp_server.messages
    assert sorted(address for message in arrived for address in message.envelope_to) == sorted(
        recipients[:25]
    )
    assert all(message.subject == "Weekly" for message in arrived)


def test_the_weekly_newsletter_goes_to_the_active_members_of_its_group_once_a_week(
    celery_worker: object, smtp_server: SmtpServer, django_user_model: Any
) -> None:
    from django.contrib.auth.models import Group

    readers = Group.objects.create(name="newsletter")
    for name, email, active in [
        ("ann", "ann@example.com", True),
        ("bob", "bob@example.com", True),
        ("cy", "cy@example.com", False),
        ("dee", "", True),
    ]:
        django_user_model.objects.create_user(name, email, is_active=active).groups.add(readers)
    django_user_model.objects.create_user("eve", "eve@example.com")  # not in the group

    outcome = weekly_newsletter.delay(context={"title": "This week", "body": "News"}, window_seconds=0).get(
        timeout=30
    )
    weekly_newsletter.delay(context={"title": "This week", "body": "News"}, window_seconds=0).get(timeout=30)

    year, week, _ = timezone.localdate().isocalendar()
    assert outcome == {"campaign": f"weekly-{year}-W{week:02d}", "recipients": 2}
    wait_for(lambda: EmailLog.objects.filter(campaign=outcome["campaign"], status="sent").count() == 2)
    time.sleep(1)  # a second send, were there one, would have arrived by now
    assert sorted(address for message in smtp_server.messages for address in message.envelope_to) == [
        "ann@example.com",
        "bob@example.com",
    ]
