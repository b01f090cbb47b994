"""`python -m dscoder`: the same as the `dscoder` command."""
from dscoder.cli.app import main

if __name__ == "__main__":
    main()
