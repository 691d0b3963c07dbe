"""The front page (`/`): the admin's "View site" link lands on it."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import User
from django.test import Client

pytestmark = pytest.mark.django_db


def test_signed_in_staff_get_links_to_the_admin_metrics_api_docs_and_flower(settings) -> None:
    settings.FLOWER_URL = "http://127.0.0.1:5599"
    client = Client()
    client.force_login(User.objects.create_user("ops", password="pw", is_staff=True))

    response = client.get("/")

    assert response.status_code == 200
    page = response.content.decode()
    for link in (
        'href="/admin/"',
        'href="/admin/metrics/"',
        'href="/api/docs"',
        'href="http://127.0.0.1:5599/"',
    ):
        assert link in page


def test_the_admin_view_site_link_goes_to_the_front_page() -> None:
    client = Client()
    client.force_login(User.objects.create_user("ops", password="pw", is_staff=True))
    assert 'href="/">View site</a>' in client.get("/admin/").content.decode()


@pytest.mark.parametrize("signed_in", [False, True], ids=["anonymous", "non-staff user"])
def test_anyone_else_is_sent_to_the_login_page_and_told_nothing(signed_in: bool) -> None:
    client = Client()
    if signed_in:
        client.force_login(User.objects.create_user("someone", password="pw"))

    response = client.get("/")

    assert response.status_code == 302
    assert response["Location"] == "/admin/login/?next=/"
    assert response.content == b""
