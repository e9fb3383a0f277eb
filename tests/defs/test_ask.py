"""The Launchpad's ask job on the tiny demo: run config in, the top-k table and the heat map in
the step output's metadata; a malformed question fails the run with the fix in its message."""

import dagster as dg
import pytest

from attribution_assets.defs.ask import ask_job_name, ask_op_name
from attribution_assets.engine.search.attributor import Attributor
from tests.helpers import definitions_for


def _output_metadata(result) -> dict:
    (event,) = [e for e in result.all_node_events if e.event_type_value == "STEP_OUTPUT"]
    return event.event_specific_data.metadata


def test_ask_job_writes_the_top_k_table_and_heat_map(one_thread, tiny_demo):
    spec, paths = tiny_demo
    defs = definitions_for([spec], paths.root.parent)
    dg.Definitions.validate_loadable(defs)  # op and job names unique in the repository
    job = defs.resolve_job_def(ask_job_name(spec))
    question = {"prompt": "Mara Quill was born in", "completion": " Lisbon", "k": 3}
    result = job.execute_in_process(run_config={"ops": {ask_op_name(spec): {"config": question}}},
                                    instance=dg.DagsterInstance.ephemeral())
    assert result.success
    meta = _output_metadata(result)
    table = meta["top_k"].value
    hits = Attributor(spec, paths).search([("Mara Quill was born in", " Lisbon")], 3)[0]
    rows = [line for line in table.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [r.split("|")[4].strip(" `") for r in rows] == [h.doc_id for h in hits]
    assert f"{hits[0].score:+.4f}" in rows[0] and "answer **Lisbon**" in table
    assert meta["heat_map"].value.startswith("![") and "data:image/png;base64," in meta["heat_map"].value
    assert meta["best_score"].value == round(hits[0].score, 4)


def test_ask_job_refuses_a_question_without_prompt_or_query_id(tiny_demo):
    spec, paths = tiny_demo
    job = definitions_for([spec], paths.root.parent).resolve_job_def(ask_job_name(spec))
    with pytest.raises(ValueError, match="Give either `prompt`"):
        job.execute_in_process(run_config={"ops": {ask_op_name(spec): {"config": {"k": 3}}}},
                               instance=dg.DagsterInstance.ephemeral())
