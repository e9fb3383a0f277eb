"""The ``attribution`` command: thin wrappers that materialize assets or query results."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence


def _defs_and_specs(pipeline_name: str | None = None):
    from .defs.factory import build_definitions
    from .spec import configured_pipelines

    specs = configured_pipelines()
    if pipeline_name is not None:
        names = [s.name for s in specs]
        if pipeline_name not in names:
            raise SystemExit(f"Unknown pipeline {pipeline_name!r}; configured pipelines: {names}.")
    return build_definitions(specs), {s.name: s for s in specs}


def cmd_materialize(args: argparse.Namespace) -> int:
    from .defs.runner import materialize_pipeline, persistent_instance

    defs, specs = _defs_and_specs(args.pipeline)
    instance = persistent_instance()
    materialize_pipeline(defs, specs[args.pipeline], instance)
    print(f"Done. Runs are recorded in {os.environ['DAGSTER_HOME']}; `make ui` shows them.")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .defs.runner import materialize_pipeline, persistent_instance
    from .report import demo_report

    defs, specs = _defs_and_specs("demo")
    instance = persistent_instance()
    materialize_pipeline(defs, specs["demo"], instance)
    print(demo_report(specs["demo"], instance, defs))
    return 0


def cmd_scores(args: argparse.Namespace) -> int:
    from resources import StorageResource

    from .report import format_top_k

    _defs_and_specs(args.pipeline)
    print(format_top_k(StorageResource().path(args.pipeline, "attribution.duckdb"), args.query, args.k))
    return 0


def _print_hits(query, hits) -> None:
    print(f"query: {query if isinstance(query, str) else query[0] + query[1]}")
    for rank, hit in enumerate(hits, 1):
        print(f"  {rank:>3} {hit.score:+.4f}  {hit.doc_id}  {hit.text[:100]}")


def _parse_line(line: str):
    """``prompt<TAB>completion`` (loss on the completion) or plain text."""
    prompt, tab, completion = line.rstrip("\n").partition("\t")
    return (prompt, completion) if tab else prompt


def cmd_query(args: argparse.Namespace) -> int:
    from resources import StorageResource

    from .engine.attributor import Attributor

    _, specs = _defs_and_specs(args.pipeline)
    attributor = Attributor.open(specs[args.pipeline], StorageResource().root,
                                 use_index=False if args.no_index else None)
    if args.text:
        query = (args.text, args.completion) if args.completion else args.text
        _print_hits(query, attributor.search([query], args.k)[0])
        return 0
    interactive = sys.stdin.isatty()
    if interactive:
        print("One query per line (prompt<TAB>completion for answer-only loss); Ctrl-D to quit.")
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            return 0
        if line.strip():
            query = _parse_line(line)
            _print_hits(query, attributor.search([query], args.k)[0])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attribution", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="materialize the embedded demo pipeline and show the result")
    demo.set_defaults(func=cmd_demo)
    mat = sub.add_parser("materialize", help="materialize every asset of a pipeline")
    mat.add_argument("--pipeline", required=True)
    mat.set_defaults(func=cmd_materialize)
    scores = sub.add_parser("scores", help="top-k training documents for one query, with text (DuckDB)")
    scores.add_argument("--pipeline", required=True)
    scores.add_argument("--query", required=True, help="query id (SELECT query_id FROM queries)")
    scores.add_argument("-k", type=int, default=10)
    scores.set_defaults(func=cmd_scores)
    query = sub.add_parser("query", help="top-k training documents for a new text (reads stdin without TEXT)")
    query.add_argument("--pipeline", required=True)
    query.add_argument("text", nargs="?", help="query text; omit to read one query per line from stdin")
    query.add_argument("--completion", help="answer part: the loss covers only these tokens")
    query.add_argument("-k", type=int, default=10)
    query.add_argument("--no-index", action="store_true", help="brute force over the gradient stores")
    query.set_defaults(func=cmd_query)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
