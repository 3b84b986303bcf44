"""Command line: ``python -m sm4 info`` (what was built), ``demo`` (the main job), ``train`` and
``eval`` (SM4 on a multi-task dataset), ``report flops|run`` (model FLOP tables, run plots) and
``bench report results.json`` (benchmark tables)."""

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
    for op, keys in details["compiled_ops"].items():
        print(f"  compiled op sm4::{op}: {', '.join(keys) or 'no kernels'}")
    for name, reason in details["backends"].items():
        print(f"  backend {name:<9} {'available' if reason is None else 'unavailable: ' + reason}")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m sm4", description=__doc__)
    subparsers = parser.add_subparsers(required=True, dest="command")
    subparsers.add_parser("info", help="what this installation built and which backends it can use").set_defaults(func=info)
    demo.add_parser(subparsers)
    bench_report.add_parser(subparsers)
    experiment.add_parsers(subparsers)
    report.add_parser(subparsers)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
