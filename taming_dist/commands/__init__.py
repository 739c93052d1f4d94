"""Subcommands of `taming-dist`; see taming_dist/cli.py."""
