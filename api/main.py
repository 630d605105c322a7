"""``chatmail-api --settings PATH``: serve the control API with uvicorn (one worker)."""

from __future__ import annotations

import argparse
import logging
import sys

from chatmaild.config import ConfigError

from .settings import SettingsError, load_settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="chatmail-api", description=__doc__)
    parser.add_argument("--settings", required=True, help="api.json, rendered by the formula")
    parser.add_argument("--tokens-file", help="JSON {monitor: {name: token}, admin: {...}}")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("chatmail_api")
    try:
        settings = load_settings(args.settings, args.tokens_file)
        from .app import create_app

        app = create_app(settings)
    except (SettingsError, ConfigError) as exc:
        log.error("%s", exc)
        return 1
    import uvicorn

    # One worker: the status cache, rate limits and the metrics collector live in-process.
    # No access log: /new requests carry client addresses we do not keep.
    uvicorn.run(
        app,
        host=settings.listen,
        port=settings.port,
        workers=1,
        access_log=False,
        server_header=False,
        log_level=args.log_level,
        proxy_headers=False,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
