"""Pipeline specs from YAML (spec.py)."""

import pytest
import yaml

from attribution_assets.spec import PipelineSpecError, configured_pipelines, load_pipeline_file


def _write(tmp_path, body):
    path = tmp_path / "pipelines.yaml"
    path.write_text(body if isinstance(body, str) else yaml.safe_dump(body))
    return path


def test_example_file_parses_and_resolves_relative_paths():
    (spec,) = load_pipeline_file("examples/pipelines.example.yaml")
    assert spec.name == "my_model" and spec.corpus.text_column == "text"
    assert spec.model.name_or_path.endswith("examples/models/my-tiny-lm")
    assert spec.queries.prompt_column == "prompt" and spec.gradients.projection_dim == 16


def test_env_var_adds_pipelines(tmp_path, monkeypatch):
    path = _write(tmp_path, {"pipelines": [{"name": "p1", "model": {"name_or_path": "org/model"},
                                            "corpus": {"path": "org/data"}}]})
    monkeypatch.setenv("ATTRIBUTION_PIPELINES", str(path))
    assert [s.name for s in configured_pipelines()] == ["demo", "p1"]


def test_config_hash_tracks_sections():
    (spec,) = load_pipeline_file("examples/pipelines.example.yaml")
    import dataclasses

    changed = dataclasses.replace(spec, gradients=dataclasses.replace(spec.gradients, projection_dim=32))
    assert spec.section_hash("gradients") != changed.section_hash("gradients")
    assert spec.section_hash("corpus") == changed.section_hash("corpus")


@pytest.mark.parametrize("body, message", [
    ("pipelines: [name: x", "not valid YAML"),
    ({"pipeline": []}, "top-level `pipelines:`"),
    ({"pipelines": [{"name": "bad-name", "model": {}, "corpus": {}}]}, "letters, digits and underscores"),
    ({"pipelines": [{"name": "p", "corpus": {"path": "x"}}]}, "missing `model`"),
    ({"pipelines": [{"name": "p", "model": {"name_or_path": "m"}, "corpus": {"path": "x", "txt": 1}}]},
     r"unknown key\(s\) \['txt'\]"),
    ({"pipelines": [{"name": "p", "model": {"name_or_path": "m"}, "corpus": {"path": "x"},
                     "scoring": {"metric": "dot"}}]}, "choose one of"),
    ({"pipelines": [{"name": "demo", "model": {"name_or_path": "m"}, "corpus": {"path": "x"}}]}, "reserved"),
])
def test_malformed_yaml_names_problem(tmp_path, body, message):
    with pytest.raises(PipelineSpecError, match=message):
        load_pipeline_file(_write(tmp_path, body))


def _with_index(index):
    return {"pipelines": [{"name": "p", "model": {"name_or_path": "m"}, "corpus": {"path": "x"},
                           "index": index}]}


def test_index_search_parameters_auto_or_integer(tmp_path):
    (spec,) = load_pipeline_file(_write(tmp_path, "pipelines:\n- {name: p, model: {name_or_path: m}, "
                                                  "corpus: {path: x}, index: {nprobe: auto, ef_search: 48}}\n"))
    assert (spec.index.nprobe, spec.index.ef_search, spec.index.target_recall) == ("auto", 48, 0.95)
    (spec,) = load_pipeline_file(_write(tmp_path, _with_index({"nprobe": 48, "target_recall": 0.99})))
    assert (spec.index.nprobe, spec.index.ef_search, spec.index.target_recall) == (48, "auto", 0.99)


@pytest.mark.parametrize("index, message", [
    ({"nprobe": "fast"}, r"invalid `index`: nprobe must be `auto` .* or an integer >= 1, got 'fast'"),
    ({"nprobe": 0}, r"nprobe must be `auto`"),
    ({"ef_search": 12.5}, r"ef_search must be `auto`"),
    ({"target_recall": 1.5}, r"invalid `index`: target_recall must be a number in \(0, 1\], e.g. 0.95, got 1.5"),
])
def test_bad_index_search_parameters_name_the_fix(tmp_path, index, message):
    with pytest.raises(PipelineSpecError, match=message):
        load_pipeline_file(_write(tmp_path, _with_index(index)))


def test_lds_top_k_from_yaml(tmp_path):
    body = {"pipelines": [{"name": "p", "model": {"name_or_path": "m"}, "corpus": {"path": "x"},
                           "evaluation": {"lds_top_k": [0, 50]}}]}
    (spec,) = load_pipeline_file(_write(tmp_path, body))
    assert spec.evaluation.lds_top_k == (0, 50)
    body["pipelines"][0]["evaluation"]["lds_top_k"] = [10, -1]
    with pytest.raises(PipelineSpecError, match=r"invalid `evaluation`: lds_top_k must be .* integers >= 0"):
        load_pipeline_file(_write(tmp_path, body))
