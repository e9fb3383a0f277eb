#!/usr/bin/env bash
# GPU checks in under 6 minutes: the collection benchmark on CUDA (float32 and bfloat16), the
# collector's exactness tests on CUDA, `diagnose` (bfloat16 vs float32, TF32 rungs), a
# FAISS GPU index against the CPU one, and the torchrun group's NCCL path with FSDP2 (one rank
# per GPU, at most 2; with one GPU, FSDP2 over a world of 1). Run from anywhere:
#
#     benchmarks/gpu_check.sh            # PYTHON=.venv/bin/python by default
#
# Exits 2 with a message, running nothing, where CUDA is not available.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: CUDA is not available here (torch.cuda.is_available() is False); no GPU check ran." >&2
    exit 2
fi
"$PY" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, '|', torch.cuda.get_device_name(0))"

echo; echo "== 1. collection benchmark on CUDA (float32, then bfloat16 weights) =="
timeout 90 "$PY" benchmarks/bench_collect.py --device cuda --sizes 2x128 4x256 --docs 64 --max-tokens-per-batch 4096
timeout 60 "$PY" benchmarks/bench_collect.py --device cuda --dtype bfloat16 --sizes 4x256 --docs 64 \
    --max-tokens-per-batch 4096

echo; echo "== 2. exactness tests on CUDA (rows vs autograd: documents, positional, per-target loss) =="
ATTRIBUTION_TEST_DEVICE=cuda timeout 90 "$PY" -m pytest -q -p no:cacheprovider tests/engine/gradients/test_collector.py

echo; echo "== 3. diagnose on CUDA: bfloat16 vs float32, then every rung (math attention, float32, TF32 off) =="
timeout 60 "$PY" - <<'EOF'
import tempfile
from pathlib import Path

from attribution_assets.engine.evaluation.diagnose import diagnose, format_report
from tests.helpers import SENTENCES, save_tiny_model, train_tiny_tokenizer

with tempfile.TemporaryDirectory() as tmp:
    save_tiny_model(Path(tmp), train_tiny_tokenizer(SENTENCES * 3))
    # threshold above 1: no rung passes, so every rung runs and its error is on record
    print(format_report(diagnose(tmp, device="cuda", dtype="bfloat16", n_docs=8, length=32, threshold=1.1)))
EOF

echo "== 4. FAISS on the GPU vs the CPU (Flat, inner product) =="
timeout 60 "$PY" - <<'EOF'
import tempfile

import faiss
import numpy as np

from attribution_assets.engine.search.build import build_index
from attribution_assets.engine.search.index import FaissIndex
from attribution_assets.spec import IndexSpec

if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
    print("skipped: this FAISS build has no GPU support (faiss-cpu); install faiss-gpu to check it")
else:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20000, 256)).astype(np.float32)
    ids = [str(i) for i in range(len(x))]
    found = {}
    with tempfile.TemporaryDirectory() as tmp:
        for gpu in (True, False):
            info = build_index(lambda: [(ids, x)], IndexSpec(factory="Flat", use_gpu=gpu), f"{tmp}/{gpu}")
            found[gpu] = FaissIndex.load(f"{tmp}/{gpu}").search(x[:100], 10)[0]
            print(f"use_gpu={gpu}: built on {'GPU' if info.gpu else 'CPU'} in {info.build_seconds:.2f} s")
    same = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found[True], found[False])])
    print(f"top-10 overlap GPU vs CPU: {same:.4f}")
    assert same > 0.99, "GPU and CPU indexes disagree"
EOF
echo; echo "== 5. torchrun group on NCCL: 1 rank vs FSDP2 ranks (meta-device load, sharded reads), same rows =="
RANKS=$("$PY" -c "import torch; print(min(2, torch.cuda.device_count()))")
timeout 240 "$PY" benchmarks/bench_fsdp.py --device cuda --ranks "$RANKS" --hidden 256 --layers 4 --shards 2 \
    --docs-per-shard 8 --length 64 --batch-tokens 128 --max-row-diff 1e-4
echo "gpu_check: done"
