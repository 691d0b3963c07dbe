"""Admin for the images family: upload assets (checked as the worker would), see and make outputs."""

from __future__ import annotations

from functools import partial

from django import forms
from django.conf import settings
from django.contrib import admin, messages
from django.core.files.uploadedfile import UploadedFile
from django.db import transaction
from django.db.models import Count, QuerySet
from django.http import HttpRequest
from django.utils.html import format_html

from tasks.admin.common import reports_broker_errors
from tasks.models import ImageAsset, ImageOutput
from tasks.services import images as service

THUMBNAIL_OPERATIONS = [
    {"op": "auto_orient"},
    {"op": "thumbnail", "width": 256, "height": 256},
    {"op": "strip_metadata"},
]


class ImageAssetForm(forms.ModelForm):
    class Meta:
        model = ImageAsset
        fields = ("file",)

    def clean_file(self) -> UploadedFile:
        """Refuses what `images.process` would refuse (format, size, pixels, truncation), saying why."""
        upload: UploadedFile = self.cleaned_data["file"]
        if upload.size is not None and upload.size > settings.IMAGES_MAX_FILE_BYTES:
            raise forms.ValidationError(
                f"The file is {upload.size:,} bytes, over the cap of {settings.IMAGES_MAX_FILE_BYTES:,}."
            )
        upload.seek(0)
        data = upload.read(settings.IMAGES_MAX_FILE_BYTES + 1)
        upload.seek(0)
        try:
            service.inspect_upload(data)
        except service.ImageError as exc:
            raise forms.ValidationError(f"This image cannot be processed: {exc}.") from None
        return upload

    def save(self, commit: bool = True) -> ImageAsset:
        asset: ImageAsset = super().save(commit=False)
        asset.original_name = self.cleaned_data["file"].name[:255]
        if commit:
            asset.save()
        return asset


class ImageOutputInline(admin.TabularInline):
    model = ImageOutput
    extra = 0
    can_delete = False
    fields = ("step", "format", "width", "height", "link", "created_at")
    readonly_fields = fields
    ordering = ("operations_key", "step")

    def has_add_permission(self, request: HttpRequest, obj: object | None = None) -> bool:
        return False

    @admin.display(description="file")
    def link(self, output: ImageOutput) -> str:
        return format_html('<a href="{}">{}</a>', output.file.url, output.file.name)


@admin.register(ImageAsset)
class ImageAssetAdmin(admin.ModelAdmin):
    form = ImageAssetForm
    list_display = ("id", "original_name", "uploaded_at", "output_count")
    search_fields = ("original_name",)
    date_hierarchy = "uploaded_at"
    inlines = (ImageOutputInline,)
    actions = ("make_thumbnails",)

    def get_queryset(self, request: HttpRequest) -> QuerySet[ImageAsset]:
        return super().get_queryset(request).annotate(output_total=Count("outputs"))

    @admin.display(description="outputs", ordering="output_total")
    def output_count(self, asset: ImageAsset) -> int:
        return getattr(asset, "output_total", 0)

    @admin.action(description="Make 256 px thumbnails (oriented, metadata stripped)", permissions=["change"])
    @reports_broker_errors
    def make_thumbnails(self, request: HttpRequest, queryset: QuerySet[ImageAsset]) -> None:
        from tasks.images import process

        for asset in queryset:
            # After commit, so the worker never looks for a row this request has not committed.
            transaction.on_commit(partial(process.delay, asset_id=asset.pk, operations=THUMBNAIL_OPERATIONS))
        self.message_user(
            request,
            f"Queued thumbnails for {queryset.count()} image(s) on the images queue.",
            messages.SUCCESS,
        )
