"""The ``laser`` command line: drive a laser-serve server (typer + rich), one module per resource.

:mod:`~clients.cli.common` holds the app, the global options and output helpers; importing each resource module
registers its commands on it.
"""

from clients.cli import datasets, exports, inference, jobs, profiles, system  # noqa: F401 - registers commands
from clients.cli.common import app

__all__ = ["app"]
