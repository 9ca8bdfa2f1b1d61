"""Does this server answer? One bounded probe for the MLflow and Prefect URLs the CLIs talk to.

    from stages.health import probe
    problem = probe("http://127.0.0.1:5000")     # None when <url>/health answers HTTP 200 within 5 s

A CLI pointed at no server should say so in seconds, not retry for minutes.
"""

from __future__ import annotations

import urllib.request

TIMEOUT_SECONDS = 5.0


def probe(url: str, timeout_seconds: float = TIMEOUT_SECONDS, path: str = "/health") -> str | None:
    """None when `<url><path>` answers HTTP 200 within timeout_seconds, else why not, in a few words."""
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}{path}", timeout=timeout_seconds) as response:
            return None if response.status == 200 else f"answered HTTP {response.status}"
    except OSError as exc:  # refused, timed out, DNS, or an HTTP error status (HTTPError is an OSError)
        return str(getattr(exc, "reason", exc))
