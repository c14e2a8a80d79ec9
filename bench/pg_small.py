"""Small values on the PostgreSQL index: Set / Get rates, server CPU per call, and the
transactions PostgreSQL committed and rolled back for them.

    python -m bench.pg_small [set|get|batch-set|batch-get ...] [--size 100] [--seconds 5]

Starts its own PostgreSQL (tests/infra, durable: fsync on) and one blobstore server on it
with the file chunk store (small values live in the index), then runs one sequential client
and 16 clients over 4 processes, as `make bench` does for the embedded pair. Rollbacks are
serialization failures that made a write run again.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import psycopg

from bench import procs
from bench.load import Load, measure, preload
from tests.infra.services import Postgres


def transactions(dsn: str) -> tuple[int, int]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row: Any = conn.execute("SELECT sum(xact_commit), sum(xact_rollback) FROM pg_stat_database").fetchone()
    return int(row[0]), int(row[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ops", nargs="*", default=["set", "get"])
    parser.add_argument("--size", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=5)
    options = parser.parse_args()
    pg = Postgres(durable=True).start()
    try:
        procs.CHILD_ENV.update(
            BLOBSTORE_INDEX="postgres",
            BLOBSTORE_POSTGRES_DSN=pg.dsn,
            BLOBSTORE_URL_SIGNING_SECRETS=json.dumps(["bench-secret-shared-by-replicas"]),
        )
        server = procs.start_blobstore(procs.ROOT / "build/bench/pg-small")
        try:
            for op in options.ops:
                load = Load("blobstore", server.address, op, options.size, "p")
                preload(load)
                for clients, processes in ((1, 1), (16, 4)):
                    committed_before, rolled_back_before = transactions(pg.dsn)
                    cpu = server.cpu_seconds()
                    rate = measure(load, clients, processes, options.seconds)
                    calls = rate["calls_per_s"] * options.seconds
                    committed_after, rolled_back_after = transactions(pg.dsn)
                    committed = committed_after - committed_before
                    rolled_back = rolled_back_after - rolled_back_before
                    print(
                        f"{op} {options.size} B, {clients} clients: {rate['values_per_s']:,.0f} values/s, "
                        f"server CPU {(server.cpu_seconds() - cpu) / calls * 1e3:.2f} ms/call, "
                        f"PostgreSQL transactions {committed:,} committed / {rolled_back:,} rolled back",
                        flush=True,
                    )
        finally:
            server.stop()
    finally:
        pg.stop()


if __name__ == "__main__":
    main()
