"""The ``attribution`` command: thin wrappers that materialize assets or query results.

Imports live inside the commands, so ``attribution --help`` starts without torch, Dagster or
transformers (``benchmarks/bench_cli.py`` times it in a fresh interpreter)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from attribution_assets.cli_errors import UserError, interrupt, interrupted, report_error


def _defs_and_specs(pipeline_name: str | None = None, pipelines: Path | None = None):
    """Definitions and specs of the configured pipelines (``pipelines``: this YAML file instead
    of ``$ATTRIBUTION_PIPELINES`` / ./pipelines.yaml)."""
    from .defs.factory import build_definitions
    from .spec import configured_pipelines

    errors: list[str] = []
    specs = configured_pipelines(errors, pipelines)
    for error in errors:
        print(f"warning: skipped an invalid pipeline: {error}", file=sys.stderr)
    if pipeline_name is not None:
        names = [s.name for s in specs]
        if pipeline_name not in names:
            raise UserError(f"Unknown pipeline {pipeline_name!r}; configured pipelines: {names}.")
    return build_definitions(specs, spec_errors=errors), {s.name: s for s in specs}


def _compute_here(args: argparse.Namespace) -> None:
    """Size torch's, FAISS's and the BLAS thread pools to ``--threads`` for a command that computes
    in this process outside Dagster steps (steps size them from the compute resource). Only such
    commands load torch and FAISS for it: planning and a no-op ``materialize`` do not."""
    from .engine.runtime import limit_threads

    limit_threads(args.threads)


def _log_level(args: argparse.Namespace) -> str:
    return "INFO" if args.verbose else "CRITICAL"


def _log(line: str) -> None:
    print(line, flush=True)


def _size_check(defs, spec, args: argparse.Namespace):
    """Before the stage that collects training gradients: print the disk and memory the
    gradient settings need, and refuse (naming the setting) what exceeds the free disk or
    memory unless ``--no-size-check`` (``engine.sizes``)."""

    def check(stage) -> None:
        if "train_gradients" not in stage.assets:
            return
        from .engine import sizes
        from .engine.io.corpus import shard_sizes
        from .engine.io.models import model_source

        paths = defs.resources["storage"].paths(spec)
        counts = shard_sizes(paths.documents)
        per_doc = max(spec.corpus.max_length - 1, 1) if spec.gradients.token_rows else 1  # token rows: at most
        try:
            model = sizes.meta_model(model_source(spec, paths, base=True), spec.model.trust_remote_code)
            size = sizes.estimate(model, spec, sum(counts.values()) * per_doc, max(counts.values()) * per_doc,
                                  len(counts))
        except (OSError, ValueError, RuntimeError) as exc:  # an adapter's modules, a config it cannot read
            _log(f"{spec.name} sizes: not estimated ({exc})")
            return
        _log(f"{spec.name} sizes: {'at most ' if per_doc > 1 else ''}{size.describe()}")
        problem = sizes.size_problem(size, spec, paths.root)
        if problem and not args.no_size_check:
            raise UserError(problem)
        if problem:
            _log(f"warning: {problem} (--no-size-check: running anyway)")

    return check


def _materialize(defs, spec, instance, args: argparse.Namespace) -> None:
    """Materialize ``spec`` stage by stage (size check before collecting), then print every data
    problem the pipeline's assets counted."""
    from .defs.runner import materialize_pipeline
    from .report import data_warnings

    materialize_pipeline(defs, spec, instance, log=_log, log_level=_log_level(args), force=args.force,
                         slot_timeout=getattr(args, "slot_timeout", 0.0),
                         before_stage=_size_check(defs, spec, args))
    for warning in data_warnings(spec, instance):
        print(f"warning: {warning}", file=sys.stderr, flush=True)


def cmd_materialize(args: argparse.Namespace) -> int:
    from .defs.instance import persistent_instance

    defs, specs = _defs_and_specs(args.pipeline)
    instance = persistent_instance()
    _materialize(defs, specs[args.pipeline], instance, args)
    print(f"Done. Runs are recorded in {os.environ.get('DAGSTER_HOME', '.dagster_home')}; `make ui` shows them.")
    return 0


def _data_spec(path: str, args: argparse.Namespace, queries: bool):
    """The corpus or query section of ``run`` / ``init`` (a local path made absolute, a hub
    dataset name kept as given)."""
    from .spec import DataSpec

    local = Path(path).expanduser()
    path = str(local.resolve()) if local.exists() else path
    if queries:
        columns = ({"prompt_column": args.prompt_column, "completion_column": args.completion_column}
                   if args.prompt_column or args.completion_column else {"text_column": args.query_text_column})
        unit = {"text_unit": "line"} if Path(path).suffix == ".txt" else {}
        return DataSpec(path=path, **columns, **unit,
                        **({"id_column": args.query_id_column} if args.query_id_column else {}))
    return DataSpec(path=path, text_column=args.text_column,
                    **({"id_column": args.id_column} if args.id_column else {}))


def cmd_init(args: argparse.Namespace) -> int:
    from .engine.quickstart import init_model

    _compute_here(args)
    queries = _data_spec(args.queries, args, queries=True) if getattr(args, "queries", None) else None
    made = init_model(_data_spec(args.corpus, args, queries=False), Path(args.out), vocab_size=args.vocab_size,
                      queries=queries)
    print(f"Made {made['path']}: a byte-level BPE tokenizer ({made['vocab_size']} tokens) trained on "
          f"{made['documents']} documents and a randomly initialized 2-layer GPT-NeoX "
          f"({made['parameters']:,} parameters, {made['positions']} positions; the longest "
          f"{'document or query' if queries else 'document'} has {made['longest_text_tokens']} tokens).", flush=True)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from .engine.quickstart import (
        QuickstartError,
        default_lengths,
        entry_yaml,
        pipeline_entry,
        pipeline_name,
        save_pipeline_entry,
    )
    from .spec import PIPELINES_ENV, ModelSpec

    name = args.name or pipeline_name(args.corpus)
    target = Path(args.pipelines or os.environ.get(PIPELINES_ENV) or "pipelines.yaml")
    corpus, queries = _data_spec(args.corpus, args, queries=False), _data_spec(args.queries, args, queries=True)
    try:
        if args.model is None:
            args.model = args.out = str(target.resolve().parent / "models" / name)
            if (Path(args.model) / "config.json").exists():
                _log(f"No --model: using the one made from the corpus before, {args.model}.")
            else:
                _log(f"No --model: making a small local one from the corpus in {args.model} "
                     "(`attribution init` alone does this).")
                cmd_init(args)
        model_path = Path(args.model).expanduser()
        model = ModelSpec(name_or_path=str(model_path.resolve()) if model_path.exists() else args.model)
        lengths = default_lengths(model, corpus, queries)
        model = dataclasses.replace(model, pad_token=lengths.pad_token)
        corpus = dataclasses.replace(corpus, max_length=lengths.corpus)
        queries = dataclasses.replace(queries, max_length=lengths.queries)
        gradients = {"projection_dim": args.projection_dim} if args.projection_dim is not None else None
        entry = pipeline_entry(name, model, corpus, queries, shard_size=args.shard_size, gradients=gradients)
        how = save_pipeline_entry(target, entry)
    except QuickstartError as exc:
        raise UserError(str(exc)) from None
    _log(f"Pipeline {name!r} ({how} in {target}; edit it there and rerun, or run `attribution materialize "
         f"--pipeline {name}`):\n\n{entry_yaml(entry)}")
    return _materialize_and_show(name, target, args)


def _materialize_and_show(name: str, pipelines: Path, args: argparse.Namespace) -> int:
    from .defs.instance import persistent_instance
    from .engine.io.corpus import read_queries
    from .report import format_top_k

    defs, specs = _defs_and_specs(name, pipelines)
    spec, instance = specs[name], persistent_instance()
    _materialize(defs, spec, instance, args)
    paths = defs.resources["storage"].paths(spec)
    queries = sorted(read_queries(paths.queries), key=lambda q: q["source_row"])
    print(f"\nThe top {args.k} training documents of the first {min(args.show, len(queries))} of "
          f"{len(queries)} queries (`attribution scores --pipeline {name} --query <id>` shows any other):")
    for query in queries[:args.show]:
        print("\n" + format_top_k(paths.database, query["doc_id"], args.k))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .defs.instance import persistent_instance
    from .defs.runner import materialize_pipeline
    from .report import demo_report

    defs, specs = _defs_and_specs("demo")
    instance = persistent_instance()
    materialize_pipeline(defs, specs["demo"], instance, log=_log, log_level=_log_level(args), force=args.force)
    print(demo_report(specs["demo"], instance, defs))
    return 0


def cmd_scores(args: argparse.Namespace) -> int:
    from .report import format_breakdown, format_top_k

    defs, specs = _defs_and_specs(args.pipeline)
    db = defs.resources["storage"].paths(specs[args.pipeline]).database
    print(format_breakdown(db, args.query, args.by, args.k) if args.by else format_top_k(db, args.query, args.k))
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
    from .engine.search.attributor import Attributor

    _compute_here(args)
    defs, specs = _defs_and_specs(args.pipeline)
    spec = specs[args.pipeline]
    attributor = Attributor(spec, defs.resources["storage"].paths(spec),
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


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .defs.common import key
    from .defs.evaluation import lds_partitions
    from .defs.instance import persistent_instance
    from .defs.planning import unsynced_partitions
    from .defs.runner import materialize_asset, materialize_partitions
    from .report import latest_metadata

    defs, specs = _defs_and_specs(args.pipeline)
    spec, instance = specs[args.pipeline], persistent_instance()
    present = defs.resolve_asset_graph().get_all_asset_keys()
    if key(spec, "fact_tracing") not in present:
        raise UserError(f"Pipeline {spec.name!r} has no evaluation: its queries need a `gold_column`.")
    if args.lds and key(spec, "lds") not in present:
        raise UserError("LDS retrains the model, so it exists for the demo pipeline only.")
    options = {"log": _log, "log_level": _log_level(args),
               "slot_timeout": args.slot_timeout}

    def run_partitions(asset: str, partitions: list[str]) -> None:  # missing, or made under other settings
        todo = unsynced_partitions(defs, instance, key(spec, asset), partitions)
        materialize_partitions(defs, spec, instance, asset, todo, **options)

    if spec.magic.enabled:  # MAGIC's training run and every query batch it lacks, before fact tracing
        from .defs.magic import magic_batches

        if instance.get_latest_materialization_event(key(spec, "magic_training")) is None:
            materialize_asset(defs, spec, instance, "magic_training", **options)
        run_partitions("magic_scores", instance.get_dynamic_partitions(magic_batches(spec).name))
    materialize_asset(defs, spec, instance, "fact_tracing", **options)
    if args.lds:
        run_partitions("lds_retrain", lds_partitions(spec).get_partition_keys())
        materialize_asset(defs, spec, instance, "lds", **options)
    for asset in ("fact_tracing", "lds") if args.lds else ("fact_tracing",):
        print(f"\n{asset}:\n{latest_metadata(instance, key(spec, asset))['table']}")
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from .engine.explain.render import explanation_html, explanation_terminal
    from .engine.explain.tokens import explain_query

    _compute_here(args)
    defs, specs = _defs_and_specs(args.pipeline)
    spec = specs[args.pipeline]
    if args.k < 1:
        raise UserError(f"-k must be >= 1, got {args.k}.")
    paths = defs.resources["storage"].paths(spec)
    model, tokenizer = defs.resources["compute"].load_model(spec, paths)
    try:
        expl = explain_query(spec, paths, args.query, args.k, model, tokenizer)
    except (KeyError, FileNotFoundError) as exc:
        raise UserError(exc.args[0]) from None
    print(explanation_terminal(expl, colour=sys.stdout.isatty() and not os.environ.get("NO_COLOR")))
    if args.html:
        from .engine.io.atomic import write_text_atomic

        write_text_atomic(args.html, explanation_html([expl]))
        print(f"\nHTML: {Path(args.html).resolve()}")
    return 0


def cmd_diagnose(args: argparse.Namespace) -> int:
    from .engine.evaluation.diagnose import diagnose, format_report

    _compute_here(args)
    print(format_report(diagnose(args.model, threshold=args.threshold, device=args.device, dtype=args.dtype)))
    return 0


def _size_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-size-check", action="store_true",
                        help="run even when the gradient settings need more disk or memory than is free")


def _column_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--text-column", default="text", help="corpus: the text column")
    parser.add_argument("--id-column", help="corpus: a column of unique document ids (default: content hashes)")


def _slot_timeout_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--slot-timeout", type=float, default=0.0,
                        help="seconds to wait for a free `gpu` pool slot held by another running run")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attribution", description=__doc__)
    parser.add_argument("--verbose", action="store_true",
                        help="show Dagster's log and full tracebacks (default: one line per stage)")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads of torch, FAISS and BLAS outside Dagster steps (steps use the "
                             "compute resource's `threads`); 0 = the cores this process may use")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="materialize the embedded demo pipeline and show the result")
    demo.add_argument("--force", action="store_true", help="redo every asset and shard")
    demo.set_defaults(func=cmd_demo)
    mat = sub.add_parser("materialize", help="materialize what is missing or unsynced in a pipeline")
    mat.add_argument("--pipeline", required=True)
    mat.add_argument("--force", action="store_true", help="redo every asset and shard")
    _size_option(mat)
    _slot_timeout_option(mat)
    mat.set_defaults(func=cmd_materialize)
    run = sub.add_parser("run", help="one command from your data to answers: write a pipeline entry, "
                                     "materialize it with progress, print the top documents of the first queries")
    run.add_argument("--model", help="local model directory or hub id (model_kwargs etc. in the written YAML); "
                                     "omitted: a small local model is made from the corpus (see `init`)")
    run.add_argument("--corpus", required=True, help="a jsonl/json/csv/parquet/txt file, a folder of them, a "
                                                      "save_to_disk folder or a hub dataset")
    run.add_argument("--queries", required=True, help="a file of queries (one per line for .txt)")
    run.add_argument("--name", help="pipeline name (default: from the corpus file name)")
    _column_options(run)
    run.add_argument("--prompt-column", help="queries: the prompt column (the loss covers the completion only)")
    run.add_argument("--completion-column", help="queries: the completion column")
    run.add_argument("--query-text-column", default="text", help="queries: the text column (without a prompt)")
    run.add_argument("--query-id-column", help="queries: a column of unique query ids")
    run.add_argument("--pipelines", help="the pipelines YAML to write the entry into (default "
                                         "$ATTRIBUTION_PIPELINES, else ./pipelines.yaml)")
    run.add_argument("--shard-size", type=int, help="documents per shard (default 1000)")
    run.add_argument("--projection-dim", type=int, help="gradients.projection_dim (default 32; 0 = full gradients)")
    run.add_argument("--vocab-size", type=int, default=1024, help="without --model: the tokenizer's vocabulary")
    run.add_argument("-k", type=int, default=5, help="documents shown per query")
    run.add_argument("--show", type=int, default=3, help="queries shown")
    run.add_argument("--force", action="store_true", help="redo every asset and shard")
    _size_option(run)
    run.set_defaults(func=cmd_run)
    init = sub.add_parser("init", help="make a small local model and tokenizer from your corpus (a first try "
                                       "on a laptop: random weights, a BPE tokenizer trained on the corpus)")
    init.add_argument("--corpus", required=True)
    init.add_argument("--out", required=True, help="directory to write (save_pretrained)")
    _column_options(init)
    init.add_argument("--vocab-size", type=int, default=1024)
    init.set_defaults(func=cmd_init)
    scores = sub.add_parser("scores", help="top-k training documents for one query, with text (DuckDB)")
    scores.add_argument("--pipeline", required=True)
    scores.add_argument("--query", required=True, help="query id (SELECT query_id FROM queries)")
    scores.add_argument("-k", type=int, default=10)
    scores.add_argument("--by", choices=["layer", "head"],
                        help="each layer's contribution to the top-k scores, or the top-k head blocks "
                             "(needs scoring.breakdown)")
    scores.set_defaults(func=cmd_scores)
    query = sub.add_parser("query", help="top-k training documents for a new text (reads stdin without TEXT)")
    query.add_argument("--pipeline", required=True)
    query.add_argument("text", nargs="?", help="query text; omit to read one query per line from stdin")
    query.add_argument("--completion", help="answer part: the loss covers only these tokens")
    query.add_argument("-k", type=int, default=10)
    query.add_argument("--no-index", action="store_true", help="brute force over the gradient stores")
    query.set_defaults(func=cmd_query)
    evaluate = sub.add_parser("evaluate", help="fact tracing vs baselines (and --lds: the LDS retrains)")
    evaluate.add_argument("--pipeline", required=True)
    evaluate.add_argument("--lds", action="store_true",
                          help="also retrain on every subset (demo only; slow: a `multiprocess` profile runs "
                               "`max_concurrent` retrains at once)")
    _slot_timeout_option(evaluate)
    evaluate.set_defaults(func=cmd_evaluate)
    explain = sub.add_parser("explain", help="one query's top-k documents, each token coloured by its "
                                             "share of the score (terminal; --html for a page)")
    explain.add_argument("--pipeline", required=True)
    explain.add_argument("--query", required=True, help="query id (SELECT query_id FROM queries)")
    explain.add_argument("-k", type=int, default=5)
    explain.add_argument("--html", help="also write a self-contained HTML heat map to this file")
    explain.set_defaults(func=cmd_explain)
    diag = sub.add_parser("diagnose", help="do per-example gradients change with batching or padding?")
    diag.add_argument("--model", required=True, help="local model directory or hub id")
    diag.add_argument("--threshold", type=float, default=0.999)
    diag.add_argument("--device", default="cpu")
    diag.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    diag.set_defaults(func=cmd_diagnose)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    for progress_bars in ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS"):
        os.environ.setdefault(progress_bars, "1")  # before the libraries read them; worker processes inherit
    if "datasets" in sys.modules:  # imported earlier in this process (a test, a notebook): it read the variable then
        sys.modules["datasets"].disable_progress_bars()
    args = build_parser().parse_args(argv)  # --help and usage errors exit here, before any heavy import
    if args.threads < 0:
        raise SystemExit(f"--threads must be >= 0 (0 = the cores this process may use), got {args.threads}.")
    signal.signal(signal.SIGTERM, interrupt)
    try:
        from .engine.progress import reporting, terminal_sink

        with reporting(terminal_sink()):
            return args.func(args)
    except KeyboardInterrupt:
        return interrupted()
    except Exception as exc:  # noqa: BLE001 - one message here, the traceback in the log file
        return report_error(exc, args)
    except BaseException as exc:  # a signal inside a Dagster step arrives as its own interrupt error
        if type(exc).__name__ != "DagsterExecutionInterruptedError":
            raise
        return interrupted()


if __name__ == "__main__":
    sys.exit(main())
