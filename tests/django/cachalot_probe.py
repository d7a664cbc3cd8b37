"""A Django process reading Antenna's tables through the ORM with django-cachalot 2.6.3 and
django-redis, configured as Antenna is (the `default` cache, CACHALOT_TIMEOUT=None).

Driven over stdin/stdout by tests/django_cache.rs, one command a line, one JSON answer a line:
  get <model> <id> <field>        the field of one row (a cached ORM read)
  count <model> <field> <value>   rows with field = value (a cached ORM read)
Environment: PROBE_DATABASE_URL (postgres://user@host:port/db), PROBE_REDIS_URL,
PROBE_KEY_PREFIX (CACHES KEY_PREFIX, so that tests do not share keys).
"""

import json
import os
import sys
from urllib.parse import urlparse

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import django  # noqa: E402
from django.conf import settings  # noqa: E402

db = urlparse(os.environ["PROBE_DATABASE_URL"])
settings.configure(
    INSTALLED_APPS=["cachalot", "probe_app"],
    DATABASES={
        "default": {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": db.path.lstrip("/"),
            "USER": db.username or "postgres",
            "PASSWORD": db.password or "",
            "HOST": db.hostname,
            "PORT": db.port or 5432,
        }
    },
    CACHES={
        "default": {
            "BACKEND": "django_redis.cache.RedisCache",
            "LOCATION": os.environ["PROBE_REDIS_URL"],
            "KEY_PREFIX": os.environ.get("PROBE_KEY_PREFIX", ""),
            "OPTIONS": {"CLIENT_CLASS": "django_redis.client.DefaultClient"},
        }
    },
    USE_TZ=False,
    TIME_ZONE="America/New_York",
    CACHALOT_TIMEOUT=None,
)
django.setup()

from probe_app import models  # noqa: E402

MODELS = {
    "deployment": models.Deployment,
    "sourceimage": models.SourceImage,
    "detection": models.Detection,
    "job": models.Job,
}

print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    words = line.split()
    if not words:
        continue
    try:
        if words[0] == "get":
            row = MODELS[words[1]].objects.get(pk=int(words[2]))
            answer = getattr(row, words[3])
        elif words[0] == "count":
            answer = MODELS[words[1]].objects.filter(**{words[2]: int(words[3])}).count()
        else:
            answer = {"error": f"unknown command {words[0]}"}
    except Exception as e:  # the test reads the error
        answer = {"error": repr(e)}
    print(json.dumps(answer), flush=True)
