"""The plain-valued `TrainJob` a run trains from, built from the checked params, and the resolved params file
written next to the run. Shared by the local path (`pipeline.train`) and the SLURM path (`pipeline.launch`)."""

from __future__ import annotations

from pathlib import Path

import yaml

from pipeline.code_deps import code_fingerprint
from pipeline.params import Params, to_dict
from sam3.coco import ANNOTATIONS_FILE
from sam3.io import write_text


def build_job(
    params: Params,
    run_dir: Path,
    dataset: str,
    negatives: str | None,
    train_annotations: str = ANNOTATIONS_FILE,
    feature_cache: str | None = None,
):
    """The plain-valued `TrainJob` the library trains from. Its `params` (stored in every checkpoint and compared
    on resume) hold the resolved params plus the fingerprint of the code the train stage runs, so a run whose code
    changed (a fix to the loss, say) starts over instead of resuming the old code's last checkpoint: `dvc repro`
    re-runs train after such a change, and its persisted checkpoints must not turn that into a no-op."""
    from sam3.config import ModelOptions, TrainJob

    return TrainJob(
        run_dir=str(run_dir),
        dataset_dir=dataset,
        negatives=negatives,
        train_annotations=train_annotations,
        model_source=params.model.source,
        image_size=params.model.image_size,
        with_masks=params.model.mode == "segmentation",
        model=ModelOptions(
            one_to_many=params.model.one_to_many,
            text_geometry_token=params.model.text_geometry_token,
            drop_path=params.model.drop_path,
        ),
        loop=params.train,
        optim=params.optim,
        loss=params.loss,
        guard=params.guard,
        ddp=params.ddp,
        cache=params.cache,
        adapter=params.adapter,
        retain_phrases=retain_phrases(dataset, train_annotations) if params.train.retain else [],
        feature_cache_dir=feature_cache,
        params={**image_params(params), "code": {"sha256": code_fingerprint("pipeline.train")}},
    )


def image_params(params: Params) -> dict:
    """The resolved params of an image run: every section but `vos:` (video training's, which an image run never
    reads: a change there must not restart an image run nor show in its model card)."""
    return {section: values for section, values in to_dict(params).items() if section != "vos"}


def retain_phrases(dataset: str, train_annotations: str = ANNOTATIONS_FILE) -> list[str]:
    """The phrases train.retain draws its prompts from: the built-in phrase bank (`pipeline.phrase_bank`) without
    any phrase that names one of the training categories (`pipeline.negatives.name_keys`: plurals and "(sense)"
    forms count as the same name), so the regulariser never holds the model to its old answer on a class it learns."""
    from pipeline.negatives import name_keys
    from pipeline.phrase_bank import load_phrase_bank
    from sam3.coco_split import CocoSplit

    categories = CocoSplit.read(dataset, "train", train_annotations).categories.values()
    taken = frozenset().union(*(name_keys(name) for name in categories))
    return [phrase for phrase in load_phrase_bank() if not name_keys(phrase) & taken]


def write_resolved_params(params: Params, run_dir: Path) -> None:
    write_text(Path(run_dir) / "params.yaml", yaml.safe_dump(image_params(params), sort_keys=False))
