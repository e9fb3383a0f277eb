"""The one owner of the on-disk layout: ``<storage root>/<pipeline>/<asset>/<partition>/``.

Every asset, the Attributor, the DuckDB builder, the CLI and the benchmarks ask a
:class:`PipelinePaths` where a file lives; nothing else joins asset directory names.
Directories are written atomically (``engine.io.atomic``), so a path that exists is complete.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class PipelinePaths:
    """Where one pipeline's assets live under a storage root.

    ``root`` is the pipeline's own directory, ``<storage root>/<pipeline>``.
    """

    root: Path

    @classmethod
    def under(cls, storage_root: str | Path, pipeline: str) -> PipelinePaths:
        return cls(Path(storage_root).expanduser().resolve() / pipeline)

    # corpus and queries
    @property
    def documents(self) -> Path:
        """``corpus/documents.parquet``: ``doc_id, source_row, shard, content, text``."""
        return self.root / "corpus" / "documents.parquet"

    @property
    def queries(self) -> Path:
        """``query_set/queries.parquet``: ``doc_id (query id), source_row, content, text, gold_doc_ids``."""
        return self.root / "query_set" / "queries.parquet"

    # model
    @property
    def tokenizer(self) -> Path:
        """The demo's trained tokenizer directory."""
        return self.root / "tokenizer"

    @property
    def model(self) -> Path:
        """The demo's trained model directory (``save_pretrained`` + ``optimizer.pt``), and
        every pipeline's ``model.json`` record."""
        return self.root / "model"

    @property
    def model_record(self) -> Path:
        return self.model / "model.json"

    # tokens
    def tokens(self, shard: str) -> Path:
        return self.root / "tokenized_shards" / shard / "tokens.parquet"

    @property
    def tokens_glob(self) -> Path:
        return self.root / "tokenized_shards" / "*" / "tokens.parquet"

    def tokenized_shards(self) -> list[str]:
        """Shards whose token table exists, sorted."""
        return sorted(p.parent.name for p in self.root.glob("tokenized_shards/shard-*/tokens.parquet"))

    @property
    def query_tokens(self) -> Path:
        return self.root / "tokenized_queries" / "tokens.parquet"

    # gradients
    def train_gradients(self, shard: str) -> Path:
        """A gradient store directory (``gradients.npy`` + ``info.json``)."""
        return self.root / "train_gradients" / shard

    def gradient_shards(self) -> list[str]:
        """Shards whose training-gradient store exists, sorted."""
        base = self.root / "train_gradients"
        return sorted(p.name for p in base.glob("shard-*") if p.is_dir()) if base.is_dir() else []

    @property
    def query_gradients(self) -> Path:
        return self.root / "query_gradients"

    # fine-tuning (opt-in): the fine-tuned model and the train-time gradient shards
    @property
    def finetuned_model(self) -> Path:
        """``finetune/model``: ``save_pretrained`` output, tokenizer and ``optimizer.pt``."""
        return self.root / "finetune" / "model"

    @property
    def finetuned_optimizer(self) -> Path:
        """The fine-tuning optimizer's final state (``torch.optim`` state dict)."""
        return self.finetuned_model / "optimizer.pt"

    @property
    def finetune_record(self) -> Path:
        """``finetune/record.json``: fingerprint, steps, shards of the fine-tuning run."""
        return self.root / "finetune" / "record.json"

    @property
    def train_time_root(self) -> Path:
        return self.root / "finetune" / "gradients"

    def train_time_gradients(self, shard: str) -> Path:
        """A train-time gradient store (``steps_<first>-<last>``, ``engine.training.recorder``)."""
        return self.train_time_root / shard

    def train_time_shards(self) -> list[str]:
        """Train-time gradient stores that exist, in step order."""
        base = self.train_time_root
        return sorted(p.name for p in base.glob("steps_*") if p.is_dir()) if base.is_dir() else []

    # the demo model's own train-time rows (``demo.record_epochs``), written with the model
    @staticmethod
    def recorded_gradients(model_dir: str | Path) -> Path:
        """``<model dir>/train_time``: the train-time gradient stores (``steps_<first>-<last>``)
        the demo model's training recorded; the model's temporary directory while it is written."""
        return Path(model_dir) / "train_time"

    def demo_train_time_stores(self) -> list[Path]:
        """The demo model's train-time gradient stores that exist, in step order."""
        base = self.recorded_gradients(self.model)
        return sorted(p for p in base.glob("steps_*") if p.is_dir()) if base.is_dir() else []

    # preconditioning and search
    @property
    def autocorrelation(self) -> Path:
        return self.root / "autocorrelation"

    def shard_autocorr(self, shard: str) -> Path:
        """One shard's autocorrelation sums (``engine.preconditioning.autocorrelation.save_accumulator``)."""
        return self.root / "shard_autocorr" / shard

    @property
    def preconditioner(self) -> Path:
        return self.root / "preconditioner"

    # EK-FAC / K-FAC (``preconditioning.kfac``)
    def kfac_covariance(self, shard: str) -> Path:
        """One shard's activation and pseudo-gradient covariance sums (``covariance.*``)."""
        return self.root / "kfac_covariance" / shard

    @property
    def kfac_factors(self) -> Path:
        """Every shard's covariance sums added up (same format as one shard's)."""
        return self.root / "kfac_factors"

    @property
    def kfac_eigendecomposition(self) -> Path:
        """Eigenvalues and eigenvectors of the factors ``A`` and ``S`` per module."""
        return self.root / "kfac_eigendecomposition"

    def ekfac_correction(self, shard: str) -> Path:
        """One shard's eigenvalue-correction sums ``sum (Q_S^T G Q_A)^2`` (``correction.*``)."""
        return self.root / "ekfac_correction" / shard

    @property
    def ekfac_eigenvalues(self) -> Path:
        """Every shard's eigenvalue-correction sums added up (same format as one shard's)."""
        return self.root / "ekfac_eigenvalues"

    @property
    def kfac_query_gradients(self) -> Path:
        """A gradient store of the query rows preconditioned with EK-FAC / K-FAC, then projected."""
        return self.root / "kfac_query_gradients"

    @property
    def faiss_index(self) -> Path:
        return self.root / "faiss_index"

    # scores
    def scores(self, shard: str) -> Path:
        """``scores/<shard>/scores.parquet``: ``query_id, doc_id, shard, score``."""
        return self.root / "scores" / shard / "scores.parquet"

    def token_scores(self, shard: str) -> Path:
        """``scores/<shard>/token_scores.parquet``: ``query_id, doc_id, shard, token, score``."""
        return self.root / "scores" / shard / "token_scores.parquet"

    def block_scores(self, shard: str) -> Path:
        """``scores/<shard>/block_scores.parquet``: ``query_id, doc_id, shard, module, layer,
        head, kind, contribution`` (pipelines with ``scoring.breakdown``)."""
        return self.root / "scores" / shard / "block_scores.parquet"

    def score_histogram(self, shard: str) -> Path:
        """``scores/<shard>/score_histogram.png``: the shard's kept scores (asset metadata)."""
        return self.root / "scores" / shard / "score_histogram.png"

    @property
    def explanations(self) -> Path:
        """``scores/explanations.html``: per-token heat maps of a few sample queries."""
        return self.root / "scores" / "explanations.html"

    def figure(self, name: str) -> Path:
        """``figures/<name>.png``: a picture for an asset whose own directory is content-hashed
        (``preconditioner_spectrum``, ``index_recall``), kept outside it."""
        return self.root / "figures" / f"{name}.png"

    @property
    def scores_glob(self) -> Path:
        return self.scores("*")

    @property
    def token_scores_glob(self) -> Path:
        return self.token_scores("*")

    @property
    def block_scores_glob(self) -> Path:
        return self.block_scores("*")

    @property
    def database(self) -> Path:
        """``attribution.duckdb``: views over the Parquet files."""
        return self.root / "attribution.duckdb"

    # evaluation
    @property
    def evaluation(self) -> Path:
        """Tables (``<name>.parquet`` + ``<name>.md``) of the evaluation assets."""
        return self.root / "evaluation"

    @property
    def evaluation_scores(self) -> Path:
        """Fact-tracing score matrices ``<method>.npy [q, n]`` + ``doc_ids.json``, ``query_ids.json``."""
        return self.evaluation / "scores"

    def lds_retrain(self, partition: str) -> Path:
        return self.root / "lds_retrain" / partition

    # MAGIC (pipelines with ``magic.enabled``)
    @property
    def magic_training(self) -> Path:
        """The MAGIC training run: ``run.json`` and one ``step-NNNNNN/`` folder per checkpoint."""
        return self.root / "magic_training"

    @property
    def magic_run(self) -> Path:
        """``magic_training/run.json``: settings, documents digest, steps, checkpoint steps."""
        return self.magic_training / "run.json"

    def magic_checkpoint(self, step: int) -> Path:
        """``magic_training/step-NNNNNN/state.safetensors``: the state after ``step`` steps."""
        return self.magic_training / f"step-{step:06d}" / "state.safetensors"

    def magic_scores(self, batch: str) -> Path:
        """``magic_scores/<batch>/scores.parquet``: ``query_id, doc_id, shard, score``."""
        return self.root / "magic_scores" / batch / "scores.parquet"

    @property
    def magic_scores_glob(self) -> Path:
        return self.magic_scores("*")

    def magic_score_batches(self) -> list[str]:
        """Query batches whose MAGIC score table exists, sorted."""
        return sorted(p.parent.name for p in self.root.glob("magic_scores/batch-*/scores.parquet"))

