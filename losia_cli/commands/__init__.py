"""One module per `losia` sub-command, each with `add_parser(subparsers)` and `run(args) -> exit code`.
Module level imports stay light (no torch): `losia --help` builds every parser."""
