"""Sample quality for the digits demo: a classifier trained on scikit-learn's real digits labels the
generated images. Reports the share labelled with probability > 0.9 and the class histogram, and next to it
the FID and KID of ``ddpm-run fid`` when SAMPLES_DIR holds its fid.json (with the small-sample caveat).

Usage: python -m ddpm_deploy.trainer.quality SAMPLES_DIR   (reads samples.npz [+ fid.json], writes quality.json)
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from ddpm_deploy.runtime.contract import FidReport
from ddpm_deploy.runtime.errors import ArtifactError, DataError
from ddpm_deploy.runtime.fileio import write_json

CONFIDENT = 0.9


def train_classifier(image_size: int = 16, seed: int = 0):
    """Logistic regression on the 1,797 real digits, preprocessed exactly like the training data."""
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    from .data import load_dataset

    x = load_dataset("digits", image_size=image_size, channels=1).images.reshape(1797, -1)
    y = load_digits().target
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)
    clf = LogisticRegression(C=0.5, max_iter=2000)
    clf.fit(xtr, ytr)
    held_out = float(clf.score(xte, yte))
    conf_real = float((clf.predict_proba(xte).max(axis=1) > CONFIDENT).mean())
    clf.fit(x, y)
    return clf, {"held_out_accuracy": held_out, "held_out_confident_share": conf_real}


def evaluate(images_uint8: np.ndarray) -> dict:
    """images: [N,H,W,1] uint8 generated digits → quality numbers."""
    if images_uint8.ndim != 4 or images_uint8.shape[-1] != 1 or images_uint8.shape[1] != images_uint8.shape[2]:
        raise DataError(f"quality check expects grayscale square images [N,H,W,1], found {images_uint8.shape}")
    size = images_uint8.shape[1]
    clf, real = train_classifier(size)
    x = images_uint8.reshape(len(images_uint8), -1).astype(np.float32) / 127.5 - 1.0
    p = clf.predict_proba(x)
    labels, conf = p.argmax(axis=1), p.max(axis=1)
    return {
        "num_images": int(len(x)),
        "confident_threshold": CONFIDENT,
        "confident_share": float((conf > CONFIDENT).mean()),
        "mean_confidence": float(conf.mean()),
        "class_histogram": {str(c): int((labels == c).sum()) for c in range(10)},
        "classifier": {"model": "LogisticRegression(C=0.5) on sklearn digits", **real},
    }


def fid_summary(report: FidReport) -> dict:
    """The FID/KID numbers of a fid.json for quality.json, with the counts they depend on."""
    return {"fid": report.fid, "kid_mean": report.kid["mean"], "kid_std": report.kid["std"],
            "samples": report.samples["count"], "reference": report.reference["spec"],
            "reference_count": report.reference["count"], "small_sample": report.small_sample,
            "warnings": list(report.warnings)}


def fid_line(s: dict) -> str:
    caveat = (f"; only {s['samples']} samples: FID is biased upward below 10,000 images, so compare it only with FIDs "
              "at the same count; KID is unbiased" if s["small_sample"] else "")
    return (f"FID {s['fid']:.1f}, KID {s['kid_mean']:.4f} ± {s['kid_std']:.4f} against {s['reference_count']} real "
            f"images ({s['reference']}){caveat}")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    d = Path(argv[0])
    f = d / "samples.npz"
    if not f.is_file():
        print(f"error: {f} not found (run ddpm-run sample first)", file=sys.stderr)
        return 2
    try:
        fid = fid_summary(FidReport.load(d / "fid.json")) if (d / "fid.json").is_file() else None
        rep = evaluate(np.load(f)["images"])
        if fid is not None:
            rep["fid"] = fid
    except (ArtifactError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_json(d / "quality.json", rep)
    hist = " ".join(f"{k}:{v}" for k, v in rep["class_histogram"].items())
    print(f"quality: {rep['confident_share']:.0%} of {rep['num_images']} samples classified with p > {CONFIDENT} "
          f"(real held-out digits: {rep['classifier']['held_out_confident_share']:.0%}, classifier accuracy "
          f"{rep['classifier']['held_out_accuracy']:.1%}); classes {hist}")
    if "fid" in rep:
        print(f"quality: {fid_line(rep['fid'])}")
    print(f"wrote {d / 'quality.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
