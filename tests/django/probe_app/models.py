"""Unmanaged models over Antenna's tables: just the columns the test reads."""

from django.db import models


class Deployment(models.Model):
    captures_count = models.IntegerField(null=True)
    detections_count = models.IntegerField(null=True)
    occurrences_count = models.IntegerField(null=True)

    class Meta:
        app_label = "probe_app"
        managed = False
        db_table = "main_deployment"


class SourceImage(models.Model):
    detections_count = models.IntegerField(null=True)

    class Meta:
        app_label = "probe_app"
        managed = False
        db_table = "main_sourceimage"


class Detection(models.Model):
    source_image_id = models.BigIntegerField(null=True)

    class Meta:
        app_label = "probe_app"
        managed = False
        db_table = "main_detection"


class Job(models.Model):
    status = models.CharField(max_length=255)

    class Meta:
        app_label = "probe_app"
        managed = False
        db_table = "jobs_job"
