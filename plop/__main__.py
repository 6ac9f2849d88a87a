"""The ``plop`` command and ``python -m plop``: a Ctrl-C that lands while plop itself is still
being imported ends with the same one line as any other, not a traceback."""

from __future__ import annotations

import sys


def main() -> int:
    try:
        from .cli import main as cli_main
    except KeyboardInterrupt:
        print("plop: interrupted", file=sys.stderr)
        return 130
    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
