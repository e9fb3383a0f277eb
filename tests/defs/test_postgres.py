"""Postgres instance storage (``instance.storage: postgres``), against a real PostgreSQL server
started from Debian's ``postgresql`` package (``tests/services/postgres.py``): runs, events and
schedules go to dagster-postgres; a pipeline materialized on it gives the same bytes as on
SQLite, and its shard partitions and data versions live in the database. Bad ``instance``
sections name the key and the fix."""

import sys

import dagster as dg
import numpy as np
import pandas as pd
import pytest
import yaml
from dagster._core.storage.runs import SqliteRunStorage

from attribution_assets.defs.common import shards_partitions
from attribution_assets.defs.factory import build_definitions
from attribution_assets.defs.instance import persistent_instance, storage_settings
from attribution_assets.defs.planning import pipeline_stages
from attribution_assets.defs.profiles import ProfileError, profile_from_mapping
from attribution_assets.defs.runner import materialize_pipeline
from attribution_assets.engine.gradients.store import GradientStore
from attribution_assets.engine.io.paths import PipelinePaths
from tests.helpers import user_pipeline_spec
from tests.services import postgres as postgres_service

pytestmark = pytest.mark.slow  # runs first (tests/conftest.py)

postgres_server = postgres_service.postgres_server  # the fixture, for this module
PASSWORD_ENV = "ATTRIBUTION_TEST_PG_PASSWORD"


def _profile(root, server=None, db=None, **postgres):
    """An ``in_process`` profile with storage under ``root``; with ``server``, its instance in
    the database ``db`` there (``postgres``: keys that replace the connection settings)."""
    raw = {"storage": {"root": str(root)}, "compute": {"threads": 1}, "executor": {"kind": "in_process"}}
    if server is not None:
        settings = {"hostname": server.host, "port": server.port, "db_name": db or server.db,
                    "username": server.user, "password_env": PASSWORD_ENV, **postgres}
        raw["instance"] = {"storage": "postgres", "postgres": settings}
    return profile_from_mapping(raw, "test profile", "test")


def _needs_dagster_postgres():
    pytest.importorskip("dagster_postgres", reason="dagster-postgres is not installed: "
                        "`pip install -c constraints.txt '.[postgres]'`")


# --- validation (no server) ----------------------------------------------------------------

GOOD = {"hostname": "db.example.org", "db_name": "dagster", "username": "dagster", "password_env": "PG_PASSWORD"}


@pytest.mark.parametrize("instance, message", [
    ({"storage": "postgres"}, r"needs an `instance.postgres` mapping with `hostname`, `db_name`, `username`, "
                              r"`password_env`; e.g. `postgres: \{hostname: "),
    ({"storage": "postgres", "postgres": {**GOOD, "hostnme": "x"}},
     r"`hostnme` \(did you mean `hostname`\?\) in `instance.postgres`"),
    ({"storage": "postgres", "postgres": {k: v for k, v in GOOD.items() if k not in ("hostname", "db_name")}},
     r"`instance.postgres` lacks `hostname`, `db_name`"),
    ({"storage": "postgres", "postgres": {k: v for k, v in GOOD.items() if k != "password_env"}},
     r"lacks `password_env`"),
    ({"storage": "postgres", "postgres": {**GOOD, "password": "secret"}},
     r"`instance.postgres.password`: a profile never holds a password; set `password_env`"),
    ({"storage": "postgres", "postgres": {**GOOD, "password_env": "hunter 2"}},
     r"`instance.postgres.password_env` is the NAME of an environment variable"),
    ({"storage": "postgres", "postgres": {**GOOD, "port": "5432x"}}, r"`instance.postgres.port` must be an integer"),
    ({"storage": "postgres", "postgres": {**GOOD, "db_name": False}},
     r"`instance.postgres.db_name` must be a non-empty string, got False"),
    ({"storage": "postgres", "postgres": {**GOOD, "params": ["sslmode"]}}, r"`instance.postgres.params` must map"),
    ({"storage": "sqlite", "postgres": GOOD}, r"`instance.postgres` applies only with `instance.storage: postgres`"),
    ({"storage": "postgres", "postgress": GOOD}, r"`postgress` \(did you mean `postgres`\?\) in `instance`"),
])
def test_a_bad_postgres_section_names_the_key_and_the_fix(instance, message):
    with pytest.raises(ProfileError, match=message):
        profile_from_mapping({"instance": instance}, "p.yaml", "p")


def test_storage_settings_name_the_password_variable_never_the_password(monkeypatch):
    profile = profile_from_mapping({"instance": {"storage": "postgres", "postgres": {**GOOD, "port": 6543,
                                                                                     "params": {"sslmode": "require"}}}},
                                   "p.yaml", "p")
    monkeypatch.setenv("PG_PASSWORD", "s3cret")
    assert storage_settings(profile) == {"storage": {"postgres": {"postgres_db": {
        "username": "dagster", "password": {"env": "PG_PASSWORD"}, "hostname": "db.example.org",
        "db_name": "dagster", "port": 6543, "scheme": "postgresql+psycopg2",
        "params": {"sslmode": "require"}}}}}
    assert storage_settings(profile_from_mapping({"instance": {"storage": "sqlite"}}, "p.yaml", "p")) == {}
    assert storage_settings(profile_from_mapping({}, "p.yaml", "p")) == {}
    # the profile survives the trip to a worker process
    from attribution_assets.defs.profiles import profile_from_json

    assert profile_from_json(profile.to_json()).instance == profile.instance


def test_an_unset_password_variable_or_a_missing_dagster_postgres_stops_instance_creation(monkeypatch, tmp_path):
    profile = profile_from_mapping({"instance": {"storage": "postgres", "postgres": GOOD}}, "p.yaml", "p")
    monkeypatch.delenv("PG_PASSWORD", raising=False)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "elsewhere"))
    with pytest.raises(ProfileError, match=r"\$PG_PASSWORD .*unset or empty: `export PG_PASSWORD=\.\.\.`"):
        persistent_instance(tmp_path / "home", profile)
    assert not (tmp_path / "home" / "dagster.yaml").exists()
    monkeypatch.setenv("PG_PASSWORD", "s3cret")
    monkeypatch.setitem(sys.modules, "dagster_postgres", None)  # as if not installed
    with pytest.raises(ProfileError, match=r"needs dagster-postgres: `pip install -c constraints.txt '\.\[postgres\]'`"):
        storage_settings(profile)


# --- against a real server -------------------------------------------------------------------

@pytest.fixture(scope="module")
def postgres_and_sqlite(tmp_path_factory, tiny_model_dir, postgres_server):
    """The user pipeline (up to its score tables; the DuckDB stage adds nothing here) materialized
    on a Postgres instance and on a SQLite one, each made by ``persistent_instance``; yields the
    spec, the base directory, the database, the profiles and the Postgres instance."""
    _needs_dagster_postgres()
    base = tmp_path_factory.mktemp("postgres-pipeline")
    spec = user_pipeline_spec(base, tiny_model_dir)
    stages = [stage for stage in pipeline_stages(spec) if stage.name != "database"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(PASSWORD_ENV, postgres_server.password)
        patch.setenv("DAGSTER_HOME", str(base / "elsewhere"))  # restored after the module
        db = postgres_server.create_database("pipeline")
        profiles = {"postgres": _profile(base / "postgres", postgres_server, db), "sqlite": _profile(base / "sqlite")}
        instances = {}
        try:
            for name, profile in profiles.items():
                instances[name] = persistent_instance(base / f"{name}-home", profile)
                materialize_pipeline(build_definitions([spec], profile), spec, instances[name], stages=stages,
                                     log=lambda _: None, log_level="WARNING")
            assert isinstance(instances["sqlite"].run_storage, SqliteRunStorage)
            yield spec, base, db, profiles, stages, instances["postgres"]
        finally:
            for instance in instances.values():
                instance.dispose()


def test_a_postgres_profile_keeps_runs_events_and_schedules_in_postgres(postgres_and_sqlite, postgres_server):
    import dagster_postgres as dp

    spec, base, db, _, _, instance = postgres_and_sqlite
    server, home = postgres_server, base / "postgres-home"
    assert isinstance(instance.run_storage, dp.PostgresRunStorage)
    assert isinstance(instance.event_log_storage, dp.PostgresEventLogStorage)
    assert isinstance(instance.schedule_storage, dp.PostgresScheduleStorage)
    text = (home / "dagster.yaml").read_text()
    assert server.password not in text
    assert yaml.safe_load(text)["storage"]["postgres"]["postgres_db"]["password"] == {"env": PASSWORD_ENV}
    # the server wants the password over TCP (md5): Dagster read it from the variable
    assert instance.run_storage.postgres_url.startswith(f"postgresql+psycopg2://{server.user}:{server.password}@")
    # the pipeline's runs and events are rows in the database; the schedule tables exist and answer
    runs = instance.get_runs(filters=dg.RunsFilter(tags={"attribution/pipeline": spec.name}))
    assert runs and all(run.is_success for run in runs)
    assert server.psql("select count(*) from runs where status = 'SUCCESS'", db) == str(len(runs))
    assert int(server.psql("select count(*) from event_logs where dagster_event_type = 'ASSET_MATERIALIZATION'",
                           db)) >= 8
    assert server.psql("select to_regclass('instigators') is not null", db) == "t"
    assert instance.all_instigator_state() == []
    # nothing went to SQLite files under the home
    assert not list(home.rglob("*.db"))


def test_the_pipeline_on_postgres_gives_the_same_bytes_as_on_sqlite(postgres_and_sqlite):
    spec, base, *_ = postgres_and_sqlite
    pg, lite = (PipelinePaths.under(base / name, spec.name) for name in ("postgres", "sqlite"))
    shards = pg.gradient_shards()
    assert shards == lite.gradient_shards() == ["shard-00000", "shard-00001"]
    for shard in shards:
        a, b = GradientStore(pg.train_gradients(shard)), GradientStore(lite.train_gradients(shard))
        assert a.doc_ids == b.doc_ids
        assert np.array_equal(np.asarray(a.array), np.asarray(b.array))
        pd.testing.assert_frame_equal(pd.read_parquet(pg.scores(shard)), pd.read_parquet(lite.scores(shard)),
                                      check_exact=True)
    arrays = sorted(p.relative_to(pg.root) for p in pg.root.rglob("*") if p.suffix in (".npy", ".parquet"))
    assert len(arrays) > 2 * len(shards)
    for relative in arrays:  # every array and table, byte for byte
        assert (pg.root / relative).read_bytes() == (lite.root / relative).read_bytes(), relative


def test_shard_partitions_and_data_versions_live_in_postgres(postgres_and_sqlite, postgres_server):
    spec, base, db, profiles, stages, _ = postgres_and_sqlite
    name = shards_partitions(spec).name
    rows = postgres_server.psql(f"select partition from dynamic_partitions where partitions_def_name = '{name}' "
                                "order by partition", db)
    assert rows.split() == ["shard-00000", "shard-00001"]
    # a fresh instance from the same dagster.yaml (as the daemon or a run worker opens it) reads
    # partitions and data versions back from the database: every stage is up to date
    with dg.DagsterInstance.from_config(str(base / "postgres-home")) as instance:
        assert instance.get_dynamic_partitions(name) == ["shard-00000", "shard-00001"]
        messages = []
        results = materialize_pipeline(build_definitions([spec], profiles["postgres"]), spec, instance,
                                       stages=stages, log=messages.append, log_level="WARNING")
    assert results == []
    assert messages == [f"{spec.name} {stage}: up to date" for stage in ("prepare", "shards", "fan_in", "scores")]


def test_a_sqlite_profile_drops_the_postgres_storage_an_earlier_profile_wrote(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text(yaml.safe_dump({
        "storage": {"postgres": {"postgres_db": {"hostname": "db.example.org", "db_name": "dagster"}}},
        "run_launcher": {"module": "dagster_ray", "class": "RayRunLauncher", "config": {}},
        "code_servers": {"local_startup_timeout": 120}}))  # a setting of the user's own stays
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DAGSTER_HOME", str(tmp_path / "elsewhere"))
        instance = persistent_instance(home, _profile(tmp_path / "storage"))
        written = yaml.safe_load((home / "dagster.yaml").read_text())
        assert "storage" not in written and "run_launcher" not in written
        assert written["code_servers"] == {"local_startup_timeout": 120}
        assert isinstance(instance.run_storage, SqliteRunStorage)
        instance.dispose()
