"""`osteoscreen web` (the dashboard alone) and `web hash-password`."""
from __future__ import annotations

import sys

from .common import UsageError, _node_flags
from .roles import cmd_run_roles


def cmd_web(args) -> int:
    if args.web_command == "hash-password":
        return cmd_hash_password(args)
    return cmd_run_roles(args)


def cmd_hash_password(args) -> int:
    """Print a hash for web.users; the password comes from stdin (piped) or a prompt, never a flag."""
    import getpass
    from ..web.auth import hash_password
    if sys.stdin.isatty():
        password = getpass.getpass("password: ")
        if getpass.getpass("again: ") != password:
            raise UsageError("the passwords differ")
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if len(password) < 8:
        raise UsageError("a password needs at least 8 characters")
    print(hash_password(password))
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("web", help="the dashboard and Prometheus /metrics (`serve` runs it too); "
                       "`web hash-password` makes a password hash for web.users")
    _node_flags(p)
    p.add_argument("--http-port", type=int, help="HTTP port (web.port, default 8080)")
    web_sub = p.add_subparsers(dest="web_command")
    q = web_sub.add_parser("hash-password", help="read a password (stdin or prompt) and print its hash for web.users")
    q.set_defaults(func=cmd_web)
    p.set_defaults(func=cmd_web, web_command=None)
