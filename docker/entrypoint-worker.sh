#!/bin/sh
# One solo-pool worker per GPU: CUDA does not survive fork.
set -eu
exec celery -A workers.celery_app worker -Q gpu,default --pool solo \
    --loglevel "${LOG_LEVEL:-INFO}" -n "worker-${HOSTNAME:-gpu}@%h" "$@"
