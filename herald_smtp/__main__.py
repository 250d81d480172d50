"""`python -m herald_smtp COMMAND`: operator commands (the service itself runs under gunicorn)."""

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m herald_smtp",
        description="herald-smtp operator commands. The service itself runs as "
                    "`gunicorn -c gunicorn.conf.py app:app`.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    check = commands.add_parser(
        "check", help="check the configuration and that a send would work, without sending",
        description="Load the configuration as the service does (the env file, then the environment), report "
                    "every problem, then go as far as a real send over SMTP (EHLO, STARTTLS, AUTH, "
                    "MAIL FROM) and RSET instead of sending. Prints no secret.",
        epilog="exit status: 0 a send would work, 1 it would fail (reason on the last line), "
               "2 the configuration would stop the service")
    check.add_argument("--send-to", metavar="ADDRESS", default="",
                       help="also send one real test message to ADDRESS")
    args = parser.parse_args(argv)
    if args.command == "check":
        from .check import run

        return run(send_to=args.send_to)
    parser.print_help(sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
