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
"""

from __future__ import annotations

from pathlib import Path

from attribution_assets.engine.io.atomic import atomic_file
from attribution_assets.engine.io.paths import PipelinePaths

VIEWS = ("scores", "documents", "queries", "top_influences")


def _relative(path: Path, paths: PipelinePaths) -> str:
    """``path`` relative to the database's directory, quoted for SQL."""
    return str(Path(path).relative_to(paths.database.parent)).replace("'", "''")


def view_sql(paths: PipelinePaths, with_token_scores: bool = False) -> list[str]:
    """CREATE VIEW statements over one pipeline's Parquet files, with paths relative to the
    database file (resolved through DuckDB's ``file_search_path``, see :func:`connect`)."""
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
    if with_token_scores:
        token_scores = _relative(paths.token_scores_glob, paths)
        statements.append(f"CREATE OR REPLACE VIEW token_scores AS SELECT query_id, doc_id, shard, token, "
                          f"score FROM read_parquet('{token_scores}')")
    return statements


def build_database(paths: PipelinePaths, with_token_scores: bool = False) -> Path:
    """Write ``paths.database`` (atomically) holding the views; return its path."""
    import duckdb

    with atomic_file(paths.database) as tmp:
        tmp.unlink()
        with duckdb.connect(str(tmp)) as con:
            con.execute(f"SET file_search_path = '{_quoted(paths.database.parent)}'")
            for statement in view_sql(paths, with_token_scores):
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


TOP_K_SQL = """
SELECT t.rank, t.doc_id, t.source_doc_id, round(t.score, 4) AS score, t.text
FROM top_influences t
WHERE t.query_id = ? AND t.rank <= ?
ORDER BY t.rank
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


def view_columns(path: Path) -> dict[str, list[str]]:
    """Column names of each view (the score-table schema check)."""
    with connect(path) as con:
        return {view: [c[0] for c in con.execute(f"DESCRIBE {view}").fetchall()] for view in VIEWS}
