"""The embedding pass's precision (``ClusteringSettings.precision``): which dtype each choice computes in, on
which hardware, and that the features are really computed in it."""

import pytest
import torch

from aiva_monai import network_pass as network_pass_module
from aiva_monai.clustering import ClusteringSettings
from aiva_monai.network_pass import NetworkPass, iterate_features, pass_dtype
from aiva_monai.networks import PreActResUNet


@pytest.fixture(scope="module")
def slices():
    torch.manual_seed(0)
    network = PreActResUNet(channels=(4, 8, 16), blocks_per_level=1).eval()
    images = [{"image": torch.randn(1, 16, 16)} for _ in range(12)]
    return network, images


def features(slices, precision: str, amp: bool = False) -> torch.Tensor:
    network, images = slices
    settings = ClusteringSettings(precision=precision, batch_size=5)
    with torch.no_grad():
        return torch.cat(
            [f.float() for f, _ in iterate_features(network, None, images, NetworkPass(amp=amp), settings)]
        )


@pytest.mark.parametrize("native", [True, False])
def test_cpu_bfloat16_is_bfloat16_only_on_a_cpu_with_bfloat16_instructions(monkeypatch, native):
    monkeypatch.setattr(network_pass_module, "cpu_has_native_bfloat16", lambda: native)
    assert pass_dtype("cpu", "cpu_bfloat16") == ("bfloat16" if native else "float32")
    # elsewhere it is "auto": the trainer's AMP setting
    assert pass_dtype("cuda", "cpu_bfloat16") == "float32"
    assert pass_dtype("cuda", "cpu_bfloat16", amp=True) == "float16"
    assert pass_dtype("cpu", "auto", amp=True, amp_kwargs={"dtype": torch.bfloat16}) == "bfloat16"
    assert pass_dtype("cpu", "auto") == "float32"
    assert pass_dtype("cuda", "float32", amp=True) == "float32"


def test_native_bfloat16_reads_the_cpus_capabilities(monkeypatch):
    capabilities = {"amx_bf16": False, "avx512_bf16": False, "avx2": True}
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities, raising=False)
    assert network_pass_module.cpu_has_native_bfloat16() is False
    capabilities["avx512_bf16"] = True
    assert network_pass_module.cpu_has_native_bfloat16() is True


def test_each_precision_computes_the_features_in_its_dtype(slices, monkeypatch):
    reference = features(slices, "float32")
    bfloat16 = features(slices, "bfloat16")
    relative = (bfloat16 - reference).norm() / reference.norm()
    assert 1e-4 < relative < 0.05  # really rounded to bfloat16's 8 bits, and close
    assert torch.equal(features(slices, "auto"), reference)  # no AMP: float32
    monkeypatch.setattr(network_pass_module, "cpu_has_native_bfloat16", lambda: True)
    assert torch.equal(features(slices, "cpu_bfloat16"), bfloat16)
    monkeypatch.setattr(network_pass_module, "cpu_has_native_bfloat16", lambda: False)
    assert torch.equal(features(slices, "cpu_bfloat16"), reference)


def test_float32_overrides_the_trainers_amp(slices):
    reference = features(slices, "float32")
    with torch.autocast("cpu", dtype=torch.bfloat16):  # e.g. a caller already inside autocast
        assert torch.equal(features(slices, "float32", amp=True), reference)
    assert not torch.equal(features(slices, "auto", amp=True), reference)  # AMP's dtype (bfloat16 on CPU)


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="precision"):
        ClusteringSettings(precision="bf16")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_features_are_an_error_naming_the_slices_and_an_overflowing_sum_is_not(slices, monkeypatch, value):
    """The pass checks the features' sum first (cheap) and every value only when the sum is not finite."""
    network, images = slices

    def run(make):
        monkeypatch.setattr(network_pass_module, "encode", lambda net, batch, *args, **kwargs: make(len(batch)))
        with torch.no_grad():
            return list(iterate_features(network, None, images, NetworkPass(), ClusteringSettings(batch_size=5)))

    huge = run(lambda n: torch.full((n, 3), 3e38))  # finite values whose float32 sum is inf
    assert len(huge) == 3 and torch.isfinite(huge[0][0]).all()

    batches = iter(range(3))

    def one_bad(n):  # the second batch (slices 5..9) holds one non-finite value
        features = torch.ones(n, 3)
        if next(batches) == 1:
            features[1, 2] = value
        return features

    with pytest.raises(ValueError, match=r"non-finite bottleneck features for slices slices 5\.\.9"):
        run(one_bad)
