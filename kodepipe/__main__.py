"""``python -m kodepipe kp-ls ...``: run a command from a checkout (bin/ uses this)."""

import importlib
import sys

from kodepipe.commands import COMMANDS


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        sys.stderr.write(f"usage: python -m kodepipe {{{','.join(COMMANDS)}}} [ARGS]...\n")
        sys.exit(2)
    prog = sys.argv.pop(1)
    sys.argv[0] = prog
    importlib.import_module(COMMANDS[prog]).main()


if __name__ == "__main__":
    main()
