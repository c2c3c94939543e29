#!/usr/bin/env bash
# A throwaway PostgreSQL cluster for the tests, run as an unprivileged user on loopback.
#
#   scripts/pg-cluster.sh start DIR   # installs PostgreSQL if missing (root: apt-get),
#                                     # starts a cluster in DIR, prints its URL
#   scripts/pg-cluster.sh stop DIR    # stops it and removes DIR
#
# The printed URL is what the tests read from FLEETWIRE_TEST_POSTGRES_URL.
set -euo pipefail

usage() { echo "usage: $0 start|stop DIR" >&2; exit 2; }
[ $# -eq 2 ] || usage
action=$1 dir=$2

pg_bin() {
  local found
  found=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
  if [ -z "$found" ] && command -v pg_ctl >/dev/null 2>&1; then
    found=$(dirname "$(readlink -f "$(command -v pg_ctl)")")
  fi
  echo "$found"
}

# The cluster must not run as root (initdb refuses to); use the system's postgres user,
# or make a system user for it.
as_owner() {
  if [ "$(id -u)" -ne 0 ]; then "$@"; return; fi
  runuser -u "$owner" -- "$@"
}

owner=$(id -un)
if [ "$(id -u)" -eq 0 ]; then
  owner=postgres
  id "$owner" >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin "$owner"
fi

case "$action" in
start)
  bin=$(pg_bin)
  if [ -z "$bin" ]; then
    if [ "$(id -u)" -ne 0 ]; then
      echo "PostgreSQL is not installed; install the postgresql package (as root)" >&2
      exit 1
    fi
    echo "installing PostgreSQL from the system's packages" >&2
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2
    bin=$(pg_bin)
  fi
  mkdir -p "$dir"
  chown "$owner" "$dir"
  chmod 0700 "$dir"
  as_owner "$bin/initdb" -D "$dir/data" -U fleetwire --auth=trust -E UTF8 --no-sync >&2
  # A free loopback port, chosen by the kernel.
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  as_owner "$bin/pg_ctl" -D "$dir/data" -l "$dir/data/server.log" -w -t 60 \
    -o "-c listen_addresses=127.0.0.1 -p $port -k $dir -c fsync=off -c max_connections=300" \
    start >&2
  as_owner "$bin/createdb" -h 127.0.0.1 -p "$port" -U fleetwire fleetwire_test >&2
  echo "postgresql+asyncpg://fleetwire@127.0.0.1:$port/fleetwire_test"
  ;;
stop)
  bin=$(pg_bin)
  if [ -n "$bin" ] && [ -f "$dir/data/postmaster.pid" ]; then
    as_owner "$bin/pg_ctl" -D "$dir/data" -m immediate -w stop >&2 || true
  fi
  rm -rf "$dir"
  ;;
*) usage ;;
esac
