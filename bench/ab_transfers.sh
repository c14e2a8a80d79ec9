#!/bin/bash
# A/B of two checkouts' large transfers, interleaved: each round starts tree A's server and
# client, then tree B's, and moves FILE up then down (bench.transfer), printing MiB/s and the
# CPU seconds of server (/proc/PID/stat) and client (/usr/bin/time).
#   bench/ab_transfers.sh TREE_A TREE_B FILE [ROUNDS]
# Each tree needs its own .venv (make install there; `git worktree add` makes a second tree).
set -euo pipefail
tree_a=$(realpath "$1"); tree_b=$(realpath "$2"); file=$(realpath "$3"); rounds=${4:-3}
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
mib=$(( $(stat -c %s "$file") / 1048576 ))
cpu() { awk '{print ($14+$15)/100}' "/proc/$1/stat"; }
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

one() {
  local tree=$1 tag=$2 grpc http pid
  grpc=$(port); http=$(port)
  rm -rf "$work/$tag"; mkdir -p "$work/$tag"
  (cd "$tree" && exec .venv/bin/blobstore serve --data-dir "$work/$tag" --port "$grpc" --http-port "$http" \
    --log-level warning) &
  pid=$!
  for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$grpc") 2>/dev/null && break; sleep 0.1; done
  for mode in ours-upload ours-download; do
    local path=$file before after out
    [ "$mode" = ours-download ] && path="$work/$tag.out"
    before=$(cpu "$pid")
    out=$(cd "$tree" && /usr/bin/time -f "%U %S" .venv/bin/python -m bench.transfer "$mode" "127.0.0.1:$grpc" "$path" k 2>&1)
    after=$(cpu "$pid")
    echo "$tag $mode: $(echo "$out" | head -1 | python3 -c "import json,sys; print(round($mib/json.load(sys.stdin)['seconds']))") MiB/s," \
      "server CPU $(echo "$after - $before" | bc) s, client CPU $(echo "$out" | tail -1 | awk '{print $1+$2}') s"
  done
  kill "$pid"; wait "$pid" 2>/dev/null || true
  rm -rf "$work/$tag" "$work/$tag.out"
}

for round in $(seq "$rounds"); do
  one "$tree_a" A
  one "$tree_b" B
done
