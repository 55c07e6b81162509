"""The ``molnets`` command (placeholder until the training issue lands)."""

import sys


def main(argv=None) -> int:
    print("molnets: the command line is not written yet", file=sys.stderr)
    return 1
