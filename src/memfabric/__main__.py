"""`python -m memfabric` and the `memfabric` command."""

import sys

from .stop_request import catch_interrupts


def main() -> int:
    catch_interrupts()           # before the imports below, which take ~0.4 s
    try:
        from .cli.main import main as run
        return run()             # (its own `try` begins once it has read its arguments)
    except KeyboardInterrupt:
        print("memfabric: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
