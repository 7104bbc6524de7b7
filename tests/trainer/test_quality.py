"""trainer.quality: the demo's report puts the FID/KID of fid.json next to the classifier score, with the
small-sample caveat, and refuses a fid.json of another schema (before spending time on its classifier)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ddpm_deploy.runtime.contract import FidReport
from ddpm_deploy.trainer import quality


@pytest.fixture
def samples_dir(tmp_path):
    pytest.importorskip("sklearn")
    from ddpm_deploy.runtime.imageio import to_uint8
    from ddpm_deploy.trainer.data import load_dataset

    np.savez(tmp_path / "samples.npz", images=to_uint8(load_dataset("digits").images[:16]))
    return tmp_path


def fid_report(count=16, small=True):
    return FidReport(fid=41.5, kid={"mean": 0.0123, "std": 0.0021, "subsets": 100, "subset_size": count},
                     inception_score={"value": None, "reason": "no logits"},
                     samples={"path": "samples.npz", "count": count, "image_shape": [16, 16, 1], "run": None},
                     reference={"spec": "digits", "count": 1797, "stats_file": "digits16.npz", "kid_features": 1797},
                     extractor={}, small_sample=small, warnings=["small sample"] if small else [], seconds=1.0)


def test_quality_reports_fid_next_to_the_classifier_score(samples_dir, capsys):
    fid_report().save(samples_dir / "fid.json")

    assert quality.main([str(samples_dir)]) == 0

    out = capsys.readouterr().out
    rep = json.loads((samples_dir / "quality.json").read_text())
    assert "classified with p > 0.9" in out
    assert "FID 41.5, KID 0.0123 ± 0.0021 against 1797 real images (digits)" in out
    assert "only 16 samples: FID is biased upward below 10,000 images" in out
    assert rep["fid"]["fid"] == 41.5 and rep["fid"]["samples"] == 16 and rep["fid"]["small_sample"] is True
    assert rep["confident_share"] >= 0.5  # real digits: the classifier is sure of most


def test_quality_refuses_a_foreign_fid_json_before_training_its_classifier(samples_dir, capsys):
    (samples_dir / "fid.json").write_text(json.dumps({"schema": "someone-else", "schema_version": 1}))

    assert quality.main([str(samples_dir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "expected schema 'ddpm-deploy/fid'" in err
    assert not (samples_dir / "quality.json").exists()
