"""The `shardstate` command's entry point: a stop signal is caught from the first instant, before the
CLI imports torch (a second or so), so even an early Ctrl-C is one line and exit 128 + the signal."""

from __future__ import annotations

import sys

from shardstate.stops import Stopped, raising_stops


def main() -> int:
    try:
        with raising_stops():
            from shardstate.cli import main as cli_main

            return cli_main()
    except Stopped as stop:
        print(stop.line, file=sys.stderr)
        return stop.exit_code


if __name__ == "__main__":
    sys.exit(main())
