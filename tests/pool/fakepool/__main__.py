"""``python -m tests.pool.fakepool --state DIR [--nbd-delay-ms N]``: run until SIGTERM/SIGINT."""

from .server import main

main()
