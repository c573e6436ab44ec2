"""The `dagr-inject` command of the Python package: the Rust command line, in this process."""

import sys


def main() -> None:
    from . import _native  # noqa: F401  (importing the package finds ONNX Runtime first)

    sys.exit(_native.run_cli(["dagr-inject", *sys.argv[1:]]))
