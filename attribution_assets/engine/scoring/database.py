"""A DuckDB database of views over a pipeline's Parquet files.

The database holds only views, never copies: materializing more score partitions
never fights a DuckDB write lock, and the views see new partitions on the next
query because they glob the partition directories. View paths are relative to the
database file, so the storage folder can move: :func:`connect` (and the DuckDB shell
started in the pipeline's folder, or after ``SET file_search_path``) resolves them.

Views
-----
``scores(query_id, doc_id, shard, score)``
``token_scores(query_id, doc_id, shard, token, score)`` (only with per-token gradients)
``documents(doc_id, source_doc_id, shard, text)`` (a chunk ``{id}#{k}`` has ``source_doc_id = id``)
``queries(query_id, text, gold_doc_ids)``
``top_influences(query_id, rank, doc_id, source_doc_id, score, text)`` (rank 1 = highest score)
``magic_scores(query_id, doc_id, shard, score)`` and ``magic_top_influences`` (as
``top_influences``), when MAGIC score tables exist (pipelines with ``magic.enabled``)

With ``scoring.breakdown`` (``module`` or ``head``), over the block tables, whose rows are the
same (query, document) pairs as ``scores`` and whose contributions add up to each score:

``module_scores(query_id, doc_id, shard, module, layer, contribution)``
``layer_scores(query_id, doc_id, shard, layer, contribution)`` (layer null: modules outside layers)

and with ``breakdown: head``:

``head_scores(query_id, doc_id, shard, module, layer, head, kind, contribution)`` (every block:
a head of an attention projection, kind q/k/v/o; a module that is not split, head and kind null)
``top_heads(query_id, rank, module, layer, head, kind, contribution, share)``: per query, head
blocks ranked by their mean contribution over the query's ``TOP_HEADS_DOCS`` highest-scoring
documents; ``share`` = their summed contribution / those documents' summed score.
"""

from __future__ import annotations

from pathlib import Path

from attribution_assets.engine.io.atomic import atomic_file
from attribution_assets.engine.io.paths import PipelinePaths

BREAKDOWN_VIEWS = {"none": (), "module": ("module_scores", "layer_scores"),
                   "head": ("module_scores", "layer_scores", "head_scores", "top_heads")}
TOP_HEADS_DOCS = 10


def _relative(path: Path, paths: PipelinePaths) -> str:
    """``path`` relative to the database's directory, quoted for SQL."""
    return str(Path(path).relative_to(paths.database.parent)).replace("'", "''")


def view_sql(paths: PipelinePaths, with_token_scores: bool = False, breakdown: str = "none",
             magic: bool = False) -> list[str]:
    """CREATE VIEW statements over one pipeline's Parquet files (``breakdown``: the pipeline's
    ``scoring.breakdown``; ``magic``: with the MAGIC views), with paths relative to the database
    file (resolved through DuckDB's ``file_search_path``, see :func:`connect`)."""
    scores = _relative(paths.scores_glob, paths)
    tokens = _relative(paths.tokens_glob, paths)
    queries = _relative(paths.queries, paths)
    statements = [
        f"CREATE OR REPLACE VIEW scores AS SELECT query_id, doc_id, shard, score "
        f"FROM read_parquet('{scores}', union_by_name = true)",
        f"CREATE OR REPLACE VIEW documents AS SELECT doc_id, coalesce(source_doc_id, doc_id) AS "
        f"source_doc_id, shard, text FROM read_parquet('{tokens}', union_by_name = true)",
        f"CREATE OR REPLACE VIEW queries AS SELECT doc_id AS query_id, text, gold_doc_ids "
        f"FROM read_parquet('{queries}')",
        "CREATE OR REPLACE VIEW top_influences AS SELECT s.query_id, "
        "row_number() OVER (PARTITION BY s.query_id ORDER BY s.score DESC, s.doc_id) AS rank, "
        "s.doc_id, d.source_doc_id, s.score, d.text FROM scores s JOIN documents d USING (doc_id, shard)",
    ]
    if magic:
        statements += [
            f"CREATE OR REPLACE VIEW magic_scores AS SELECT query_id, doc_id, shard, score "
            f"FROM read_parquet('{_relative(paths.magic_scores_glob, paths)}')",
            "CREATE OR REPLACE VIEW magic_top_influences AS SELECT s.query_id, "
            "row_number() OVER (PARTITION BY s.query_id ORDER BY s.score DESC, s.doc_id) AS rank, "
            "s.doc_id, d.source_doc_id, s.score, d.text FROM magic_scores s JOIN documents d USING (doc_id, shard)",
        ]
    if with_token_scores:
        token_scores = _relative(paths.token_scores_glob, paths)
        statements.append(f"CREATE OR REPLACE VIEW token_scores AS SELECT query_id, doc_id, shard, token, "
                          f"score FROM read_parquet('{token_scores}')")
    if breakdown not in BREAKDOWN_VIEWS:
        raise ValueError(f"breakdown must be one of {sorted(BREAKDOWN_VIEWS)}, got {breakdown!r}")
    if breakdown != "none":
        blocks = (f"read_parquet('{_relative(paths.block_scores_glob, paths)}', union_by_name = true)")
        statements += [
            f"CREATE OR REPLACE VIEW module_scores AS SELECT query_id, doc_id, shard, module, "
            f"any_value(layer) AS layer, sum(contribution) AS contribution FROM {blocks} "
            f"GROUP BY query_id, doc_id, shard, module",
            f"CREATE OR REPLACE VIEW layer_scores AS SELECT query_id, doc_id, shard, layer, "
            f"sum(contribution) AS contribution FROM {blocks} GROUP BY query_id, doc_id, shard, layer",
        ]
    if breakdown == "head":
        blocks = _relative(paths.block_scores_glob, paths)
        statements += [
            f"CREATE OR REPLACE VIEW head_scores AS SELECT query_id, doc_id, shard, module, layer, head, "
            f"kind, contribution FROM read_parquet('{blocks}', union_by_name = true)",
            "CREATE OR REPLACE VIEW top_heads AS "
            "WITH ranked AS (SELECT query_id, doc_id, shard, score FROM scores "
            "QUALIFY row_number() OVER (PARTITION BY query_id ORDER BY score DESC, doc_id) "
            f"<= {TOP_HEADS_DOCS}), "
            "top_docs AS (SELECT query_id, doc_id, shard, "
            "sum(score) OVER (PARTITION BY query_id) AS total FROM ranked), "
            "per_head AS (SELECT h.query_id, h.module, h.layer, h.head, h.kind, "
            "avg(h.contribution) AS contribution, sum(h.contribution) / any_value(t.total) AS share "
            "FROM head_scores h JOIN top_docs t USING (query_id, doc_id, shard) "
            "WHERE h.head IS NOT NULL GROUP BY h.query_id, h.module, h.layer, h.head, h.kind) "
            "SELECT query_id, row_number() OVER (PARTITION BY query_id ORDER BY contribution DESC, "
            "module, head, kind) AS rank, module, layer, head, kind, contribution, share FROM per_head",
        ]
    return statements


def build_database(paths: PipelinePaths, with_token_scores: bool = False, breakdown: str = "none") -> Path:
    """Write ``paths.database`` (atomically) holding the views (the MAGIC views when MAGIC score
    tables exist); return its path."""
    import duckdb

    with atomic_file(paths.database) as tmp:
        tmp.unlink()
        with duckdb.connect(str(tmp)) as con:
            con.execute(f"SET file_search_path = '{_quoted(paths.database.parent)}'")
            for statement in view_sql(paths, with_token_scores, breakdown, bool(paths.magic_score_batches())):
                con.execute(statement)
    return paths.database


def _quoted(path: Path) -> str:
    return str(Path(path).resolve()).replace("'", "''")


def connect(path: Path, read_only: bool = True):
    """Open the pipeline database; many readers may hold it at once."""
    import duckdb

    if not Path(path).exists():
        raise FileNotFoundError(f"{path} does not exist; materialize the pipeline's `attribution_db` asset "
                                "(or run `attribution demo`).")
    con = duckdb.connect(str(path), read_only=read_only)
    con.execute(f"SET file_search_path = '{_quoted(Path(path).parent)}'")
    return con


#: One query's ``top_influences`` rows up to rank k, without ranking every query first: the query's
#: scores filtered, ordered as the view orders them and limited, then joined with ``documents``
#: (10M score rows: ~0.3 s against 1.2-1.5 s through the view, docs/performance.md "Scale curve").
TOP_K_SQL = """
WITH best AS (
    SELECT doc_id, shard, score FROM scores WHERE query_id = ? ORDER BY score DESC, doc_id LIMIT ?
)
SELECT row_number() OVER (ORDER BY b.score DESC, b.doc_id) AS rank, b.doc_id, d.source_doc_id,
       round(b.score, 4) AS score, d.text
FROM best b JOIN documents d USING (doc_id, shard)
ORDER BY rank
"""


def top_k(path: Path, query_id: str, k: int = 10) -> list[tuple]:
    """``(rank, doc_id, source_doc_id, score, text)`` of the ``k`` highest-scoring rows for ``query_id``."""
    with connect(path) as con:
        return con.execute(TOP_K_SQL, [query_id, k]).fetchall()


def query_text(path: Path, query_id: str) -> tuple[str, list[str]] | None:
    with connect(path) as con:
        row = con.execute("SELECT text, gold_doc_ids FROM queries WHERE query_id = ?", [query_id]).fetchone()
    return (row[0], list(row[1] or [])) if row else None


def first_gold_rank(path: Path, query_id: str) -> int | None:
    """Rank of the first gold document for ``query_id`` (None if no gold is ranked)."""
    sql = ("SELECT min(t.rank) FROM top_influences t JOIN queries q USING (query_id) "
           "WHERE t.query_id = ? AND list_contains(q.gold_doc_ids, t.source_doc_id)")
    with connect(path) as con:
        return con.execute(sql, [query_id]).fetchone()[0]


def views(path: Path) -> list[str]:
    """Names of the database's views."""
    with connect(path) as con:
        return [r[0] for r in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal "
                                          "ORDER BY view_name").fetchall()]


def breakdown_level(path: Path) -> str:
    """``head``, ``module`` or ``none``: which breakdown views the database holds."""
    present = set(views(path))
    return "head" if "head_scores" in present else "module" if "module_scores" in present else "none"


def view_columns(path: Path) -> dict[str, list[str]]:
    """Column names of each view (the score-table schema check)."""
    names = views(path)
    with connect(path) as con:
        return {view: [c[0] for c in con.execute(f"DESCRIBE {view}").fetchall()] for view in names}


LAYER_SQL = """
WITH top AS (SELECT rank, doc_id, score FROM top_influences WHERE query_id = ? AND rank <= ?)
SELECT t.rank, t.doc_id, t.score, l.layer, l.contribution
FROM top t JOIN layer_scores l ON l.query_id = ? AND l.doc_id = t.doc_id
ORDER BY t.rank, l.layer NULLS LAST
"""


def layer_breakdown(path: Path, query_id: str, k: int = 5) -> list[tuple]:
    """``(rank, doc_id, score, layer, contribution)`` per layer of the query's ``k`` best documents."""
    with connect(path) as con:
        return con.execute(LAYER_SQL, [query_id, k, query_id]).fetchall()


TOP_HEADS_SQL = """
SELECT rank, layer, kind, head, contribution, share, module
FROM top_heads WHERE query_id = ? AND rank <= ? ORDER BY rank
"""


def top_heads(path: Path, query_id: str, n: int = 10) -> list[tuple]:
    """``(rank, layer, kind, head, contribution, share, module)`` of the query's ``n`` top heads."""
    with connect(path) as con:
        return con.execute(TOP_HEADS_SQL, [query_id, n]).fetchall()


GOLD_LAYERS_SQL = """
SELECT l.layer, sum(l.contribution) AS contribution, count(DISTINCT l.doc_id) AS documents
FROM layer_scores l JOIN queries q USING (query_id)
WHERE l.query_id = ? AND list_contains(q.gold_doc_ids, l.doc_id)
GROUP BY l.layer ORDER BY l.layer NULLS LAST
"""


def gold_layer_breakdown(path: Path, query_id: str) -> list[tuple]:
    """``(layer, contribution, documents)``: each layer's summed contribution to the scores of
    the query's gold documents (those the tables keep)."""
    with connect(path) as con:
        return con.execute(GOLD_LAYERS_SQL, [query_id]).fetchall()
