"""Alerts: always logged, optionally posted to a Slack-compatible webhook ({"text": ...})."""

from __future__ import annotations

import json
import logging
import os
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dagster as dg

log = logging.getLogger("ml_lifecycle.alerts")


class Notifier(dg.ConfigurableResource):
    """Sends alerts: to the log and `alerts.jsonl` always, to `webhook_url` when set."""

    webhook_url: str = ""
    alerts_file: str = ""
    timeout_seconds: float = 5.0

    def send(self, kind: str, severity: str, message: str, **details: Any) -> dict[str, Any]:
        alert = {"time": datetime.now(UTC).isoformat(timespec="seconds"), "kind": kind,
                 "severity": severity, "message": message, **details}
        log.warning("[%s] %s: %s", severity.upper(), kind, message)
        if self.alerts_file:
            path = Path(self.alerts_file)
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a") as handle:
                handle.write(json.dumps(alert, default=str) + "\n")
        url = os.path.expandvars(self.webhook_url) if self.webhook_url else ""
        if url:
            body = json.dumps({"text": f"*{severity.upper()}* {kind}: {message}",
                               "attachments": [{"fields": [
                                   {"title": k, "value": str(v), "short": True}
                                   for k, v in details.items()]}]}).encode()
            request = urllib.request.Request(url, data=body, method="POST",
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_seconds) as response:
                    alert["webhook_status"] = response.status
            except OSError as error:  # an alert channel down must not fail the pipeline
                alert["webhook_error"] = str(error)
                log.error("webhook %s failed: %s", url, error)
        return alert
