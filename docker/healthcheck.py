"""Container health probe: exit 0 when the server's `GET /health` answers 200 (stdlib only).

Used by the Dockerfiles' HEALTHCHECK and by compose; honours IRO_PORT like `iro serve`.
"""

import os
import sys
import urllib.error
import urllib.request

HEALTH_PATH = "/health"


def main() -> int:
    url = f"http://127.0.0.1:{os.environ.get('IRO_PORT', '8000')}{HEALTH_PATH}"
    try:
        with urllib.request.urlopen(url, timeout=4) as response:
            return 0 if response.status == 200 else 1
    except (urllib.error.URLError, OSError) as exc:
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
