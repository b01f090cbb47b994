"""The `dscoder` console script: signal handlers first, then the CLI.

Importing the CLI (typer, rich) takes a noticeable moment; installing SIGINT/SIGTERM handlers
before it means an interrupt that early also ends quietly with 130 or 143, not with a traceback.
"""
from __future__ import annotations

import sys


def main() -> None:
    from dscoder import signals

    signals.install_for_process()
    try:
        from dscoder.cli.app import main as cli_main
    except KeyboardInterrupt as e:
        sys.exit(signals.exit_code(e))
    cli_main()


if __name__ == "__main__":
    main()
