"""``python -m server``: start laser-serve with settings from flags and LASER_* environment variables."""

from __future__ import annotations

import logging
import sys

import uvicorn
from pydantic_settings import CliApp

from server.config import Settings
from server.main import create_app


def main(argv: list[str] | None = None) -> None:
    settings = CliApp.run(Settings, cli_args=sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port,
                log_level=settings.log_level, timeout_graceful_shutdown=10)


if __name__ == "__main__":
    main()
