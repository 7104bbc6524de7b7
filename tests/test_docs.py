"""Every command block of README.md and docs/*.md runs as written (scaled down by tests/docs_runner.py's documented
substitutions) or is skipped by an explicit rule with its reason; see README "Tests"."""

from __future__ import annotations

import os
import time

import pytest

import docs_runner as dr

pytestmark = pytest.mark.slow


def test_every_documented_command_runs(tmp_path, fid_extractor, record_property):
    env = {**os.environ, "PATH": f"{dr.BIN}{os.pathsep}{os.environ.get('PATH', '')}", "DDPM_NO_PROGRESS": "1",
           "DDPM_FID_STATS_CACHE": str(tmp_path / "fid-stats-cache"), "DDPM_FID_EXTRACTOR": str(fid_extractor),
           "DDPM_OPENVINO_CACHE": str(tmp_path / "openvino-cache"),
           "DDPM_DIFFUSERS_CACHE": str(tmp_path / "diffusers-cache"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("DDPM_SEED", None)
    t0 = time.monotonic()
    lines, py, subs, skips, setups, expects = dr.run_docs(tmp_path / "sandbox", env, log=lambda s: print(s, flush=True))

    ran = [x for x in lines if x.status == "ran"]
    skipped = [x for x in lines if x.status == "skipped"]
    failed = [x for x in lines if x.status == "failed"]
    reasons: dict[str, int] = {}
    for x in skipped:
        reasons[x.reason] = reasons.get(x.reason, 0) + 1
    summary = (f"docs: {len(lines)} command lines: ran {len(ran)}, skipped {len(skipped)}, failed {len(failed)}; "
               f"python blocks: ran {sum(s == 'ran' for _, s, _ in py)}, sketches {sum(s == 'sketch' for _, s, _ in py)}"
               f", failed {sum(s == 'failed' for _, s, _ in py)}; {time.monotonic() - t0:.0f}s\n"
               + "\n".join(f"  skipped {n} × {r}" for r, n in sorted(reasons.items())))
    print(summary)
    record_property("docs_summary", summary)

    problems = [f"{x.block.doc}:{x.lineno}: {x.text}\n  ran as: {x.run}\n  {x.reason}" for x in failed]
    problems += [f"{b.where}: python block failed:\n{out}" for b, s, out in py if s == "failed"]
    problems += [f"{b.where}: python sketch without '...': {b.text[:80]}" for b, s, _ in py
                 if s == "sketch" and "..." not in b.text]
    problems += [f"substitution {s.name!r} ({s.why}) applied to no line" for s in subs if not s.used]
    problems += [f"skip rule {r.name!r} ({r.reason}) matches no line" for r in skips if not r.matched]
    problems += [f"expected status {e.name!r} ({e.why}) matches no line" for e in expects if not e.matched]
    problems += [f"setup step {s.name!r} ({s.why}) was never needed" for s in setups if not s.used]
    assert not problems, "\n\n".join(problems)


@pytest.mark.parametrize("body, status", [("import numpy\nprint('ok')", "ran"), ("import torch", "failed"),
                                          ("import numpy\nimport sys\nsys.modules['torch'] = sys", "failed")])
def test_a_no_torch_python_block_fails_when_torch_is_imported(tmp_path, body, status):
    """The README's runtime half runs with torch blocked: an import fails, and so does torch found imported."""
    sb = dr.Sandbox(tmp_path, "README.md", dict(os.environ), {})
    block = dr.Block("README.md", 1, "python", "# no torch: a test block\n" + body + "\n", "h")

    _, got, out = dr._python_block(sb, block, [], log=lambda s: None)

    assert got == status, out
