"""``dipc``: serve DOKU's direct inquiries, manage payment codes, simulate DOKU, check a deployment.

Exit codes: 0 done, 1 the command failed (the message says why), 2 usage or configuration error,
3 a partial import (`codes import`: the valid lines were saved, the others were not).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from server import __version__
from server.cli.common import EXIT_FAILURE, EXIT_USAGE, CommandFailed, print_error
from server.config import ConfigError
from server.core.errors import DipcError
from server.ops.logging import configure_logging
from server.store.pool import CONTENDED_ERRORS, contended

DESCRIPTION = """\
dipc answers DOKU's Direct Inquiry Payment Code requests (Alfamart, Alfamidi, Lawson, Indomaret …)
from PostgreSQL and records DOKU's payment notifications exactly once.

The database is DATABASE_URL: postgresql://… for an external PostgreSQL, or `embedded` for one that
dipc runs under $DIPC_DATA_DIR (default ./.dipc). With --demo and no DATABASE_URL, every command uses
the embedded database of `dipc serve --demo`.
"""

EPILOG = """\
first steps:
  dipc serve --demo                      run with demo credentials and demo codes
  dipc simulate inquiry --demo 8896512345678123
                                         ask the running server as DOKU would
  dipc codes add --demo 8896512345678124 --amount 150000 --invoice INV-1 --name "Budi Santoso"
                                         register a code in the demo's database
  dipc codes import --demo codes.csv     register many codes at once (CSV or NDJSON)

in production (external PostgreSQL; see the README's "Running in production"):
  DATABASE_URL=postgresql://dipc_owner:…@db/dipc dipc migrate    as the schema's owner
  export DATABASE_URL=postgresql://dipc_app:…@db/dipc             a role that reads and writes rows
  dipc doctor && dipc serve

Exit codes: 0 done, 1 failed, 2 usage or configuration (restarting will not help), 3 partly imported.
Run `dipc COMMAND --help` for the details of each command. Configuration is read from DIPC_*
environment variables; see the README.
"""


# Each command, in the order `dipc --help` lists them, and the module in server.cli whose `register` adds
# it. Only the module of the command that runs is imported: all of them import aiohttp, the app and more,
# which took most of a second at every start.
COMMANDS = {
    "serve": "serve",
    "migrate": "migrate",
    "codes": "codes",
    "payments": "codes",
    "exceptions": "casework",
    "inquiries": "casework",
    "notifications": "casework",
    "events": "events",
    "reconcile": "reconcile",
    "simulate": "simulate",
    "doctor": "doctor",
    "prune": "prune",
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command, or of `command` (and its module's other commands) alone.

    Whatever follows a command's name is parsed by that command: the others would only take the time to
    import their modules.
    """
    parser = argparse.ArgumentParser(
        prog="dipc",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"dipc {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    # A named command's module, or every module once, in the order of COMMANDS.
    modules = [COMMANDS[command]] if command in COMMANDS else list(dict.fromkeys(COMMANDS.values()))
    for module in modules:
        importlib.import_module(f"server.cli.{module}").register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # The first argument is the command's name, or --help, --version or a mistake: then every command is
    # registered, to be listed.
    parser = build_parser(argv[0] if argv else None)
    args = parser.parse_args(argv)
    args.argv = argv  # what was typed: a list's next page is this command at the next cursor
    # Commands print their results on stdout; their logs go to stderr and only when they matter.
    # `serve` configures logging again from its settings.
    log_format = os.environ.get("DIPC_LOG_FORMAT", "auto")
    configure_logging(log_format if log_format in ("json", "console") else "auto", "WARNING", sys.stderr)
    try:
        return int(args.run(args) or 0)
    except CommandFailed as failure:
        print(f"dipc: {failure}", file=sys.stderr)
        return failure.exit_code
    except ConfigError as error:
        print(f"dipc: configuration: {error}", file=sys.stderr)
        return EXIT_USAGE
    except DipcError as error:
        print_error(error)
        return EXIT_FAILURE
    except CONTENDED_ERRORS as error:
        print_error(contended(error))
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130
