"""`diagnose`: gradient agreement across batchings on a tiny local model, and the ladder."""

import pytest
import torch

from attribution_assets.engine.evaluation import diagnose as dg

pytestmark = pytest.mark.usefixtures("one_thread")


def test_ladder_is_cumulative_and_skips_no_ops():
    assert [s.name for s in dg.ladder("bfloat16")] == ["default", "math attention", "float32",
                                                       "tf32 off"]
    rungs = dg.ladder("float32")
    assert [s.name for s in rungs] == ["default", "math attention", "tf32 off"]
    assert rungs[-1].sdpa_math and rungs[-1].tf32_off and rungs[-1].dtype == "float32"


def test_applied_restores_global_flags():
    before = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    with dg.applied(dg.ladder("float32")[-1]):
        assert torch.get_float32_matmul_precision() == "highest"
        assert torch.backends.cudnn.allow_tf32 is False
    assert (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32) == before


def test_make_documents():
    docs = dg.make_documents(50, 3, 4, seed=1)
    assert len(docs) == 3 and all(len(d) == 4 and max(d) < 50 for d in docs)
    assert dg.make_documents(50, 2, 3, token_ids=range(10)) == [[0, 1, 2], [3, 4, 5]]
    with pytest.raises(ValueError):
        dg.make_documents(50, 4, 3, token_ids=range(10))


def test_diagnose_tiny_model_passes_default(tiny_model_dir):
    report = dg.diagnose(str(tiny_model_dir), n_docs=4, length=16, projection_dim=8)
    assert report.chosen is not None and report.chosen.name == "default"
    assert [r["condition"] for r in report.rows] == ["batched", "padded"]
    assert all(r["min"] >= 0.999 for r in report.rows)
    text = dg.format_report(report)
    assert "Use: dtype=float32" in text and "| default | padded |" in text


def test_diagnose_escalates_through_every_rung(tiny_model_dir):
    report = dg.diagnose(str(tiny_model_dir), threshold=1.5, n_docs=2, length=8, projection_dim=4,
                         texts=["Mara Quill was born in Lisbon. Tomas Reyes works for Orbitex."])
    assert report.chosen is None
    assert [r["setting"] for r in report.rows][::2] == ["default", "math attention", "tf32 off"]
    assert "No setting reached the threshold" in dg.format_report(report)


def test_reduced_precision_reports_its_error_against_float32(tiny_model_dir):
    report = dg.diagnose(str(tiny_model_dir), dtype="bfloat16", n_docs=3, length=12, projection_dim=8)
    first = report.rows[0]
    assert first["condition"] == "bfloat16 vs float32" and 0.99 < first["min"] < 1.0
    assert [r["condition"] for r in report.rows[1:3]] == ["batched", "padded"]
    assert "| default | bfloat16 vs float32 |" in dg.format_report(report)
    model = dg._load(str(tiny_model_dir), dg.Setting("default", "float32"), "cpu")[0]
    docs = dg.make_documents(model.config.vocab_size, 3, 12)
    assert dg.dtype_agreement(model, str(tiny_model_dir), docs).min() > 1 - 1e-6  # float32 vs itself
