#!/bin/sh
# Same entrypoint as outside containers: uvicorn app.main:app (app.dev.run is the dev launcher).
set -eu
exec uvicorn app.main:app --host 0.0.0.0 --port "${PORT:-8000}" \
    --workers "${API_WORKERS:-2}" --proxy-headers "$@"
