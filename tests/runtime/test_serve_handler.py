"""The request handler of the Triton model, without Triton: mixed seeds, step counts and bad requests in one batch;
every image equals the Python API's (and so `ddpm-run sample`'s)."""

from __future__ import annotations

import numpy as np
import pytest

from ddpm_deploy import Sampler
from ddpm_deploy.runtime.errors import ArtifactError
from ddpm_deploy.runtime.serve.handler import Request, RequestError, SamplingFailed, ServedModel


def _req(seed, index, steps=None):
    index = np.atleast_1d(index)
    return Request(seed=np.full((len(index), 1), seed, np.uint64), index=index.reshape(-1, 1).astype(np.int64),
                   steps=None if steps is None else np.array([[steps]], np.int32))


def test_a_mixed_batch_gives_each_request_its_own_images(random_micro_onnx):
    model = ServedModel(random_micro_onnx, threads=1, max_batch=2, default_steps=6)
    batch = [_req(1, 0), _req(2, 0), _req(1, [3, 4, 5], steps=8), _req(1, -1), _req(1, 2, steps=1),
             Request(seed=np.array([[1]], np.int64), index=np.array([[0]], np.int64))]
    try:
        out = model.infer(batch)
    finally:
        model.close()

    with Sampler.from_onnx(random_micro_onnx, threads=1) as s:
        np.testing.assert_array_equal(out[0], s(1, seed=1, steps=6))
        np.testing.assert_array_equal(out[1], s(1, seed=2, steps=6))
        np.testing.assert_array_equal(out[2], s(3, seed=1, start_index=3, steps=8))
    assert out[0].flags.c_contiguous and out[0].shape == (1, 8, 8, 1)
    assert isinstance(out[3], RequestError) and "index must be in [0, 4294967295], found -1" in str(out[3])
    assert isinstance(out[4], RequestError) and "steps must be between 2 and 1000" in str(out[4])
    assert isinstance(out[5], RequestError) and "seed UINT64" in str(out[5])


def test_a_missing_artifact_is_an_artifact_error(tmp_path):
    with pytest.raises(ArtifactError, match="not in the repository"):
        ServedModel(tmp_path / "model.onnx")


def _sched(text: str) -> np.ndarray:
    from ddpm_deploy.runtime.serve.client import encode_scheduler

    return encode_scheduler(text)[None]


@pytest.mark.parametrize("text, message", [
    ("x.json", "unknown scheduler 'x.json'"),  # a request never reads a file on the server
    ("/etc/hostname", "unknown scheduler '/etc/hostname'"),
    ('{"_class_name": ["x"]}', "_class_name must be a string"),
    ('{"_class_name": "DDPMScheduler", "variance_type": [1]}', "variance_type [1] is not supported"),
    ('{"scheduler": "ddim", "options": {"eta": 0.5, "order": 2}}', "DDIMScheduler does not take order"),
    ("{not json", "scheduler is not valid JSON"),
])
def test_a_bad_scheduler_fails_its_own_request_only(random_micro_onnx, text, message):
    model = ServedModel(random_micro_onnx, threads=1, max_batch=2, default_steps=4)
    bad = _req(1, 0)
    bad.scheduler = _sched(text)
    good = _req(1, 1)
    good.scheduler = _sched("ddim")
    try:
        out = model.infer([bad, good])
    finally:
        model.close()

    assert isinstance(out[0], RequestError) and message in str(out[0]), out[0]
    with Sampler.from_onnx(random_micro_onnx, threads=1) as s:
        np.testing.assert_array_equal(out[1], s(1, seed=1, start_index=1, steps=4, scheduler="ddim"))


def test_a_backend_error_in_flight_fails_those_requests_and_the_next_batch_is_served(random_micro_onnx):
    """An exception out of the runner mid-loop (not a DDPMError) fails the images in flight; the loop is cleared, so
    the next call is served (before, the slots stayed occupied and every later request failed)."""
    model = ServedModel(random_micro_onnx, threads=1, max_batch=2, default_steps=5)
    real, calls = model.runner.eps, {"n": 0}

    def flaky(x, t):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("ONNX Runtime: simulated failure")
        return real(x, t)

    try:
        model.runner.eps = flaky
        first = model.infer([_req(1, 0), _req(2, 0)])
        model.runner.eps = real
        second = model.infer([_req(1, 0)])
    finally:
        model.close()

    # the server's failure, not the client's: INTERNAL (HTTP 500) in triton_model.py, not INVALID_ARG
    assert all(isinstance(r, SamplingFailed) and not isinstance(r, RequestError) and "simulated failure" in str(r)
               for r in first)
    with Sampler.from_onnx(random_micro_onnx, threads=1) as s:
        np.testing.assert_array_equal(second[0], s(1, seed=1, steps=5))


def test_the_plan_cache_and_the_loop_table_stay_bounded(random_micro_onnx):
    from ddpm_deploy.runtime.serve.handler import MAX_PLANS

    model = ServedModel(random_micro_onnx, threads=1, max_batch=2, default_steps=2)
    try:
        for k in range(MAX_PLANS + 5):
            r = _req(1, 0)
            r.scheduler = _sched('{"scheduler": "ddim", "options": {"eta": %s}}' % (k / 1000))
            assert not isinstance(model.infer([r])[0], RequestError)
        assert len(model._plans) <= MAX_PLANS and model.loop().plans_held() <= MAX_PLANS + 1
    finally:
        model.close()


def test_served_model_runs_openvino_precisions_and_bands_as_the_api(random_micro_onnx):
    """precision= of the served model opens the runner `ddpm-run sample` and the API open for it: OpenVINO bf16
    and precision bands give the API's images for the same precision, bit for bit."""
    pytest.importorskip("openvino")
    for precision in ("bf16", "fp32:0-499,bf16:500-999"):
        model = ServedModel(random_micro_onnx, threads=1, max_batch=2, default_steps=5, precision=precision)
        try:
            out = model.infer([_req(3, [0, 1])])
            ran = model.runner.precision
        finally:
            model.close()
        api = dict(backend="openvino") if ":" not in precision else {}
        with Sampler.from_onnx(random_micro_onnx, threads=1, precision=precision, **api) as s:
            np.testing.assert_array_equal(out[0], s(2, seed=3, steps=5))
            assert s.runner.precision == ran
