"""`python -m losia_cli.bench [options]`: the same as `losia bench [options]`."""

import sys

from losia_cli.cli import main

sys.exit(main(["bench", *sys.argv[1:]]))
