"""Resources: the compute resource's CPU thread setting reaches torch, FAISS and BLAS in a step
(0: the cores this process may use)."""

import dagster as dg
import faiss
import pytest
import torch
from threadpoolctl import threadpool_info

from attribution_assets.defs.resources import ComputeResource
from attribution_assets.engine import runtime


@pytest.fixture
def restore_threads():
    torch_threads, faiss_threads = torch.get_num_threads(), faiss.omp_get_max_threads()
    yield
    torch.set_num_threads(torch_threads)
    faiss.omp_set_num_threads(faiss_threads)


def _seen_threads(compute: ComputeResource) -> dict:
    seen = {}

    @dg.asset(required_resource_keys={"compute"})
    def probe(context: dg.AssetExecutionContext) -> None:
        seen.update(torch=torch.get_num_threads(), faiss=faiss.omp_get_max_threads(), blas=_blas_threads())

    dg.materialize([probe], resources={"compute": compute}, instance=dg.DagsterInstance.ephemeral())
    return seen


def _blas_threads() -> set[int]:
    return {pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"}


def test_threads_apply_in_the_step_and_are_restored_after(restore_threads):
    torch.set_num_threads(2)
    faiss.omp_set_num_threads(2)
    blas_before = _blas_threads()
    assert _seen_threads(ComputeResource(threads=1)) == {"torch": 1, "faiss": 1, "blas": {1}}
    assert (torch.get_num_threads(), faiss.omp_get_max_threads()) == (2, 2)
    assert _blas_threads() == blas_before


def test_zero_threads_means_the_cores_this_process_may_use(restore_threads, monkeypatch):
    monkeypatch.setattr(runtime, "available_cores", lambda: 3)
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    assert _seen_threads(ComputeResource()) == {"torch": 3, "faiss": 3, "blas": {3}}
    assert (torch.get_num_threads(), faiss.omp_get_max_threads()) == (1, 1)


def test_negative_threads_is_rejected():
    with pytest.raises(Exception, match="threads"):
        ComputeResource(threads=-1)


def test_autocast_setting():
    assert ComputeResource().autocast_dtype() is None
    assert ComputeResource(autocast=False).autocast == "off"  # YAML's unquoted `off`
    assert ComputeResource(autocast="bfloat16").autocast_dtype() == torch.bfloat16
    with pytest.raises(Exception, match="autocast must be one of"):
        ComputeResource(autocast="fp8")
