"""The ``plop`` command and ``python -m plop``: a Ctrl-C that lands while plop itself is still
being imported ends with the same one line as any other, not a traceback."""

from __future__ import annotations

import signal
import sys


def main() -> int:
    # Python's own handler only raises KeyboardInterrupt, and an extension that clears errors around
    # an optional import (PyErr_Clear) can swallow it, so the import would go on and the command run
    # as if nothing was pressed. A flag set by the handler itself cannot be swallowed.
    pressed = []

    def on_sigint(signum, frame):
        pressed.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        from .cli import main as cli_main
    except KeyboardInterrupt:
        pressed.append(signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, previous)
    if pressed:
        print("plop: interrupted", file=sys.stderr)
        return 130
    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
