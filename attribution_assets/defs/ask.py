"""Ask from the UI: the job ``<pipeline>_ask``, launched from the Launchpad with a question as run
config, writes the question's top-k table and its heat map into the run's metadata (the step's
output, shown on the run page). Same code path as ``attribution query`` (the Attributor), with
each document's word shares (``engine.explain.ask``)::

    ops:
      demo__question:
        config: {prompt: "Q: Which company pays Pavel Pellegrini? A: Pavel Pellegrini is on the payroll of", completion: " Quantaro", k: 5}

or ``{query_id: demo-q-pavel-pellegrini-employer, k: 5}`` for one of the pipeline's queries.
"""

from typing import TYPE_CHECKING

import dagster as dg
from pydantic import Field

from attribution_assets.defs.common import Timer, key
from attribution_assets.defs.resources import ComputeResource, StorageResource
from attribution_assets.spec import PipelineSpec

if TYPE_CHECKING:
    from attribution_assets.engine.explain.tokens import Explanation

TEXT_CHARS = 120  # document text shown per row of the top-k table


class AskConfig(dg.Config):
    """One question: ``prompt`` (and ``completion``, the answer the loss covers) or ``query_id``."""

    prompt: str = Field(default="", description="the question's text, or its prompt when `completion` is set")
    completion: str = Field(default="", description="the answer part (the loss covers only these tokens)")
    query_id: str = Field(default="", description="instead of a prompt: one of the pipeline's query ids")
    k: int = Field(default=10, ge=1, le=100, description="documents to return")
    use_index: bool = Field(default=True, description="search the FAISS index when one is built")


def ask_job_name(spec: PipelineSpec) -> str:
    return f"{spec.name}_ask"


def ask_op_name(spec: PipelineSpec) -> str:
    """The job's one op, whose ``config`` the run config sets: unique per repository and named
    like the pipeline's asset ops (``<pipeline>__<name>``)."""
    return f"{spec.name}__question"


def _md(text: str) -> str:
    return "".join("\\" + ch if ch in "\\`*_[]<>#|~" else ch for ch in text).replace("\n", " ")


def top_k_markdown(expl: "Explanation") -> str:
    """The question, where its first gold document ranks, and its top-k documents as a table."""
    from attribution_assets.engine.explain.render import query_markdown

    lines = [query_markdown(expl), "", "| rank | score | gold | doc_id | document |", "|---:|---:|:---:|---|---|"]
    for doc in expl.documents:
        text = doc.text.replace("<|endoftext|>", "").strip()
        text = text if len(text) <= TEXT_CHARS else text[:TEXT_CHARS - 1] + "…"
        gold = {True: "✓", False: "", None: ""}[doc.gold]
        lines.append(f"| {doc.rank} | {doc.score:+.4f} | {gold} | `{doc.doc_id}` | {_md(text)} |")
    return "\n".join(lines)


def ask_jobs(spec: PipelineSpec, present: set[dg.AssetKey]) -> list[dg.JobDefinition]:
    """The pipeline's ask job, where it has score tables to search (``scores``)."""
    if key(spec, "scores") not in present:
        return []

    @dg.op(name=ask_op_name(spec), out=dg.Out(dg.Nothing), pool="gpu",  # it runs the model
           description="Top-k training documents of one question and their word shares (heat map).")
    def ask_op(context: dg.OpExecutionContext, config: AskConfig, storage: StorageResource,
               compute: ComputeResource):
        from attribution_assets.engine.explain import plots
        from attribution_assets.engine.explain.ask import ask
        from attribution_assets.engine.explain.render import explanation_markdown, gold_rank_line
        from attribution_assets.engine.search.attributor import Attributor

        timer = Timer()
        paths = storage.paths(spec)
        model, tokenizer = compute.load_model(spec, paths)
        attributor = Attributor(spec, paths, model, tokenizer, device=str(compute.torch_device()),
                                use_index=None if config.use_index else False)
        expl = ask(attributor, config.k, config.prompt, config.completion, config.query_id)
        figure = plots.explanation_picture(expl, paths.figure("ask_heat_map"))
        context.log.info(f"{expl.query_id}: {gold_rank_line(expl)}; best score {expl.documents[0].score:+.4f}")
        first = {"first_gold_rank": expl.first_gold[0]} if expl.first_gold else {}
        yield dg.Output(None, metadata={
            "top_k": dg.MetadataValue.md(top_k_markdown(expl)),
            "heat_map": dg.MetadataValue.md(plots.png_markdown(figure, "word shares of the top documents")),
            "word_shares": dg.MetadataValue.md(explanation_markdown([expl])),
            "best_score": round(expl.documents[0].score, 4), **first,
            "searched": "FAISS index" if attributor.index is not None else "gradient stores (brute force)",
            "seconds": timer.seconds})

    @dg.job(name=ask_job_name(spec),
            description=f"Ask {spec.name} from the Launchpad: run config `ops: {{{ask_op_name(spec)}: {{config: "
                        "{prompt, completion, k}}}}` (or `query_id`); the run's step output holds the "
                        "top-k table and the heat map.")
    def ask_job():
        ask_op()

    return [ask_job]
