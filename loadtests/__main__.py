"""`python -m loadtests ...` = `geogate bench ...`."""

import argparse
import sys

from loadtests.cli import add_arguments, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests",
                                     description="geogate load generator and chaos scenarios")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
