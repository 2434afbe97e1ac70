"""Entry point of the ``spamask-integrate`` command line (commands added per issue)."""

from __future__ import annotations

import click


@click.group()
@click.version_option(package_name="spamask-integrate")
def main() -> None:
    """Spatial domains and multi-slice integration with SpaMask on DGL."""
