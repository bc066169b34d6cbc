"""Calibrate the built-in model's out-of-domain warning on real photos, and write it down.

    python recipes/calibrate_ood.py                    # measure, print, write config.json
    python recipes/calibrate_ood.py --dry-run          # measure and print only

Every score of ``segformer.inference.domain`` is computed, through ``Segmenter`` exactly as
``segformer predict`` runs (whole image at its own size), on

- CamVid train (367 road-scene frames): the threshold is the ``--percentile`` (98th) of the
  chosen score here, so about 2 % of frames like the training data are flagged;
- CamVid val (101 frames): the in-domain check, never used to choose anything;
- photos that are not road scenes: the ones scikit-image ships in its package (no download:
  astronaut, the cat chelsea, coffee, rocket, …) and two of the ADE20K sample scenes (a house,
  a church);
- road photos from other cameras, reported apart (neither target is about them): the third
  ADE20K sample (a UK street) and the two Cityscapes sample frames.

It prints, per score, how well it separates val from the other photos (AUROC) and the share
of each set flagged at the train threshold; then writes the chosen score (``--score``,
default energy) with its threshold and rates into the built-in model's config.json
(``"segformer": {"out_of_domain": …}``) and its model card (the "Out-of-domain warning"
section). Needs ../shared and ``pip install scikit-image``. Run it again after
``recipes/publish_builtin.py``: new weights need a new threshold.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from segformer.errors import SegformerError
from segformer.inference.domain import PIXEL_SCORES, image_scores
from segformer.inference.engine import create_engine
from segformer.inference.segmenter import Segmenter, write_atomic
from segformer.weights.builtin import DEFAULT_MODEL, builtin_path
from segformer.weights.checkpoints import load_segmentation_model

REPO = Path(__file__).resolve().parents[1]
ROAD_ELSEWHERE = "road photos from other cameras"
SHARED = REPO.parent / "shared"
# scikit-image's bundled photographs (in its package, no download), none of a road.
SKIMAGE_COLOUR = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
)
SKIMAGE_GREY = (
    "camera",
    "coins",
    "moon",
    "brick",
    "grass",
    "gravel",
    "clock",
    "page",
    "text",
    "cell",
)


class _Recorder:
    """The engine, plus every score of the logits it returns (one image per call here)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.backend = engine.backend
        self.precision = engine.precision
        self.scores: list[dict[str, float]] = []

    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        logits = self.engine(pixel_values)
        for i in range(logits.shape[0]):
            self.scores.append(
                {name: float(image_scores(logits[i : i + 1], name)) for name in PIXEL_SCORES}
            )
        return logits


def photo_sets(shared: Path) -> dict[str, list[tuple[str, Image.Image | Path]]]:
    try:
        import skimage
        import skimage.data
    except ImportError:
        raise SegformerError(
            "needs scikit-image for its bundled photos: pip install -c constraints.txt scikit-image"
        ) from None
    camvid = shared / "data" / "camvid"
    ade = shared / "data" / "ade20k-sample" / "images" / "validation"
    cityscapes = shared / "data" / "cityscapes-sample"
    if not camvid.is_dir() or not ade.is_dir() or not cityscapes.is_dir():
        raise SegformerError(
            f"needs CamVid and the ADE20K and Cityscapes samples under {shared / 'data'}"
        )
    colour = [(name, Image.fromarray(getattr(skimage.data, name)())) for name in SKIMAGE_COLOUR]
    # The left view of skimage's stereo pair is a file in the package (the loader also wants
    # the disparity map, which is not needed here).
    motorcycle = Path(skimage.__file__).parent / "data" / "motorcycle_left.png"
    colour.append(("motorcycle_left", motorcycle))
    grey = [
        (name, Image.fromarray(getattr(skimage.data, name)()).convert("RGB"))
        for name in SKIMAGE_GREY
    ]
    return {
        "camvid train": [(p.name, p) for p in sorted((camvid / "train").glob("*.png"))],
        "camvid val": [(p.name, p) for p in sorted((camvid / "val").glob("*.png"))],
        "skimage colour photos": colour,
        "skimage grey photos": grey,
        # ADE_val_00000001 is a house, ..02 a church; ..03 is a street, so it goes below.
        "ade20k house and church": [
            (f"ADE_val_0000000{i}.jpg", ade / f"ADE_val_0000000{i}.jpg") for i in (1, 2)
        ],
        ROAD_ELSEWHERE: [
            ("ADE_val_00000003.jpg (a UK street)", ade / "ADE_val_00000003.jpg"),
            ("cityscapes stuttgart_demo_1024x512", cityscapes / "stuttgart_demo_1024x512.png"),
            *[
                (f"cityscapes {p.name}", p)
                for p in sorted((cityscapes / "leftImg8bit").rglob("*.png"))
            ],
        ],
    }


def auroc(inside: np.ndarray, outside: np.ndarray) -> float:
    """The probability that a random outside photo scores above a random inside one."""
    above = (outside[:, None] > inside[None, :]).mean()
    ties = (outside[:, None] == inside[None, :]).mean()
    return float(above + ties / 2)


SECTION = "## Out-of-domain warning"


def card_section(
    score: str,
    threshold: float,
    percentile: float,
    sets: dict[str, list[Any]],
    scores: dict[str, dict[str, np.ndarray]],
    rates: dict[str, dict[str, float]],
    table: list[str],
    per_photo: dict[str, dict[str, Any]],
) -> str:
    """The model card's section on the warning, from this run's measurements."""
    rows = [
        f"| {title} | {len(items)} | {100 * rates[score][title]:.1f} % | "
        f"{scores[title][score].min():.2f} … {scores[title][score].max():.2f} |"
        for title, items in sets.items()
    ]
    val_max = float(scores["camvid val"][score].max())
    other_min = min(
        float(scores[t][score].min())
        for t in sets
        if not t.startswith("camvid") and t != ROAD_ELSEWHERE
    )
    photos = "; ".join(
        f"{name} {row['score']:.2f} ({row['top']})" for name, row in per_photo.items()
    )
    return f"""{SECTION}

This model labels every pixel with one of its 11 road-scene classes whatever the picture shows,
so predictions warn when a picture does not look like its training data (`warning:` lines from
`segformer predict`, `"out_of_domain": true` in JSON and REST results, a notice on the web
page). The score is the **{score}** of the logits, {SCORE_WORDS[score]}, averaged over the
picture; a picture is flagged above **{threshold}**, the {percentile:g}th percentile of the score
on the {len(sets["camvid train"])} CamVid training frames. Measured with
`python recipes/calibrate_ood.py` (whole image at its own size; needs ../shared and
scikit-image), which also wrote the threshold into `config.json`:

| images | count | flagged | {score} score (min … max) |
| --- | --- | --- | --- |
{chr(10).join(rows)}

Non-road photos: scikit-image's bundled photographs (astronaut, cat, coffee, rocket, Hubble
deep field, microscopy, retina, motorcycle; greyscale: cameraman, coins, moon, brick, grass,
gravel, clock, page, text, cells) and two ADE20K validation scenes (a house, a church). The
road photos from other cameras (an ADE20K UK street scene and two Cityscapes frames) are
reported apart: the warning says "unlike CamVid's frames", not "not a road", and a street
photographed differently from CamVid's car camera can be flagged.

All scores measured here (AUROC: the chance that a non-road photo scores above a CamVid val
frame; flagged: at each score's own train threshold):

{chr(10).join(table)}

Per photo ({score}, then the two largest classes the model claims): {photos}.

The margin is one-sided: the highest CamVid val frame scores {val_max:.2f}, {threshold - val_max:.2f}
under the threshold, while the lowest non-road photo scores {other_min:.2f}; frames a little
further from CamVid's look than its val split will be flagged.

Also tried during development, with a throwaway script (not reproduced by this one): the
Mahalanobis distance of the mean-pooled last-stage encoder features to their CamVid-train mean
(covariance shrunk towards its trace, train scores 5-fold cross-fitted) also separated val from
these photos completely (AUROC 1.000, 0 % of val and 100 % of the others flagged), but it needs
encoder features that the compiled and onnxruntime engines do not return; the energy needs only
the logits every engine returns.

Limits: {len(sets["camvid val"])} val frames and a few dozen other photos are a small test; the
threshold is for whole-image inference (sliding windows and test-time augmentation score the
same logits averaged, and are not calibrated separately; with `average="softmax"` there is no
score). A warning means the labels are likely wrong; no warning does not mean they are right.
"""


SCORE_WORDS = {
    "energy": "−logsumexp over the classes at each pixel",
    "max_softmax": "1 − the largest class probability at each pixel",
    "entropy": "the entropy of the class probabilities at each pixel",
}


def replace_section(card: str, section: str) -> str:
    """``card`` with its out-of-domain section replaced, or inserted before the licence."""
    if SECTION in card:
        start = card.index(SECTION)
        end = card.find("\n## ", start + len(SECTION))
        return card[:start] + section + ("\n" + card[end + 1 :] if end != -1 else "")
    anchor = card.find("\n## Licence")
    if anchor == -1:
        return card.rstrip("\n") + "\n\n" + section
    return card[: anchor + 1] + section + "\n" + card[anchor + 1 :]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--score", default="energy", choices=sorted(PIXEL_SCORES))
    parser.add_argument("--percentile", type=float, default=98.0)
    parser.add_argument("--shared", type=Path, default=SHARED)
    parser.add_argument("--dry-run", action="store_true", help="do not write config.json")
    args = parser.parse_args()
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

    sets = photo_sets(args.shared)
    model = load_segmentation_model(DEFAULT_MODEL)
    recorder = _Recorder(create_engine(model, backend="eager"))
    segmenter = Segmenter(model, engine=recorder, batch_size=1, max_pixels=None)  # type: ignore[arg-type]
    scores: dict[str, dict[str, np.ndarray]] = {}
    per_photo: dict[str, dict[str, float]] = {}
    for title, items in sets.items():
        recorder.scores.clear()
        results = list(segmenter.imap(src for _, src in items))
        # One engine call per image (whole mode, batch 1): the recorded scores line up.
        assert len(recorder.scores) == len(items)
        if not title.startswith("camvid"):
            for (name, _), result, row in zip(items, results, recorder.scores, strict=True):
                top = ", ".join(f"{c.name} {c.share:.0%}" for c in result.classes[:2])  # type: ignore[union-attr]
                per_photo[name] = {"score": row[args.score], "top": top}
        scores[title] = {n: np.array([s[n] for s in recorder.scores]) for n in PIXEL_SCORES}
        print(f"scored {len(items)} {title}", file=sys.stderr)

    inside = "camvid val"
    outside = [t for t in sets if not t.startswith("camvid") and t != ROAD_ELSEWHERE]
    table = [
        f"| score | AUROC val vs non-road | threshold (train p{args.percentile:g}) | "
        + " | ".join(f"{t} flagged" for t in sets)
        + " | all non-road flagged |",
        "| --- " * (4 + len(sets)) + "|",
    ]
    rates: dict[str, dict[str, float]] = {}
    for name in PIXEL_SCORES:
        threshold = float(np.percentile(scores["camvid train"][name], args.percentile))
        others = np.concatenate([scores[t][name] for t in outside])
        rates[name] = {t: float((scores[t][name] > threshold).mean()) for t in sets}
        rates[name]["all non-road"] = float((others > threshold).mean())
        table.append(
            f"| {name} | {auroc(scores[inside][name], others):.3f} | {threshold:.3f} | "
            + " | ".join(f"{100 * rates[name][t]:.1f} %" for t in [*sets, "all non-road"])
            + " |"
        )
    print("\n" + "\n".join(table))
    chosen = args.score
    threshold = round(float(np.percentile(scores["camvid train"][chosen], args.percentile)), 3)
    ranges = {
        title: [round(float(v.min()), 3), round(float(v.max()), 3)]
        for title, v in ((t, scores[t][chosen]) for t in sets)
    }
    print(f"\n{chosen} score ranges (min, max): {ranges}")
    print(f"\n{chosen}, threshold {threshold}: per photo (score, largest classes)")
    for name, row in per_photo.items():
        flag = "flagged" if row["score"] > threshold else "NOT flagged"
        print(f"  {name}: {row['score']:.3f} ({row['top']}) {flag}")

    settings = {
        "score": chosen,
        "threshold": threshold,
        "calibration": {
            "threshold_from": f"percentile {args.percentile:g} of camvid train "
            f"({len(sets['camvid train'])} images)",
            "mode": "whole image at its own size",
            "flagged": {t: round(r, 4) for t, r in rates[chosen].items()},
            "score_ranges": ranges,
            "command": "python recipes/calibrate_ood.py",
        },
    }
    if args.dry_run:
        print(json.dumps(settings, indent=2))
        return 0
    folder = builtin_path(DEFAULT_MODEL)
    assert folder is not None
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    config.setdefault("segformer", {})["out_of_domain"] = settings
    write_atomic(folder / "config.json", (json.dumps(config, indent=2) + "\n").encode())
    card = folder / "README.md"
    text = card_section(chosen, threshold, args.percentile, sets, scores, rates, table, per_photo)
    write_atomic(card, replace_section(card.read_text(encoding="utf-8"), text).encode())
    print(f"wrote out_of_domain ({chosen} > {threshold}) into {folder / 'config.json'} and {card}")
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except SegformerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
