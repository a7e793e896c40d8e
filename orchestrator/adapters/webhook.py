"""A webhook that takes a Slack-compatible JSON message (`{"text": ...}`): Slack and
Mattermost incoming webhooks, Google Chat spaces, or anything of one's own.

Only `text` is sent, since some receivers refuse fields they do not know. The URL
comes from a setting (in the cloud, mounted from Secret Manager) and is never
logged: it is the receiver's only credential.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from orchestrator.errors import PermanentError, RetryableError

# Worth retrying: the receiver is down, overloaded or rate limiting.
RETRYABLE_STATUS = {408, 425, 429}


def slack_message(alert: Mapping[str, Any]) -> dict[str, Any]:
    return {"text": str(alert["text"])}


class WebhookSink:
    def __init__(self, url: str, *, timeout_s: float = 10.0):
        parts = urlsplit(url)
        if parts.scheme not in ("https", "http") or not parts.netloc:
            raise ValueError("the alert webhook URL must be an http(s) URL")
        self.url = url
        self.timeout_s = timeout_s
        # What may be shown of the URL: its host, never the path that holds the secret.
        self.host = parts.hostname or "?"

    def send(self, alert: Mapping[str, Any]) -> None:
        body = json.dumps(slack_message(alert)).encode()
        request = urllib.request.Request(
            self.url, data=body, method="POST",
            headers={"Content-Type": "application/json", "User-Agent": "orchestrator-alerts"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                response.read()
        except urllib.error.HTTPError as exc:
            detail = f"webhook at {self.host} answered {exc.code} {exc.reason}"
            if 400 <= exc.code < 500 and exc.code not in RETRYABLE_STATUS:
                raise PermanentError(detail) from None
            raise RetryableError(detail) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise RetryableError(f"webhook at {self.host} unreachable: {reason}") from None
