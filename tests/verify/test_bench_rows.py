"""`ddpm-run bench` rows that are not plain speeds: bf16 emulated on a CPU without bf16 hardware is marked, not
reported as a speed (both branches, whatever this machine's flags); the precision-bands row measures the band mix."""

from __future__ import annotations

import pytest

from ddpm_deploy.runtime import cpu
from ddpm_deploy.verify import bench


def _job(tmp_path, backend):
    return dict(preset="tiny", backend=backend, batch=1, warmup=0, repeat=1, workdir=str(tmp_path), threads=1)


@pytest.mark.parametrize("flags, emulated", [(["avx2", "fma"], True), (["avx2", "avx512f", "avx512_bf16"], False)])
def test_torch_bf16_row_is_marked_emulated_without_bf16_hardware(tmp_path, monkeypatch, flags, emulated):
    pytest.importorskip("torch")
    monkeypatch.setattr(cpu, "cpu_flags", lambda path="/proc/cpuinfo": list(flags))
    r = bench.measure(_job(tmp_path, "torch-eager-bf16"))
    assert r["eps_ms"] > 0 and bool(r.get("emulated")) is emulated
    doc = {"machine": {"machine": "x", "cpus": 1, "versions": {}}, "date": "d", "repeat": 1, "warmup": 0,
           "results": [{**r, "ms_per_image_step": r["eps_ms"], "peak_rss_mb": 1.0}]}
    text = bench.markdown(doc)
    assert ("**not a speed**: bf16 emulated" in text) is emulated


def test_precision_bands_row_runs_every_band(tmp_path):
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    r = bench.measure({**_job(tmp_path, "openvino-bands"), "bands": "bf16:0-99,int8:100-999"})
    assert r["runner"] == "BandedRunner" and r["eps_ms"] > 0
    assert r["precision"].endswith(":0-99,int8:100-999") and "20 timesteps" in r["note"]
