from django.contrib import admin
from django.urls import path

admin.site.site_header = "Jobs administration"
admin.site.site_title = "Jobs admin"

urlpatterns = [
    path("admin/", admin.site.urls),
]
