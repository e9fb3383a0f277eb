"""Pipeline specs from YAML (spec/)."""

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
    assert spec.queries.prompt_column == "prompt" and spec.gradients.projection_dim == 32


def test_env_var_adds_pipelines(tmp_path, monkeypatch):
    path = _write(tmp_path, {"pipelines": [{"name": "p1", "model": {"name_or_path": "org/model"},
                                            "corpus": {"path": "org/data"}}]})
    monkeypatch.setenv("ATTRIBUTION_PIPELINES", str(path))
    assert [s.name for s in configured_pipelines()] == ["demo", "p1"]


def test_config_hash_tracks_sections():
    (spec,) = load_pipeline_file("examples/pipelines.example.yaml")
    import dataclasses

    changed = dataclasses.replace(spec, gradients=dataclasses.replace(spec.gradients, projection_dim=64))
    assert spec.section_hash("gradients") != changed.section_hash("gradients")
    assert spec.section_hash("corpus") == changed.section_hash("corpus")


def test_full_text_queries_are_those_without_a_prompt_or_conversation_split():
    """What TrackStar's auto mixing keys on (``scoring.mixing_components: auto``)."""
    import dataclasses

    (spec,) = load_pipeline_file("examples/pipelines.example.yaml")
    assert not spec.full_text_queries  # prompt/completion
    text = dataclasses.replace(spec, queries=dataclasses.replace(spec.queries, prompt_column=None,
                                                                 completion_column=None))
    chat = dataclasses.replace(text, queries=dataclasses.replace(text.queries, conversation_column="messages"))
    assert text.full_text_queries and not chat.full_text_queries
    assert not dataclasses.replace(spec, queries=None).full_text_queries


@pytest.mark.parametrize("body, message", [
    ("pipelines: [name: x", "not valid YAML"),
    ({"pipeline": []}, "top-level `pipelines:`"),
    ({"pipelines": [{"name": "bad-name", "model": {}, "corpus": {}}]}, "letters, digits and underscores"),
    ({"pipelines": [{"name": "p", "corpus": {"path": "x"}}]}, "missing `model`"),
    ({"pipelines": [{"name": "p", "model": {"name_or_path": "m"}, "corpus": {"path": "x", "txt": 1}}]},
     r"unknown key\(s\) `txt` in `corpus`; valid keys: add_eos"),
    ({"pipelines": [{"name": "p", "model": {"name_or_path": "m"}, "corpus": {"path": "x"},
                     "scoring": {"metric": "dot"}}]}, "choose one of"),
    ({"pipelines": [{"name": "demo", "model": {"name_or_path": "m"}, "corpus": {"path": "x"}}]}, "reserved"),
    ({"pipelines": [{"name": "p", "model": {"name_or_path": "m"}, "corpus": {"path": "x"},
                     "scoring": {"breakdown": "head"}}]}, r"`scoring.breakdown` is `head`.*`gradients.split: head`"),
    ({"pipelines": [{"name": "p", "model": {"name_or_path": "m"}, "corpus": {"path": "x"},
                     "gradients": {"split": "heads"}}]}, r"`gradients.split` is 'heads'.*\['module', 'head'\]"),
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
    ({"nprobe": "fast"}, r"`index.nprobe` must be an integer >= 1, or `auto` .*, got 'fast'"),
    ({"nprobe": 0}, r"`index.nprobe` must be an integer >= 1"),
    ({"ef_search": 12.5}, r"`index.ef_search` must be an integer >= 1, or `auto`"),
    ({"target_recall": 1.5}, r"`index.target_recall` must be a number in \(0.0, 1.0\], e.g. 0.95, got 1.5"),
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
    with pytest.raises(PipelineSpecError, match=r"`evaluation.lds_top_k` must be .* integers >= 0"):
        load_pipeline_file(_write(tmp_path, body))


def _with(section, values):
    return {"pipelines": [{"name": "p", "model": {"name_or_path": "m"}, "corpus": {"path": "x"},
                           section: values}]}


@pytest.mark.parametrize("section, values, message", [
    ("gradients", {"projection_dimm": 8}, r"`projection_dimm` \(did you mean `projection_dim`\?\)"),
    ("gradients", {"projection_dim": "16"}, r"`gradients.projection_dim` must be an integer >= 0 .* "
                                             r"\(a string\); write the number without quotes"),
    ("evaluation", {"lds_fraction": "0.5"}, r"got '0.5' \(a string\); write the number without quotes"),
    ("gradients", {"projection_dim": -4}, r"`gradients.projection_dim` must be an integer >= 0"),
    ("gradients", {"max_tokens_per_batch": 0}, r"`gradients.max_tokens_per_batch` must be an integer >= 1"),
    ("gradients", {"normalizer": "sgd"}, r"`gradients.normalizer` is 'sgd' .*; choose one of"),
    ("gradients", {"per_token": "tokens"}, r"`gradients.per_token` is 'tokens' .*; choose one of "
                                           r"\['none', 'positional', 'loss'\]"),
    ("corpus", {"path": "x", "max_length": -5}, r"`corpus.max_length` must be an integer >= 2"),
    ("corpus", {"path": "x", "missing_text": "drop"}, r"`corpus.missing_text` is 'drop' .*\['error', 'skip'\]"),
    ("scoring", {"top_k": -1}, r"`scoring.top_k` must be an integer >= 0"),
    ("scoring", {"damping": -0.1}, r"`scoring.damping` must be a number in \[0.0, inf\)"),
    ("scoring", {"mixing": "banana"}, r"`scoring.mixing` must be `auto`, `off` or a number in \[0, 1\]"),
    ("scoring", {"mixing": 1.5}, r"`scoring.mixing` must be"),
    ("scoring", {"precondition": "yes"}, r"`scoring.precondition` must be true or false"),
    ("scoring", {"preconditioner": "fisher"}, r"`scoring.preconditioner` is 'fisher' .*; choose one of"),
    ("scoring", {"preconditioner": "ekfac", "precondition": False}, r"`scoring.precondition` is false but"),
    ("scoring", {"kfac_labels": "model"}, r"`scoring.kfac_labels` is 'model' .*\['sampled', 'true'\]"),
    ("index", {"use_gpu": "maybe"}, r"`index.use_gpu` must be `auto`, true or false"),
    ("evaluation", {"lds_fraction": 0}, r"`evaluation.lds_fraction` must be a number in \(0.0, 1.0\) \(the share"),
    ("evaluation", {"lds_fraction": 1.0}, r"`evaluation.lds_fraction` must be a number in \(0.0, 1.0\) .*, got 1.0"),
])
def test_every_bad_value_is_refused_at_load_time_with_key_and_range(tmp_path, section, values, message):
    body = _with(section, values)
    if section == "corpus":
        body["pipelines"][0]["corpus"] = values
    with pytest.raises(PipelineSpecError, match=message):
        load_pipeline_file(_write(tmp_path, body))


def test_a_word_where_a_number_belongs_gets_no_unquoting_hint(tmp_path):
    for section, values in (("gradients", {"projection_dim": "lots"}), ("gradients", {"projection_dim": "0.5"}),
                            ("evaluation", {"lds_fraction": "nan"})):
        with pytest.raises(PipelineSpecError, match=r"got '\w+(\.\d)?' \(a string\)\.") as failure:
            load_pipeline_file(_write(tmp_path, _with(section, values)))
        assert "without quotes" not in str(failure.value)
    with pytest.raises(PipelineSpecError, match=r"`scoring.mixing` .* got '0.5' \(a string\); write the number"):
        load_pipeline_file(_write(tmp_path, _with("scoring", {"mixing": "0.5"})))


def test_unknown_pipeline_key_suggests_the_nearest(tmp_path):
    body = _with("scoring", {})
    body["pipelines"][0]["shard_sise"] = 10
    with pytest.raises(PipelineSpecError, match=r"`shard_sise` \(did you mean `shard_size`\?\)"):
        load_pipeline_file(_write(tmp_path, body))
    body["pipelines"][0].pop("shard_sise")
    body["pipelines"][0]["shard_size"] = "10"
    with pytest.raises(PipelineSpecError, match=r"`shard_size` must be an integer >= 1"):
        load_pipeline_file(_write(tmp_path, body))


def test_kronecker_preconditioners_refuse_optimizer_normalization_and_take_biases(tmp_path):
    body = _with("scoring", {"preconditioner": "ekfac"})
    (spec,) = load_pipeline_file(_write(tmp_path, body))
    assert spec.scoring.kronecker and spec.gradients.normalizer == "none"
    body["pipelines"][0]["gradients"] = {"normalizer": "adafactor"}
    with pytest.raises(PipelineSpecError, match=r"`gradients.normalizer` must be `none` with "
                                                r"`scoring.preconditioner: ekfac`"):
        load_pipeline_file(_write(tmp_path, body))
    body["pipelines"][0]["gradients"] = {"include_bias": True}  # a ones column joins each module's block
    (spec,) = load_pipeline_file(_write(tmp_path, body))
    assert spec.gradients.include_bias


def test_projected_kronecker_preconditioners_refuse_head_blocks(tmp_path):
    body = _with("scoring", {"preconditioner": "kfac"})
    body["pipelines"][0]["gradients"] = {"split": "head"}
    with pytest.raises(PipelineSpecError, match=r"`gradients.split` is `head`, but `scoring.preconditioner: kfac` "
                                                r"with `kfac_space: projected` .* set `scoring.kfac_space: full`"):
        load_pipeline_file(_write(tmp_path, body))
    body["pipelines"][0]["scoring"]["kfac_space"] = "full"
    (spec,) = load_pipeline_file(_write(tmp_path, body))
    assert spec.gradients.split == "head" and spec.scoring.kfac_space == "full"
    body["pipelines"][0]["scoring"]["kfac_space"] = "projected"
    body["pipelines"][0]["gradients"]["projection_dim"] = 0  # unprojected: the full space itself
    (spec,) = load_pipeline_file(_write(tmp_path, body))
    assert spec.gradients.projection_dim == 0


def test_precondition_is_the_older_spelling_of_preconditioner_none():
    from attribution_assets.spec import ScoringSpec

    assert ScoringSpec(precondition=False) == ScoringSpec(preconditioner="none")
    assert ScoringSpec().preconditioner == "trackstar" and ScoringSpec().precondition
    assert ScoringSpec(preconditioner="kfac").kronecker and not ScoringSpec().kronecker


def test_yaml_booleans_in_string_settings(tmp_path):
    (spec,) = load_pipeline_file(_write(tmp_path, "pipelines:\n- {name: p, model: {name_or_path: m}, "
                                                  "corpus: {path: x}, scoring: {mixing: off}, "
                                                  "index: {use_gpu: false}}\n"))
    assert spec.scoring.mixing == "off" and spec.index.use_gpu is False


def test_max_length_beyond_the_models_positions_is_refused(tmp_path, tiny_model_dir):
    body = {"pipelines": [{"name": "p", "model": {"name_or_path": str(tiny_model_dir)},
                           "corpus": {"path": "x", "max_length": 128}, "queries": {"path": "q", "max_length": 4096}}]}
    with pytest.raises(PipelineSpecError, match=r"`queries.max_length` is 4096, beyond the model's 128 positions"):
        load_pipeline_file(_write(tmp_path, body))


def test_projection_dim_beyond_every_module_of_the_model_is_refused(tmp_path, tiny_model_dir):
    """The tiny GPT-NeoX (hidden 32, MLP 64, fused q/k/v 96 x 32): its largest module dimension is 96."""
    def body(p):
        return {"pipelines": [{"name": "p", "model": {"name_or_path": str(tiny_model_dir)},
                               "corpus": {"path": "x", "max_length": 128}, "gradients": {"projection_dim": p}}]}

    with pytest.raises(PipelineSpecError, match=r"`gradients.projection_dim` is 100000, larger than any module of "
                                                r"the model \(its largest dimension is at most 96"):
        load_pipeline_file(_write(tmp_path, body(100000)))
    assert [s.gradients.projection_dim for s in load_pipeline_file(_write(tmp_path, body(96)))] == [96]
    assert [s.gradients.projection_dim for s in load_pipeline_file(_write(tmp_path, body(0)))] == [0]


def test_one_invalid_pipeline_does_not_hide_the_others(tmp_path, monkeypatch):
    body = {"pipelines": [{"name": "good", "model": {"name_or_path": "m"}, "corpus": {"path": "x"}},
                          {"name": "bad", "model": {"name_or_path": "m"}, "corpus": {"path": "x"},
                           "gradients": {"projection_dim": -1}}]}
    monkeypatch.setenv("ATTRIBUTION_PIPELINES", str(_write(tmp_path, body)))
    errors = []
    assert [s.name for s in configured_pipelines(errors)] == ["demo", "good"]
    assert len(errors) == 1 and "pipeline 'bad'" in errors[0] and "projection_dim" in errors[0]
    with pytest.raises(PipelineSpecError, match="projection_dim"):
        configured_pipelines()


def test_per_token_modes_and_the_old_boolean(tmp_path):
    """`per_token: true` keeps its old meaning (per-target-loss rows); `false` is `none`."""
    for value, mode in (("true", "loss"), ("false", "none"), ("positional", "positional"), ("loss", "loss")):
        (spec,) = load_pipeline_file(_write(tmp_path, "pipelines:\n- {name: p, model: {name_or_path: m}, "
                                                      f"corpus: {{path: x}}, gradients: {{per_token: {value}}}}}\n"))
        assert spec.gradients.per_token == mode and spec.gradients.token_rows == (mode != "none")
