"""Command line: ``python -m sm4 info`` (what was built), ``demo`` (the main job), ``train`` and
``eval`` (SM4 on a multi-task dataset), ``report flops|run`` (model FLOP tables, run plots) and
``bench report results.json`` (benchmark tables).

Errors (an unknown setting, a missing file, a refused resume, ...) print one line and exit with
status 2; ``--debug`` (anywhere on the line) shows the traceback instead. Ctrl-C exits with 130
and says where a training can resume."""

import argparse
import sys

from . import bench_report, build_info, demo, experiment, report


def info(args):
    details = build_info()
    print(f"sm4 {details['sm4']}  torch {details['torch']}  triton {details['triton']}")
    if details["extension_error"]:
        print(f"  compiled extension: missing: {details['extension_error']}")
    if details["stale_extension_missing_ops"]:
        print(f"  compiled extension is stale (rebuild it): missing {', '.join(details['stale_extension_missing_ops'])}")
    built = sorted({key.lower() for keys in details["compiled_ops"].values() for key in keys})
    print(f"  sm4: built backends: {', '.join(built) or 'none'} (compiled extension sm4._C)")
    for op, keys in details["compiled_ops"].items():
        print(f"  compiled op sm4::{op}: {', '.join(keys) or 'no kernels'}")
    for name, reason in details["backends"].items():
        print(f"  backend {name:<9} {'available' if reason is None else 'unavailable: ' + reason}")
    from .backends import CUDA

    if CUDA.unverified:  # until a GPU has run them (sm4/backends.py)
        print("  cuda kernels (csrc/cuda): executed under CPU emulation by the test suite (tests/cuda_emulation), on no "
              f"GPU yet; automatic dispatch does not pick them for {', '.join(sorted(CUDA.unverified))}")
    return 0


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line (``prog: error: ...``) and exit status 2, like every other
    CLI error; the usage is left to ``--help``. Subcommand parsers inherit the class."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [arg for arg in argv if arg != "--debug"]
    parser = OneLineErrorParser(prog="python -m sm4", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    # Taken out of argv above (it may stand anywhere on the line); declared here for --help only.
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error instead of its one-line message (anywhere on the line)")
    subparsers = parser.add_subparsers(required=True, dest="command")
    subparsers.add_parser("info", help="what this installation built and which backends it can use").set_defaults(func=info)
    demo.add_parser(subparsers)
    bench_report.add_parser(subparsers)
    experiment.add_parsers(subparsers)
    report.add_parser(subparsers)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"\n{experiment.interrupted_message(args)}", file=sys.stderr)
        return 130
    except SystemExit as error:
        # A bare exit status (sys.exit(0), argparse of a nested tool) passes through; a message is a user
        # error like any other: one line, status 2 (a message-carrying SystemExit would otherwise exit 1).
        if debug or error.code is None or isinstance(error.code, int):
            raise
        print(f"{parser.prog} {args.command}: error: {' '.join(str(error.code).split())}", file=sys.stderr)
        return 2
    except Exception as error:  # noqa: BLE001 - every error becomes one line (or a traceback with --debug)
        if debug:
            raise
        print(f"{parser.prog} {args.command}: error: {describe_error(error)}", file=sys.stderr)
        return 2 if is_user_error(error) else 1


def is_user_error(error: BaseException) -> bool:
    """An error of the input (arguments, files, run folders, missing optional packages), not of sm4."""
    from .dispatch import BackendNotSupportedError
    from .training.run_folder import RunFolderBusy

    return isinstance(error, (ValueError, TypeError, OSError, ImportError, RunFolderBusy, BackendNotSupportedError))


def describe_error(error: BaseException) -> str:
    """One line: the error's message (lines joined); an internal error names its type and how to see more."""
    text = " ".join(str(error).split()) or type(error).__name__
    if is_user_error(error):
        return text
    return f"{type(error).__name__}: {text} (an internal error: rerun with --debug for the traceback)"


if __name__ == "__main__":
    sys.exit(main())
