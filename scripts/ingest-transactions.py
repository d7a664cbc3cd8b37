#!/usr/bin/env python3
"""Per-transaction figures of ingest from a Postgres statement log.

`tally-tools bench ingest --log-statements` sets `log_min_duration_statement = 0` on the
run's database, so Postgres logs every statement with its duration. Give this script the
lines the run added to the server's log (for example
`tail -n +$((LINES_BEFORE + 1)) /var/log/postgresql/postgresql-15-main.log > run.log`) and it
prints, over the ingest transactions (those that write `tally.job_image` or copy into
`main_classification`): how many there were, their wall time from `BEGIN` to `COMMIT`
returned (median, p10, p90), the server time of their statements, and their `COMMIT`s.

Expects the default `log_line_prefix` of Debian's Postgres 15, `%m [%p] %q%u@%d `.

    scripts/ingest-transactions.py run.log [other-run.log ...]
"""

import re
import statistics
import sys
from datetime import datetime

LINE = re.compile(
    r"^(\S+ \S+) \S+ \[(\d+)\] \S+ LOG:  duration: ([\d.]+) ms  "
    r"(?:statement|(?:parse|bind|execute) [^:]*): (.*)$"
)


def quantile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def transactions(path):
    """The ingest transactions of one log, as dicts of wall, server and commit milliseconds."""
    open_by_pid = {}
    done = []
    with open(path, errors="replace") as log:
        for line in log:
            m = LINE.match(line)
            if not m:
                continue
            stamp, pid, duration, sql = m.group(1), m.group(2), float(m.group(3)), m.group(4)
            at = datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S.%f").timestamp() * 1000
            if sql.startswith("BEGIN"):
                open_by_pid[pid] = {"start": at - duration, "server": 0.0, "ingest": False}
                continue
            t = open_by_pid.get(pid)
            if t is None:
                continue
            t["server"] += duration
            if "tally.job_image" in sql or "COPY main_classification" in sql:
                t["ingest"] = True
            if sql.startswith("COMMIT"):
                t["wall"], t["commit"] = at - t["start"], duration
                if t["ingest"]:
                    done.append(t)
                del open_by_pid[pid]
            elif sql.startswith("ROLLBACK"):
                del open_by_pid[pid]
    return done


def main(paths):
    for path in paths:
        txs = transactions(path)
        if not txs:
            print(f"{path}: no ingest transactions")
            continue
        wall = [t["wall"] for t in txs]
        server = [t["server"] for t in txs]
        commit = [t["commit"] for t in txs]
        print(
            f"{path}: {len(txs)} ingest transactions; "
            f"wall median {statistics.median(wall):.1f} ms "
            f"(p10 {quantile(wall, 0.1):.1f}, p90 {quantile(wall, 0.9):.1f}); "
            f"statements' server time median {statistics.median(server):.1f} ms; "
            f"COMMIT median {statistics.median(commit):.1f} ms, max {max(commit):.1f} ms"
        )


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
