"""The GPU path fails safe: when a Triton kernel fails to compile or launch on a device, or computes wrong
values, ``auto`` falls back to the portable backend there with one warning; an explicit ``triton`` raises.
Failures are injected into the kernels; the kernels run on the GPU when there is one, else in Triton's
interpreter on CPU tensors."""
import warnings

import pytest
import torch

triton = pytest.importorskip("triton")

from visionmamba.models.vim import VisionMamba  # noqa: E402
from visionmamba.ops import scan  # noqa: E402
from visionmamba.ops.scan import probe  # noqa: E402
from visionmamba.ops.scan import triton as triton_backend  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.usefixtures("cuda_kernels")  # conftest.py: CPU tensors run the Triton kernels too


@pytest.fixture(autouse=True)
def fresh_probe():
    probe.failure.cache_clear()
    yield
    probe.failure.cache_clear()


def mixer_args():
    """The probe's own small problem (what the interpreter runs), as the mixer core's arguments."""
    return probe.problem(torch.device(DEVICE), small=True)


def out_of_shared_memory(*args, **kwargs):
    raise triton.runtime.errors.OutOfResources(232448, 101376, "shared memory")


def test_the_probe_passes_where_the_kernels_work():
    assert probe.failure(DEVICE, None) is None
    assert scan.resolve_backend("auto", torch.device(DEVICE)) == "triton"


@pytest.mark.parametrize("kernel", ["conv_silu", "bi_scan_backward", "selective_scan"])
def test_a_kernel_that_fails_makes_auto_fall_back_with_one_warning(kernel, monkeypatch):
    monkeypatch.setattr(triton_backend, kernel, out_of_shared_memory)
    args = mixer_args()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = scan.bidirectional(*args, backend="auto")
        second = scan.bidirectional(*args, backend="auto")
    ours = [w for w in caught if "visionmamba" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    message = str(ours[0].message)
    assert "OutOfResources" in message and "chunked" in message and "visionmamba env" in message
    expected = scan.bidirectional(*args, backend="chunked")
    torch.testing.assert_close(first, expected)
    torch.testing.assert_close(second, expected)


def test_an_explicit_triton_backend_still_raises(monkeypatch):
    monkeypatch.setattr(triton_backend, "conv_silu", out_of_shared_memory)
    with pytest.raises(triton.runtime.errors.OutOfResources):
        scan.bidirectional(*mixer_args(), backend="triton")
    monkeypatch.setenv(scan.BACKEND_ENV, "triton")  # the environment's choice is explicit too
    with pytest.raises(triton.runtime.errors.OutOfResources):
        scan.bidirectional(*mixer_args(), backend="auto")


def test_wrong_values_count_as_a_failure(monkeypatch):
    """A kernel that runs but writes nothing (e.g. a miscompiled one) is caught by the check of the values."""
    real = triton_backend.bi_scan_

    def writes_zeros(u, *args):
        real(u, *args)
        u[0].zero_()

    monkeypatch.setattr(triton_backend, "bi_scan_", writes_zeros)
    with pytest.warns(UserWarning, match="wrong values"):
        assert scan.resolve_backend("auto", torch.device(DEVICE)) == "chunked"


def test_a_model_runs_on_the_fallback(monkeypatch):
    """The whole model, forward and backward: the blocks' norms leave the Triton kernels too."""
    import visionmamba.ops.norm_triton as norm_triton

    monkeypatch.setattr(norm_triton, "add_rms_norm", out_of_shared_memory)
    torch.manual_seed(0)
    model = VisionMamba(depth=2, embed_dim=32, num_classes=5, patch_size=8, stride=8, img_size=16, drop_path_rate=0.0).to(DEVICE)
    reference_model = VisionMamba(depth=2, embed_dim=32, num_classes=5, patch_size=8, stride=8, img_size=16, drop_path_rate=0.0,
                                  scan_backend="chunked").to(DEVICE)
    reference_model.load_state_dict(model.state_dict())
    images = torch.randn(2, 3, 16, 16, device=DEVICE)
    with pytest.warns(UserWarning, match="OutOfResources"):
        out = model(images)
    out.sum().backward()
    expected = reference_model(images)
    expected.sum().backward()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    for a, b in zip(model.parameters(), reference_model.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)
