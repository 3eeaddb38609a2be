"""Prefect flows that run the DVC pipeline.

Importing this package sets offline defaults for Prefect *before* Prefect is
imported (Prefect reads its settings once, at import): state under the
git-ignored ``.state/prefect`` of the project, no analytics, and a generous
start-up timeout for the ephemeral API server on a slow 2-core machine. A value
the user already exported (e.g. ``PREFECT_API_URL`` pointing at
``prefect server start --host 127.0.0.1``) is never overridden.
"""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent

PREFECT_DEFAULTS = {
    "PREFECT_HOME": str(PROJECT_ROOT / ".state" / "prefect"),
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "60",
}

for _name, _value in PREFECT_DEFAULTS.items():
    os.environ.setdefault(_name, _value)

# Prefect creates PREFECT_HOME without its parents; in a fresh clone `.state/` does not exist
# yet, and the ephemeral API server then dies on "unable to open database file".
try:
    Path(os.environ["PREFECT_HOME"]).expanduser().mkdir(parents=True, exist_ok=True)
except OSError:
    pass  # Prefect reports an unusable PREFECT_HOME itself
