"""The request handler of the Triton model, without Triton: mixed seeds, step counts and bad requests in one batch;
every image equals the Python API's (and so `ddpm-run sample`'s)."""

from __future__ import annotations

import numpy as np
import pytest

from ddpm_deploy import Sampler
from ddpm_deploy.runtime.errors import ArtifactError
from ddpm_deploy.runtime.serve.handler import Request, RequestError, ServedModel


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
