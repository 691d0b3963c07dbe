"""The site's front page: where the admin's "View site" goes."""

from __future__ import annotations

from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render


def home(request: HttpRequest) -> HttpResponse:
    """Links to the admin, the metrics page, the API docs and Flower, for signed-in staff.

    Wrapped in admin.site.admin_view (config/urls.py): anyone else is sent to the admin's login
    page, as /admin/ does, so the page says nothing about what runs here to strangers.
    """
    return render(request, "home.html", {"flower_url": settings.FLOWER_URL.rstrip("/")})
