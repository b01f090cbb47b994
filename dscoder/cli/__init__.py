"""The `dscoder` command line (Typer). Imports nothing heavy: torch is loaded only to generate."""
