"""MAGIC against TrackStar and dot on a (reduced) demo, in the small-removal regime.

One deterministic training run (``engine.magic.training``) of the demo GPT-NeoX, MAGIC scores
(one reverse pass per query), dot and TrackStar (none) scores from the same final model
(``evaluation.methods``, the pipeline's projection), then ``K`` retrains with the SAME
loop, each removing ``--removal`` of the documents (loss weight 0), and the LDS of each method
against the retrains' query losses (``evaluation.lds``). Prints the cost of a MAGIC query next
to one training run and the LDS table; writes them under ``--out``.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/magic_lds.py --people 20 --queries 24
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import GPTNeoXForCausalLM  # noqa: E402

from attribution_assets.engine.demo.corpus import generate_demo_corpus  # noqa: E402
from attribution_assets.engine.demo.model import gpt_neox_config, train_demo_tokenizer  # noqa: E402
from attribution_assets.engine.evaluation import lds  # noqa: E402
from attribution_assets.engine.evaluation.methods import (  # noqa: E402
    DOT,
    GradientCache,
    method_scores,
    trackstar,
)
from attribution_assets.engine.io.data import TokenizedDoc  # noqa: E402
from attribution_assets.engine.magic.metagradients import magic_scores  # noqa: E402
from attribution_assets.engine.magic.training import Objective, TrainingRun, params_of  # noqa: E402
from attribution_assets.engine.runtime import peak_rss_mb, reset_peak_rss  # noqa: E402
from attribution_assets.spec import MagicSpec, demo_spec  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--people", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--queries", type=int, default=24, help="queries scored (evenly spaced)")
    parser.add_argument("--subsets", type=int, default=32)
    parser.add_argument("--removal", type=float, nargs="+", default=[0.03],
                        help="fractions of the corpus removed per subset (one LDS table each)")
    parser.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd"])
    parser.add_argument("--lr", type=float, default=None, help="default: the demo's")
    parser.add_argument("--eps", type=float, default=1e-8, help="AdamW epsilon")
    parser.add_argument("--checkpoint-every", type=int, default=25)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--out", default="magic_lds_out")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    spec = demo_spec(people=args.people, epochs=args.epochs, hidden=args.hidden,
                     magic=MagicSpec(enabled=True, optimizer=args.optimizer, dtype=args.dtype, lr=args.lr, eps=args.eps,
                                     checkpoint_every=args.checkpoint_every))
    magic = spec.magic.resolved(spec.demo)
    corpus = generate_demo_corpus(spec.demo)
    texts = [d["text"] for d in corpus.documents]
    tokenizer = train_demo_tokenizer(texts, spec.demo.vocab_size, spec.demo.max_position_embeddings)
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    docs = [TokenizedDoc(d["doc_id"], ids + [tokenizer.eos_token_id], [0] + [1] * len(ids), d["text"])
            for d, ids in zip(corpus.documents, encoded)]
    picks = np.linspace(0, len(corpus.queries) - 1, args.queries).round().astype(int)
    queries = []
    for q in (corpus.queries[i] for i in picks):
        prompt = tokenizer(q["prompt"], add_special_tokens=False)["input_ids"]
        answer = tokenizer(q["completion"], add_special_tokens=False)["input_ids"]
        queries.append(TokenizedDoc(q["query_id"], prompt + answer, [0] * len(prompt) + [1] * len(answer),
                                    q["text"]))
    dtype = getattr(torch, args.dtype)

    def model():
        torch.manual_seed(spec.demo.seed)
        return GPTNeoXForCausalLM(gpt_neox_config(spec.demo, tokenizer)).to(dtype)

    pairs = [(d.input_ids, d.loss_mask) for d in docs]
    pad = tokenizer.pad_token_id
    print(f"{len(docs)} documents, {len(queries)} queries, {sum(p.numel() for p in model().parameters())} "
          f"parameters, {args.dtype}, {magic.optimizer}", flush=True)
    with tempfile.TemporaryDirectory(dir=out) as scratch:
        run = TrainingRun(Objective(model(), pairs, pad), magic,
                          lambda step: Path(scratch) / f"step-{step:06d}.safetensors")
        reset_peak_rss()
        base_rss = peak_rss_mb()
        final, metrics = run.train()
        train_rss = peak_rss_mb()
        print(f"training: {run.total_steps} steps, {metrics['train_seconds']:.1f} s, peak RSS "
              f"{train_rss:.0f} MB", flush=True)
        reset_peak_rss()
        started = time.perf_counter()
        scores, stats = magic_scores(run, [(q.input_ids, q.loss_mask) for q in queries], final,
                                     log=lambda m: print(m, flush=True))
        magic_seconds = (time.perf_counter() - started) / len(queries)
        magic_rss = peak_rss_mb()
    trained = model()
    trained.load_state_dict(params_of(final))
    cache = GradientCache(trained, spec, None, docs, queries)
    methods = [DOT, trackstar("none")]
    all_scores = {"magic": scores} | method_scores(methods, cache, "completion")
    for name, matrix in all_scores.items():
        np.save(out / f"{name.replace(' ', '_')}.npy", matrix)

    cost = (f"* training run: {run.total_steps} steps in {metrics['train_seconds']:.1f} s, peak RSS "
            f"{train_rss:.0f} MB (process baseline {base_rss:.0f} MB)\n"
            f"* MAGIC: {magic_seconds:.1f} s per query ({magic_seconds / metrics['train_seconds']:.1f}x the "
            f"training run), peak RSS {magic_rss:.0f} MB, checkpoint every {magic.checkpoint_every} steps\n")
    print(cost, flush=True)
    report = [f"{len(docs)} documents, {len(queries)} queries, K = {args.subsets}\n", cost]
    for removal in args.removal:
        masks = lds.lds_subsets(len(docs), args.subsets, fraction=1 - removal, seed=1)
        losses = np.zeros((args.subsets, len(queries)))
        started = time.perf_counter()
        for k, keep in enumerate(masks):
            retrain = TrainingRun(Objective(model(), pairs, pad), magic,
                                  weights=torch.as_tensor(keep, dtype=dtype))
            state, _ = retrain.train()
            retrained = model()
            retrained.load_state_dict(params_of(state))
            losses[k] = lds.query_losses(retrained, queries, pad_id=pad)
        seconds = time.perf_counter() - started
        frame, markdown = lds.lds_table(all_scores, masks, losses, top_k=(0,), baseline="dot")
        frame.write_parquet(out / f"lds_removal_{removal}.parquet")
        np.save(out / f"losses_removal_{removal}.npy", losses)
        block = (f"\nRemoving {removal:.0%} of the documents ({int((~masks[0]).sum())}) per subset; "
                 f"{args.subsets} retrains in {seconds:.0f} s\n\n{markdown}")
        print(block, flush=True)
        report.append(block)
    (out / "report.md").write_text("\n".join(report))
    (out / "args.json").write_text(json.dumps(vars(args) | {"magic": dataclasses.asdict(magic)}, indent=1))


if __name__ == "__main__":
    main()
