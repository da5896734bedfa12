"""``fastpfc-doc``: register documents by example, classify, export to ONNX, evaluate.

    fastpfc-doc synth demo/                                        # synthetic folders (no download)
    fastpfc-doc register -m runs/default/checkpoint.pt -r reg.npz demo/register
    fastpfc-doc classify -m runs/default/checkpoint.pt -r reg.npz --fpr 1e-4 --labelled demo/queries
    fastpfc-doc register -m runs/default/checkpoint.pt -r reg.npz demo/new   # a new type, no retraining
    fastpfc-doc export -m runs/default/checkpoint.pt -o model.onnx
    fastpfc-doc eval -m model.onnx some/folder/of/class/sub-folders
    fastpfc-doc eval -m runs/default/checkpoint.pt                     # the bundled real-image check
    fastpfc-doc eval -m runs/default/checkpoint.pt --harsh-light       # the same under harsh light

``--model`` is a ``train.py`` checkpoint (its run's eval.json gives the ``--fpr`` thresholds) or an
exported ``.onnx`` file; a registry remembers which model built it and refuses any other.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .baselines import BASELINES
from .demo import write_demo
from .embedders import CheckpointEmbedder, embed_paths, export_onnx, load_embedder
from .evaluation import evaluate_embedders, registration_split, summary_table
from .folders import ImageFolderDataset, list_images
from .layouts import layout_baseline
from .real_images import real_image_check
from .registry import INDEXES, UNKNOWN, Match, Registry, label_of, labelled_images, layout_warning


def _image_files(inputs: list[str]) -> list[tuple[Path, Path | None]]:
    """(image, the folder given on the command line, if any) for files and folders (recursively)."""
    found = []
    for name in inputs:
        path = Path(name)
        if path.is_dir():
            found += [(path / image, path) for image in list_images(path)]
        elif path.is_file():
            found.append((path, None))
        else:
            raise FileNotFoundError(f"{path} does not exist")
    return found


def _open_registry(args, create: bool = False) -> Registry:
    embedder = load_embedder(args.model)
    if Path(args.registry).exists():
        registry = Registry.load(args.registry, embedder)
        if getattr(args, "index", None) not in (None, registry.index_kind):
            raise ValueError(f"{args.registry} uses a {registry.index_kind!r} index, not {args.index!r}")
        if getattr(args, "views", None) not in (None, registry.views):
            raise ValueError(f"{args.registry} registers {registry.views} views per image, not {args.views}: "
                             "its examples must all be made the same way")
        return registry
    if not create:
        raise FileNotFoundError(f"registry {args.registry} does not exist; create it with `fastpfc-doc register`")
    return Registry(embedder, args.index or "flat", DEFAULT_VIEWS if args.views is None else args.views)


#: Simulated photos per registered image in a new registry (see :class:`Registry`).
DEFAULT_VIEWS = 8
#: Up to this many labels, register lists them before it embeds.
_LABELS_LISTED = 12


def register(args) -> int:
    items = labelled_images(args.folder)
    warning = layout_warning(items)
    if warning and not args.force:
        raise ValueError(warning)
    registry = _open_registry(args, create=True)
    labels = sorted({t + (f"/{s}" if s else "") for _, t, s in items})
    if len(labels) <= _LABELS_LISTED:
        print(f"registering {len(items)} images of {len(labels)} labels: {', '.join(labels)}")
    report = registry.add(items, progress=not args.quiet)
    registry.save(args.registry)
    for skipped, kept in report.duplicates:
        print(f"duplicate: {skipped} is the same file as {kept} (skipped)")
    for refused, label, other in report.conflicts:
        print(f"conflict: {refused} ({label}) is the same file as an example of {other}; not registered")
    print(f"registered {len(report.added)} images; the registry holds {len(registry)} examples of "
          f"{len(registry.labels)} labels")
    return 1 if report.conflicts else 0


def remove(args) -> int:
    registry = _open_registry(args)
    removed = registry.remove(args.type, args.sub_label)
    registry.save(args.registry)
    print(f"removed {removed} examples; the registry holds {len(registry)} examples")
    return 0


def _truth(image: Path, folder: Path | None) -> tuple[str, str | None]:
    if folder is None:
        raise ValueError(f"--labelled needs folders laid out as <folder>/<type>/[<sub-label>/]image, got {image}")
    return label_of(image, folder)


def summarize(matches: list[Match], truths: list[tuple[str, str | None]], registry: Registry) -> dict:
    """Accuracy on queries of registered types (type; and sub-label where the truth has a registered
    one), and the rejection rate of queries of unregistered types."""
    types = {e.type for e in registry.entries.values()}
    subs = {(e.type, e.sub_label) for e in registry.entries.values() if e.sub_label}
    known = [(m, t) for m, t in zip(matches, truths, strict=True) if t[0] in types]
    unknown = [m for m, t in zip(matches, truths, strict=True) if t[0] not in types]
    with_sub = [(m, t) for m, t in known if t in subs]
    without_sub = [(m, t) for m, t in known if t[1] is None]

    def rate(hits: int, total: int) -> float | None:
        return hits / total if total else None

    by_sub_label = {}
    for name in sorted({t[1] for _, t in with_sub}):
        queries = [(m, t) for m, t in with_sub if t[1] == name]
        by_sub_label[f"sub_label_accuracy[{name}]"] = rate(sum((m.type, m.sub_label) == t for m, t in queries),
                                                             len(queries))
    return {
        "queries": len(matches),
        "type_accuracy": rate(sum(m.type == t[0] for m, t in known), len(known)),
        "sub_label_accuracy": rate(sum((m.type, m.sub_label) == t for m, t in with_sub), len(with_sub)),
        **by_sub_label,
        "parent_accuracy_of_sub_label_queries": rate(sum(m.type == t[0] for m, t in with_sub), len(with_sub)),
        "no_sub_label_reported_for_plain_queries": rate(sum(m.sub_label is None for m, _ in without_sub),
                                                        len(without_sub)),
        "rejection_rate": rate(sum(m.type == UNKNOWN for m in unknown), len(unknown)),
        "num_registered_type_queries": len(known), "num_unregistered_type_queries": len(unknown),
    }


def classify(args) -> int:
    registry = _open_registry(args)
    threshold = args.threshold if args.threshold is not None else registry.threshold_at(args.fpr)
    files = _image_files(args.inputs)
    features = embed_paths(registry.embedder, [f for f, _ in files], progress=not args.quiet)
    matches = registry.classify_features(features, threshold, args.sub_threshold)
    rows = [{"image": str(f), "type": m.type, "sub_label": m.sub_label, "score": round(m.score, 4),
             "example": m.source, "best": m.best} for (f, _), m in zip(files, matches, strict=True)]
    if args.top_k > 1:  # the k nearest registered examples of each image, whatever the threshold
        for row, hits in zip(rows, registry.search(features, args.top_k), strict=True):
            row["nearest"] = [{"type": e.type, "sub_label": e.sub_label, "score": round(score, 4),
                               "example": e.source} for score, e in hits]
    summary = summarize(matches, [_truth(f, d) for f, d in files], registry) if args.labelled else None
    if args.json:
        print(json.dumps({"threshold": threshold, "results": rows} | ({"summary": summary} if summary else {}),
                         indent=2))
        return 0
    if not args.labelled or args.verbose:
        width = max(len(r["image"]) for r in rows)
        for r in rows:
            label = r["type"] + (f"/{r['sub_label']}" if r["sub_label"] else "")
            nearest = "  ".join(f"{n['type']}{'/' + n['sub_label'] if n['sub_label'] else ''} {n['score']:.3f}"
                                for n in r.get("nearest", [])[1:])
            best = f"  (best: {r['best']})" if r["type"] == UNKNOWN and r["best"] else ""
            print(f"{r['image']:<{width}}  {label:<32} {r['score']:.3f}{best}"
                  + (f"   next: {nearest}" if nearest else ""))
    if summary:
        print(f"threshold {threshold:.4f}" + (f" (FPR={args.fpr})" if args.threshold is None else ""))
        for key, value in summary.items():
            if value is not None:  # a rate with nothing to measure it on is not printed
                print(f"{key:>40}: {value if isinstance(value, int) else f'{value:.3f}'}")
    return 0


def export(args) -> int:
    difference = export_onnx(CheckpointEmbedder(args.model), args.output, args.opset)
    check = "onnxruntime not installed, not verified" if difference is None else (
        f"max |onnxruntime - PyTorch| = {difference:.2e}")
    print(f"wrote {args.output} ({check})")
    return 0


def evaluate(args) -> int:
    if args.captures < 2:
        raise ValueError(f"--captures must be at least 2 (pairs of one template are needed), got {args.captures}")
    if args.harsh_light and args.folder is not None:
        raise ValueError("--harsh-light lights the bundled real-image check; it does not apply to a folder")
    embedder = load_embedder(args.model)
    if args.folder is None:
        data = real_image_check(embedder.image_size, args.captures, harsh_light=args.harsh_light)
        title = f"real images ({len(data[2])} templates x {args.captures} photographs" + (
            ", harsh light)" if args.harsh_light else ")")
    else:
        data = registration_split(ImageFolderDataset(args.folder, "subfolders", embedder.image_size))
        title = args.folder
    fixed = layout_baseline(embedder.model.layout_weight, embedder.model.layout) if isinstance(
        embedder, CheckpointEmbedder) else {}  # an ONNX export does not say which layout it appends
    results = evaluate_embedders({"model": embedder, **fixed, **BASELINES}, *data)
    if args.json:
        print(json.dumps({name: {k: v for k, v in result.items() if k != "roc"} for name, result in results.items()},
                         indent=2))
    else:
        print(summary_table(results, title))
    return 0


def synth(args) -> int:
    names = write_demo(args.output, args.types, args.captures, args.seed, args.size, sub_labels=args.sub_labels,
                       progress=not args.quiet)
    print(f"wrote {len(names)} synthetic types to {args.output}: register/ ({len(names) // 2} types), "
          f"new/ ({len(names) - len(names) // 2} types), queries/ ({args.captures} captures each)")
    return 0


def parser() -> argparse.ArgumentParser:
    main = argparse.ArgumentParser(prog="fastpfc-doc", description=__doc__.splitlines()[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    main.add_argument("--quiet", action="store_true", help="no progress bars")
    commands = main.add_subparsers(dest="command", required=True)

    def command(name: str, function, help: str, registry: bool = True) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help,
                                  formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        sub.set_defaults(function=function)
        sub.add_argument("-m", "--model", required=name != "synth", help="train.py checkpoint or exported .onnx")
        if registry:
            sub.add_argument("-r", "--registry", required=True, help="registry file (.npz)")
        return sub

    sub = command("register", register, "register the images of a folder: <type>/[<sub-label>/]image")
    sub.add_argument("folder")
    sub.add_argument("--force", action="store_true", help="register a folder whose layout looks one level too high")
    sub.add_argument("--index", choices=INDEXES,
                     help="faiss index of a new registry: flat (exact, the default), or ivf / hnsw (approximate, "
                          "for 100k+ examples)")
    sub.add_argument("--views", type=int, help=f"a new registry's registered example: the unit mean of the image "
                                               f"and this many simulated photos of it (default {DEFAULT_VIEWS}; 0: "
                                               "the image alone); a registry keeps its own")
    sub = command("remove", remove, "remove a type (with its sub-labels) or one sub-label")
    sub.add_argument("type")
    sub.add_argument("--sub-label")
    sub = command("classify", classify, "classify images (files or folders)")
    sub.add_argument("inputs", nargs="+")
    sub.add_argument("--threshold", type=float, help="reject at or below this cosine score")
    sub.add_argument("--fpr", type=float, default=1e-4, help="without --threshold: the model's threshold at this FPR")
    sub.add_argument("--sub-threshold", type=float, help="report a sub-label only above this score (default: "
                                                         "the threshold)")
    sub.add_argument("--labelled", action="store_true", help="inputs are <folder>/<type>/[<sub-label>/]image: "
                                                             "print accuracy and the rejection of unregistered types")
    sub.add_argument("--top-k", type=int, default=1, help="also list the k nearest registered examples")
    sub.add_argument("--json", action="store_true", help="JSON output")
    sub.add_argument("--verbose", action="store_true", help="with --labelled, also print every image")
    sub = command("export", export, "export a checkpoint to ONNX (normalised embedding, dynamic batch)",
                  registry=False)
    sub.add_argument("-o", "--output", required=True)
    sub.add_argument("--opset", type=int, default=18)
    sub = command("eval", evaluate, "TPR@FPR and registration accuracy on a folder of class sub-folders (or, "
                  "without one, on the bundled real-image check), beside the baselines", registry=False)
    sub.add_argument("folder", nargs="?", help="<folder>/<class>/image; the first image of each of the first half "
                                               "of the classes is registered")
    sub.add_argument("--captures", type=int, default=8, help="without a folder: photographs per real template")
    sub.add_argument("--harsh-light", action="store_true",
                     help="without a folder: each template lit by a reflection, a shadow, a falloff or a colour cast")
    sub.add_argument("--json", action="store_true", help="JSON output (without the ROC curves)")
    sub = command("synth", synth, "write synthetic register/, new/ and queries/ folders", registry=False)
    sub.add_argument("output")
    sub.add_argument("--types", type=int, default=100)
    sub.add_argument("--captures", type=int, default=8)
    sub.add_argument("--seed", type=int, default=0)
    sub.add_argument("--size", type=int, default=128, help="size of the captures (train.py's --image-size)")
    sub.add_argument("--sub-labels", action="store_true", help="also glare, damaged and generation-2 sub-labels")
    return main


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.function(args)
    except (ValueError, OSError, KeyError, ImportError, RuntimeError) as error:  # faiss and torch raise RuntimeError
        print(f"fastpfc-doc {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
