#!/bin/sh
# Names a worker after its container, so that ids are unique in the fleet and say where a worker runs:
# under host networking every container carries the host's hostname, so the container's id is used
# (the name docker ps shows). A HEIMDEX__WORKER__ID set by the user wins.
set -eu
if [ -z "${HEIMDEX__WORKER__ID:-}" ]; then
  cid="$(sed -n 's|.*/containers/\([0-9a-f]\{12\}\)[0-9a-f]*/.*|\1|p' /proc/self/mountinfo | head -n 1)"
  [ -n "$cid" ] || cid="$(hostname)"
  case "${1:-}" in
    worker-*) export HEIMDEX__WORKER__ID="${1#worker-}-$cid" ;;
  esac
fi
exec "$@"
