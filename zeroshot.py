"""Zero-shot baseline: the frozen backbone on the test split, with no training.

Each test image goes to the class whose text feature is nearest (cosine similarity times the
backbone's logit scale). Three class features, from one pass over the images:
    photo_template     "a photo of a {class}." for every dataset: the template of the published
                       BiomedCLIP zero-shot rows (BiomedCoOp and BiomedAP code)
    clinical_template  the dataset's clinical template from prompts/<dataset>.json
                       ("a MR photo of a glioma tumor in the brain.")
    descriptions       the normalised mean of each class's expert descriptions (BiomedAP's high
                       anchor); skipped, and said so, when a class has none
With --subsample base each scoring is measured on the base classes (base test images, base class
names) and on the novel classes, with their harmonic mean, as the published base-to-novel rows.

    python zeroshot.py --dataset btmri
    python zeroshot.py --dataset btmri --subsample base

Writes OUT/[<backbone>/][text-<hash>/]zeroshot/<dataset>/seed1/ (base-to-novel: .../0shot_base2novel/seed1/;
text-<hash> with --class-text FILE): metrics.json and confusion.png (one panel per scoring). One seed:
nothing here is random.
"""
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

import classtext
import common
import data
import runner
from common import (UserError, class_centroids, classification_metrics, encode_sentences, harmonic_mean,
                    resolve_device, zero_shot_logits)
from runner import arg, list_arg

PHOTO_TEMPLATE = "a photo of a {}."  # the published zero-shot rows' template, for every dataset


@dataclass
class Args:
    dataset: str = arg("btmri", "a benchmark (listed below), synthetic, or your own folder of class sub-folders")
    root: str = arg("data", "folder holding the benchmark datasets", metavar="DIR")
    download: bool = arg(False, "fetch a missing medical benchmark from the Hugging Face hub")
    subsample: str = arg("all", "all: every class on the test split; base: base and novel classes apart, "
                         "and their harmonic mean", ["all", "base"])
    backbone: str = arg("biomedclip", "frozen backbone: biomedclip, clip, hf-hub:ORG/REPO, local-dir:PATH, tiny, ...")
    device: str = arg("auto", "auto, cpu, cuda or cuda:N")
    out: str = arg("runs", "folder of run folders", metavar="DIR")
    overwrite: bool = arg(False, "replace a finished zero-shot result")
    batch_size: int = arg(100, "images per forward pass", at_least=1)
    workers: int = arg(runner.default_workers(), "data loader processes (the numbers do not depend on it)",
                       at_least=0)
    check_setup: list = list_arg(str, "check a sweep's setup (these flags, the backbone, each dataset and its "
                                      "class text) and exit", metavar="DATASET")
    class_text: str = arg("", "score this class-text file instead of the dataset's own (python classtext.py write "
                              "or import makes one); its results go to a folder of their own", metavar="FILE")


@torch.no_grad()
def encode_images(backbone, loader):
    """Frozen image features (n, E) and labels (n,) of every batch of `loader`."""
    feats, labels = [], []
    for images, y in tqdm(loader, desc="encode test images", leave=False, disable=None):
        feats.append(backbone.encode_image(images.to(backbone.device)).float())
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)


def class_features(backbone, text, names) -> dict:
    """{scoring: (C, E) class features} for the classes `names`."""
    features = {"photo_template": encode_sentences(backbone, [PHOTO_TEMPLATE.format(c) for c in names]),
                "clinical_template": encode_sentences(backbone, [text["template"].format(c) for c in names])}
    if all(text["classes"][c].get("descriptions") for c in names):
        features["descriptions"] = class_centroids(backbone, [text["classes"][c]["descriptions"] for c in names])
    return features


def score(backbone, split, text, args):
    """{scoring: classification metrics} of `split`'s test images against its own classes."""
    transform = data.build_transform(backbone.image_size, backbone.mean, backbone.std)
    loader = data.make_loader(data.ImageDataset(split.test, transform), args.batch_size, False, 1, args.workers)
    feats, labels = encode_images(backbone, loader)  # (n, E), (n,)
    return {name: classification_metrics(zero_shot_logits(feats, classes, backbone.logit_scale), labels,
                                         len(split.classnames))
            for name, classes in class_features(backbone, text, split.classnames).items()}


def folder_of(args) -> Path:
    protocol = "0shot_base2novel" if args.subsample == "base" else ""
    return (Path(args.out) / runner.backbone_folder(args.backbone) / classtext.class_text_folder(args.class_text)
            / "zeroshot" / data.dataset_key(args.dataset) / protocol / "seed1")


def main(args: Args) -> dict:
    runner.validate_args(args)
    data.check_out_folder(args.dataset, args.out)
    folder = folder_of(args)
    if (folder / "metrics.json").exists() and not args.overwrite:
        raise UserError(f"{folder} already holds a zero-shot result; pass --overwrite to redo it "
                        f"or --out to write elsewhere")
    runner.check_writable(folder)  # before anything loads
    device = resolve_device(args.device)
    start = time.perf_counter()
    backbone = common.load_backbone(args.backbone, device)
    splits = data.load_splits(args.dataset, args.root, args.download, image_size=backbone.image_size, show=True)
    text = runner.class_text(args, backbone, splits.classnames, "zeroshot")
    if args.subsample == "all":
        blocks = {"": splits}
    else:
        blocks = {"base": data.subsample_classes(splits, "base"), "novel": data.subsample_classes(splits, "novel")}
    metrics, classnames = {}, {}
    for block, split in blocks.items():
        for name, m in score(backbone, split, text, args).items():
            key = f"{name}_{block}" if block else name
            metrics[key], classnames[key] = m, split.classnames
    scorings = [k for k in ("photo_template", "clinical_template", "descriptions")
                if k in metrics or f"{k}_base" in metrics]
    undescribed = [c for c in splits.classnames if not text["classes"][c].get("descriptions")]
    if undescribed:
        print(f"skipping the descriptions scoring: {len(undescribed)} class(es) have no descriptions in the "
              f"class text ({', '.join(undescribed)})", file=sys.stderr)
    if args.subsample == "base":
        for name in scorings:
            metrics[f"{name}_hm"] = harmonic_mean(metrics[f"{name}_base"]["accuracy"],
                                                  metrics[f"{name}_novel"]["accuracy"])
    timings = {"total_s": time.perf_counter() - start}
    runner.write_metrics(folder, args, metrics, timings, {"classnames": splits.classnames,
                                                           "data": data.data_account(splits),
                                                           "photo_template": PHOTO_TEMPLATE,
                                                           "clinical_template": text["template"]}, classnames)
    if args.subsample == "base":
        parts = [f"{n} base {metrics[n + '_base']['accuracy']:.2f} novel {metrics[n + '_novel']['accuracy']:.2f} "
                 f"HM {metrics[n + '_hm']:.2f}" for n in scorings]
    else:
        parts = [f"{n} {metrics[n]['accuracy']:.2f}" for n in scorings]
    sizes = "/".join(str(len(split.test)) for split in blocks.values())  # base/novel: each part's
    print(f"zero-shot {splits.name} ({args.backbone}, {sizes} test images): " + "; ".join(parts)
          + f" -> {folder / 'metrics.json'}")
    return metrics


if __name__ == "__main__":
    runner.run_cli(main, Args, __doc__.split("\n\n")[0])
