from __future__ import annotations

import pytest

from jobs.models import Job
from tests.waiting import wait_for


@pytest.mark.django_db(transaction=True)
def test_a_ping_job_runs_to_succeeded(celery_worker, api_client) -> None:
    response = api_client.post("/api/jobs", {"type": "default.ping", "payload": {}})
    assert response.status_code == 202, response.content
    job_id = response.json()["id"]
    wait_for(lambda: Job.objects.get(pk=job_id).status == "succeeded", timeout=20, what="the job to succeed")
    body = api_client.get(f"/api/jobs/{job_id}").json()
    assert body["status"] == "succeeded"
    assert body["attempts"] == 1
    assert body["result"]["pong"]
