"""LDS metrics on hand-computed arrays, and a tiny retraining run end to end."""

import json

import numpy as np
import pytest

from attribution_assets.engine.demo.corpus import generate_demo_corpus
from attribution_assets.engine.demo.model import train_demo_tokenizer
from attribution_assets.engine.evaluation import lds
from attribution_assets.engine.io.data import TokenizedDoc
from attribution_assets.spec import DemoSpec

TINY = DemoSpec(layers=2, hidden=32, heads=2, intermediate=64, epochs=6, batch_size=16,
                       warmup_steps=5, lr=1e-2, log_every=1000)


pytestmark = pytest.mark.usefixtures("one_thread")


def test_subsets_deterministic_and_sized():
    masks = lds.lds_subsets(10, 4, 0.5, seed=3)
    assert masks.shape == (4, 10) and masks.dtype == bool
    assert (masks.sum(axis=1) == 5).all()
    assert (masks == lds.lds_subsets(10, 4, 0.5, seed=3)).all()
    assert not (masks == lds.lds_subsets(10, 4, 0.5, seed=4)).all()
    with pytest.raises(ValueError):
        lds.lds_subsets(10, 4, 1.0)


def test_retrain_seeds():
    assert lds.retrain_seeds(3, "init_and_data_order") == {"seed a": (3, 3), "seed b": (4, 4)}
    assert lds.retrain_seeds(3, "data_order") == {"seed a": (3, 3), "seed b": (3, 4)}
    with pytest.raises(ValueError, match="seed_b_varies"):
        lds.retrain_seeds(3, "init")


def test_lds_sign_and_hand_example():
    # one query, three documents; doc 0 helps (score 2), doc 2 hurts (score -1)
    scores = np.array([[2.0, 0.0, -1.0]])
    masks = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1]], dtype=bool)
    # predicted effect per subset: 2, 0, -1, 1 -> ranks 4, 2, 1, 3
    consistent = np.array([[1.0], [3.0], [4.0], [2.0]])  # keeping helpful docs lowers the loss
    assert lds.linear_datamodeling_score(scores, masks, consistent)[0] == pytest.approx(1.0)
    assert lds.linear_datamodeling_score(scores, masks, -consistent)[0] == pytest.approx(-1.0)
    # one swapped pair of ranks: rho = 1 - 6 * 2 / (4 * 15) = 0.8
    swapped = np.array([[1.0], [4.0], [3.0], [2.0]])
    assert lds.linear_datamodeling_score(scores, masks, swapped)[0] == pytest.approx(0.8)
    with pytest.raises(ValueError):
        lds.linear_datamodeling_score(scores, masks, consistent.T)


def test_spearman_constant_is_nan_and_noise_ceiling():
    x = np.array([[1.0, 5.0], [2.0, 5.0], [3.0, 5.0]])
    rho = lds.per_query_spearman(x, x)
    assert rho[0] == pytest.approx(1.0) and np.isnan(rho[1])
    assert lds.noise_ceiling(x, x) == pytest.approx(1.0)  # NaN queries are left out
    assert lds.noise_ceiling(x[:, :1], -x[:, :1]) == 0.0  # negative agreement: no signal
    # agreement 0.25 (mean of 1 and -0.5) -> ceiling 0.5
    a = np.array([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])
    b = np.array([[1.0, 2.0], [2.0, 3.0], [3.0, 1.0]])
    assert lds.seed_agreement(a, b) == pytest.approx([1.0, -0.5])
    assert lds.noise_ceiling(a, b) == pytest.approx(0.5)


def test_noise_ceiling_bounds_the_systematic_predictor():
    """loss = systematic + seed noise with reliability r: the exact systematic effect
    correlates with one seed's loss at about sqrt(r), the ceiling."""
    rng = np.random.default_rng(0)
    systematic = rng.normal(size=(400, 300))
    losses_a, losses_b = (systematic + rng.normal(size=systematic.shape) for _ in range(2))
    assert lds.noise_ceiling(losses_a, losses_b) == pytest.approx(np.sqrt(0.5), abs=0.03)
    oracle = np.nanmean(lds.per_query_spearman(systematic, losses_a))
    assert oracle == pytest.approx(lds.noise_ceiling(losses_a, losses_b), abs=0.03)
    # against the mean of the two seeds the noise variance halves: corr 1/sqrt(1.5) = 0.816
    agreement = np.nanmean(lds.seed_agreement(losses_a, losses_b))
    oracle_mean = np.nanmean(lds.per_query_spearman(systematic, (losses_a + losses_b) / 2))
    assert oracle_mean == pytest.approx(np.sqrt(1 / 1.5), abs=0.03)
    assert oracle_mean == pytest.approx(lds.mean_noise_ceiling(agreement), abs=0.03)
    assert lds.mean_noise_ceiling(-0.1) == 0.0 and lds.mean_noise_ceiling(1.0, seeds=3) == pytest.approx(1.0)


def test_keep_top_k_and_gold_indicator():
    scores = np.array([[0.1, 0.5, -0.2, 0.3], [1.0, 2.0, 3.0, 4.0]])
    assert (lds.keep_top_k(scores, 2) == [[0.0, 0.5, 0.0, 0.3], [0.0, 0.0, 3.0, 4.0]]).all()
    assert (lds.keep_top_k(scores, 0) == scores).all() and (lds.keep_top_k(scores, 9) == scores).all()
    ties = np.array([[1.0, 1.0, 1.0, 0.5]])
    assert (lds.keep_top_k(ties, 2) == [[1.0, 1.0, 0.0, 0.0]]).all()  # ties go to the lower index
    with pytest.raises(ValueError, match="top_k must be an integer >= 0"):
        lds.keep_top_k(scores, -1)
    gold = lds.gold_indicator(["q1", "q2", "q3"], ["a", "b", "c"], {"q1": ["c", "a"], "q2": ["x"]})
    assert (gold == [[1, 0, 1], [0, 0, 0], [0, 0, 0]]).all()


def test_top_k_drops_noise_from_the_predicted_effect():
    # doc 0 drives the loss; docs 1..3 carry small scores unrelated to the loss
    scores = np.array([[1.0, 0.4, -0.4, 0.4]])
    masks = np.array([[1, 1, 0, 0], [1, 0, 1, 0], [0, 1, 0, 1], [0, 0, 1, 1]], dtype=bool)
    losses = np.array([[1.0], [1.1], [2.0], [2.1]])  # low exactly when doc 0 is kept
    # all scores: predicted 1.4, 0.6, 0.8, 0.0 -> ranks 4, 2, 3, 1 vs -loss ranks 4, 3, 2, 1
    assert lds.linear_datamodeling_score(scores, masks, losses)[0] == pytest.approx(0.8)
    # top 1: predicted 1, 1, 0, 0 -> ties; rho = corr of ranks (3.5, 3.5, 1.5, 1.5) and (4, 3, 2, 1)
    assert lds.linear_datamodeling_score(scores, masks, losses, top_k=1)[0] == pytest.approx(
        np.corrcoef([3.5, 3.5, 1.5, 1.5], [4, 3, 2, 1])[0, 1])


def test_bootstrap_ci():
    assert lds.bootstrap_ci(np.full(5, 0.3)) == pytest.approx((0.3, 0.3, 0.3))
    values = np.array([0.0, 1.0, np.nan] * 20)
    mean, lo, hi = lds.bootstrap_ci(values, n=500, seed=1)
    assert mean == pytest.approx(0.5) and lo < 0.5 < hi and hi - lo < 0.5
    assert (mean, lo, hi) == lds.bootstrap_ci(values, n=500, seed=1)
    assert np.isnan(lds.bootstrap_ci(np.array([np.nan]))[0])


def test_lds_table_columns():
    rng = np.random.default_rng(0)
    masks = lds.lds_subsets(6, 5, 0.5, 0)
    losses, losses_b = rng.random((5, 2)), rng.random((5, 2))
    scores = {"a": rng.random((2, 6)), "dot": rng.random((2, 6))}
    frame, markdown = lds.lds_table(scores, masks, losses, losses_b, top_k=(0, 2),
                                    references={"gold": np.eye(2, 6)}, baseline="dot")
    assert frame.columns == lds.COLUMNS + ["subsets"]
    seed_a = frame.filter(frame["target"] == "seed a")
    assert seed_a["method"].to_list() == ["a", "a", "dot", "dot", "gold"]
    assert seed_a["scores"].to_list() == ["all", "top 2", "all", "top 2", "all"]
    assert frame.filter(frame["target"] == "seed b").height == 5
    mean_target = frame.filter((frame["method"] == "a") & (frame["scores"] == "all")
                               & (frame["target"] == "mean of seeds"))
    averaged = lds.linear_datamodeling_score(scores["a"], masks, (losses + losses_b) / 2)
    assert mean_target["lds"][0] == pytest.approx(np.nanmean(averaged))
    expected = lds.linear_datamodeling_score(scores["a"], masks, losses_b, top_k=2)
    row = frame.filter((frame["method"] == "a") & (frame["scores"] == "top 2") & (frame["target"] == "seed b"))
    assert row["lds"][0] == pytest.approx(np.nanmean(expected))
    dot_rows = frame.filter(frame["method"] == "dot")
    assert np.allclose(dot_rows["ratio"].to_numpy(), 1.0)  # the baseline against itself
    noise = frame.filter(frame["target"] == "-")
    assert noise["method"].to_list() == ["seed agreement (seed a vs b)", "noise ceiling (sqrt of agreement)",
                                         "noise ceiling, mean of seeds (Spearman-Brown)"]
    agreement = np.nanmean(lds.seed_agreement(losses, losses_b))
    assert noise["lds"].to_list() == pytest.approx([agreement, np.sqrt(max(agreement, 0)),
                                                    lds.mean_noise_ceiling(agreement)])
    assert "| method | all scores | top 2 |" in markdown and "Ratio to dot" in markdown
    assert "against the mean loss of both seeds' retrains" in markdown
    with pytest.raises(ValueError, match="top_k"):
        lds.lds_table(scores, masks, losses, top_k=(-1,))
    with pytest.raises(ValueError, match="baseline 'bm25'"):
        lds.lds_table(scores, masks, losses, baseline="bm25")


def test_ratio_ci_paired_bootstrap():
    values, baseline = np.array([0.2, 0.4, np.nan, 0.6]), np.array([0.1, 0.2, 0.3, 0.3])
    ratio, lo, hi = lds.ratio_ci(values, baseline, n=500)
    assert ratio == pytest.approx(1.2 / 0.6)  # the NaN query is dropped from both
    assert lo <= ratio <= hi
    same, lo, hi = lds.ratio_ci(2 * baseline, baseline, n=200)
    assert (same, lo, hi) == pytest.approx((2.0, 2.0, 2.0))  # paired: every resample gives 2


def test_partition_losses_must_share_the_queries(tmp_path):
    for name, ids in (("p0", ["q1", "q2"]), ("p1", ["q2", "q1"])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "query_losses.json").write_text(json.dumps({"query_ids": ids, "losses": [1.0, 2.0]}))
    assert lds.read_partition_losses([tmp_path / "p0"], ["q1", "q2"]).shape == (1, 2)
    with pytest.raises(ValueError, match="p1: retrained against other queries"):
        lds.read_partition_losses([tmp_path / "p0", tmp_path / "p1"])
    with pytest.raises(ValueError, match="p0: retrained against other queries"):
        lds.read_partition_losses([tmp_path / "p0"], ["q2", "q1"])


def test_partition_losses_must_come_from_the_current_subsets(tmp_path):
    masks = lds.lds_subsets(8, 2, 0.5, seed=0)
    for k in range(2):
        (tmp_path / f"p{k}").mkdir()
        record = {"query_ids": ["q"], "losses": [float(k)], "subset": lds.subset_digest(masks[k])}
        (tmp_path / f"p{k}" / "query_losses.json").write_text(json.dumps(record))
    paths = [tmp_path / "p0", tmp_path / "p1"]
    assert lds.read_partition_losses(paths, ["q"], masks).tolist() == [[0.0], [1.0]]
    with pytest.raises(ValueError, match="p0: retrained on another subset"):  # subsets swapped
        lds.read_partition_losses(paths, ["q"], masks[::-1])
    with pytest.raises(ValueError, match="p0: retrained on another subset"):  # another lds_fraction
        lds.read_partition_losses(paths, ["q"], lds.lds_subsets(8, 2, 0.25, seed=0))
    with pytest.raises(ValueError, match="2 LDS partitions for 3 subsets"):
        lds.read_partition_losses(paths, ["q"], lds.lds_subsets(8, 3, 0.5, seed=0))
    assert lds.subset_digest(np.ones(8, bool)) != lds.subset_digest(np.ones(9, bool))


@pytest.fixture(scope="module")
def tiny_demo():
    corpus = generate_demo_corpus(DemoSpec(people=6, seed=0))
    texts = [d["text"] for d in corpus.documents]
    tokenizer = train_demo_tokenizer(texts, vocab_size=300)
    return texts, tokenizer


def as_docs(tokenizer, texts):
    """Whole-text loss docs (every token but the first), with eos as in training."""
    ids = [tokenizer(t)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
    return [TokenizedDoc(str(i), x, [0] + [1] * (len(x) - 1), t)
            for i, (x, t) in enumerate(zip(ids, texts))]


@pytest.mark.slow
def test_retrain_end_to_end(tiny_demo, tmp_path):
    texts, tokenizer = tiny_demo
    n = len(texts)
    masks = lds.lds_subsets(n, 4, 0.5, seed=0)
    probes = as_docs(tokenizer, texts)
    losses = np.stack([lds.retrain_partition(tokenizer, texts, masks[k], TINY, probes,
                                             tmp_path / f"s{k}", seed=0) for k in range(2)])
    assert losses.shape == (2, n) and np.isfinite(losses).all()
    assert (lds.read_partition_losses([tmp_path / "s0", tmp_path / "s1"], masks=masks[:2]) == losses).all()
    assert not (tmp_path / "s0" / "model").exists()
    # same subset and seed -> identical losses (deterministic retraining)
    again = lds.retrain_partition(tokenizer, texts, masks[0], TINY, probes, tmp_path / "again",
                                  seed=0, keep_model=True)
    assert (again == losses[0]).all() and (tmp_path / "again" / "model").is_dir()
    # another data order from the same init: other losses, and the record says which seeds
    reordered = lds.retrain_partition(tokenizer, texts, masks[0], TINY, probes, tmp_path / "order",
                                      seed=0, order_seed=1)
    assert not np.allclose(reordered, losses[0])
    record = json.loads((tmp_path / "order" / "query_losses.json").read_text())
    assert (record["seed"], record["order_seed"]) == (0, 1)
    # weight-0 documents are really left out: their loss is higher than the kept ones'
    for k in range(2):
        kept, removed = losses[k, masks[k]].mean(), losses[k, ~masks[k]].mean()
        assert removed > kept * 1.1, (k, kept, removed)
    # and they lose more than in the other subset, where half of them were kept
    only_0 = masks[0] & ~masks[1]
    assert losses[0, only_0].mean() < losses[1, only_0].mean()
