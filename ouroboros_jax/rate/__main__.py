"""``python -m ouroboros_jax.rate RUN_DIR``: serve the rating page of a run.

The ratings database is ``RUN_DIR/ratings.sqlite`` (created empty if the run has
not enqueued anything yet). The start lines name the database and the URL to
open, which carries the token.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ouroboros_jax.rate.server import DEFAULT_PORT, TOKEN_ENV, RatingServer
from ouroboros_jax.rate.store import DB_NAME, RatingStore


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m ouroboros_jax.rate",
        description="Serve a page on which people rate a run's completions; ratings go to RUN_DIR/" + DB_NAME)
    parser.add_argument("run_dir", metavar="RUN_DIR", type=Path, help="the run directory")
    parser.add_argument("--db", type=Path, default=None,
                        help=f"the SQLite file (default: RUN_DIR/{DB_NAME})")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1; any other address needs the token)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"TCP port, 0 for any free one "
                        f"(default {DEFAULT_PORT})")
    parser.add_argument("--no-token", action="store_true",
                        help="serve without a token (loopback addresses only; see the security notes)")
    parser.add_argument("--quiet", action="store_true", help="do not log requests")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.run_dir.is_dir():
        print(f"error: {args.run_dir}: no such run directory", file=sys.stderr)
        return 2
    try:
        store = RatingStore(args.db if args.db is not None else args.run_dir / DB_NAME)
        server = RatingServer(store, host=args.host, port=args.port, token=os.environ.get(TOKEN_ENV) or None,
                              require_token=not args.no_token, quiet=args.quiet)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    counts = store.counts()
    print(f"rate: database {store.path} ({counts.items} items, {counts.open} open, {counts.ratings} ratings)",
          flush=True)
    print(f"rate: open {server.page_url}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
