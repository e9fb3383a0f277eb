"""The package's shape: the engine never imports Dagster, no import cycles, one layout owner."""

import ast
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "attribution_assets"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Module -> the project modules it imports (at any level of the file)."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        name = _module_name(path)
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                base = node.module
                for alias in node.names:
                    candidate = f"{base}.{alias.name}"
                    found.add(candidate if importlib.util.find_spec(base) and
                              (PACKAGE.parent / (candidate.replace(".", "/") + ".py")).exists() else base)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
        graph[name] = {m for m in found if m.startswith("attribution_assets")}
    return graph


def test_engine_never_imports_dagster():
    for path in (PACKAGE / "engine").rglob("*.py"):
        tree = ast.parse(path.read_text())
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not any(n.split(".")[0] in ("dagster", "dagster_pipes") for n in names), path


def test_definitions_load_without_the_trainer_stack():
    """The Trainer pulls in peft and bitsandbytes (seconds of imports and, on AVX-512 CPUs, a
    warning about 4-bit kernels); only the `finetune` step may load it."""
    heavy = ("transformers.trainer", "transformers.trainer_utils", "peft", "bitsandbytes")
    code = ("import sys, attribution_assets.cli, attribution_assets.defs.factory; "
            f"print([m for m in {heavy!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
    assert "gemm_4bit" not in out.stderr


def test_definitions_and_planning_load_without_the_compute_stack(tmp_path):
    """Every process that loads the definitions pays for their imports: the CLI, each queued run,
    code servers, the UI. torch, transformers, SciPy, FAISS, polars, DuckDB and datasets load in
    the steps and commands that compute, not with the definitions (an EK-FAC pipeline's too), the
    planner or the instance (``benchmarks/bench_cli.py`` times it)."""
    heavy = ("torch", "transformers", "scipy", "faiss", "polars", "duckdb", "datasets", "safetensors")
    code = ("import sys, dagster as dg, attribution_assets.definitions, attribution_assets.report\n"
            "from attribution_assets.cli import _defs_and_specs\n"
            "from attribution_assets.defs.planning import STAGES, plan_stage\n"
            "defs, specs = _defs_and_specs('demo')\n"
            "assert plan_stage(defs, specs['demo'], dg.DagsterInstance.ephemeral(), STAGES[0]).keys\n"
            "from attribution_assets.defs.factory import build_definitions\n"
            "from attribution_assets.spec import GradientSpec, ScoringSpec, demo_spec\n"
            "build_definitions([demo_spec(gradients=GradientSpec(normalizer='none'),\n"
            "                            scoring=ScoringSpec(preconditioner='ekfac'))])\n"
            f"print([m for m in {heavy!r} if m in sys.modules])")
    env = {k: v for k, v in os.environ.items() if k not in ("ATTRIBUTION_PIPELINES", "ATTRIBUTION_RECIPE")}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_no_module_imports_a_module_that_imports_it_back():
    graph = _imports()

    def reaches(start: str, target: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            node = todo.pop()
            for nxt in graph.get(node, ()):
                if nxt == target:
                    return True
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return False

    cycles = [(a, b) for a, deps in graph.items() for b in deps if b != a and reaches(b, a)]
    assert not cycles, cycles


def test_only_the_paths_module_joins_asset_directories():
    """No ``something / "<asset dir or file>"`` path join outside ``engine/io/paths.py``."""
    names = {"corpus", "query_set", "tokenizer", "tokenized_shards", "tokenized_queries",
             "train_gradients", "query_gradients", "shard_autocorr", "autocorrelation", "preconditioner",
             "faiss_index", "scores", "evaluation", "lds_retrain", "attribution.duckdb",
             "kfac_covariance", "kfac_factors", "kfac_eigendecomposition", "ekfac_correction",
             "ekfac_eigenvalues", "kfac_query_gradients",
             "documents.parquet", "queries.parquet", "tokens.parquet", "scores.parquet",
             "token_scores.parquet", "model.json"}
    owner = PACKAGE / "engine" / "io" / "paths.py"
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path == owner:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and \
                    isinstance(node.right, ast.Constant) and node.right.value in names:
                offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno}: / {node.right.value!r}")
    assert not offenders, offenders


def test_no_top_level_resources_package_is_installed(tmp_path):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the installed package only
    found = subprocess.run([sys.executable, "-c", "import resources"], cwd=tmp_path, env=env,
                           capture_output=True)
    assert found.returncode != 0, "`resources/` holds deployment profiles, not an importable package"
