import pytest

from at_jax import bench


@pytest.mark.parametrize("method,seeds", [("at", 2)])
def test_bench_reports_the_contract_fields(method, seeds):
    result = bench.run(method, "wrn-tiny", "wrn-tiny", batch=16, steps=2, seeds=seeds,
                       image_size=16, dataset_size=64)
    for key in ("images_per_s", "step_ms", "device", "method", "batch", "dtype", "compile_s"):
        assert key in result
    assert result["images_per_s"] > 0 and result["compile_s"] > 0
    assert result["method"] == method and result["seeds"] == seeds and result["batch"] == 16
