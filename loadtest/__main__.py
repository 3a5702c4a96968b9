"""`python -m loadtest`: run the load test (options: `python -m loadtest --help`)."""

import signal
import sys

from loadtest.cli import main

if __name__ == "__main__":
    # SIGTERM ends the run like Ctrl-C does: through the `finally` blocks that stop spawned servers.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted: servers stopped, no report written", file=sys.stderr)
        sys.exit(130)
