"""`python -m dscoder`: the same as the `dscoder` command (signal handlers first, then the CLI)."""
from dscoder.cli.entry import main

if __name__ == "__main__":
    main()
