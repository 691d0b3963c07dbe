from django.contrib import admin
from django.urls import path

from config.views import home
from jobs.api import api
from monitoring import views as monitoring_views
from monitoring.health import healthz, readyz

admin.site.site_header = "Jobs administration"
admin.site.site_title = "Jobs admin"
# The admin index links to the metrics page (monitoring/templates/admin/jobs_index.html).
admin.site.index_template = "admin/jobs_index.html"
# The admin's "View site": the front page below (signed-in staff; anyone else to the login page).
admin.site.site_url = "/"

urlpatterns = [
    path("", admin.site.admin_view(home), name="home"),
    # Before admin.site.urls, which would otherwise take /admin/metrics/ for an app label.
    path("admin/metrics/", admin.site.admin_view(monitoring_views.metrics_page), name="admin-metrics"),
    path("admin/", admin.site.urls),
    path("api/", api.urls),
    path("metrics", monitoring_views.prometheus_metrics, name="prometheus-metrics"),
    path("healthz", healthz, name="healthz"),
    path("readyz", readyz, name="readyz"),
]
