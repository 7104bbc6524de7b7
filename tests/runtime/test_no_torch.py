"""The runtime must never import torch: sample with torch blocked."""

from helpers import run_without_torch


def test_runtime_samples_with_torch_import_blocked(micro_onnx, tmp_path):
    r = run_without_torch(f"""
        from ddpm_deploy.verify.cli import main
        try:
            main(["sample", "--onnx", r"{micro_onnx}", "--num", "3", "--batch", "2", "--steps", "5",
                  "--out", r"{tmp_path / 'out'}", "--no-progress"])
        except SystemExit as e:
            assert e.code in (0, None), e.code
        assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules), "torch was imported"
        print("OK")
    """)
    assert r.returncode == 0, r.stderr
    assert "OK" in r.stdout
    assert (tmp_path / "out" / "samples.npz").is_file()


def test_runtime_modules_have_no_torch_imports():
    import pathlib
    import re

    import ddpm_deploy.runtime as rt

    root = pathlib.Path(rt.__file__).parent
    pat = re.compile(r"^\s*(import torch|from torch)\b", re.M)
    offenders = [str(p) for p in root.rglob("*.py") if pat.search(p.read_text())]
    assert offenders == []
