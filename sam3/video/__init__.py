"""Video object segmentation (VOS) fine-tuning of SAM 2.1's and SAM 3's trackers.

Semi-supervised VOS: each object's mask (or clicks, or a box) is given on a conditioning frame; the tracker segments
it in every other frame from its memory of earlier frames. The pieces, one job each:

    sam3.video.config     typed config dataclasses of the `vos:` params section
    sam3.video.types      VideoClip (one clip's frames and masks) and the tracker's outputs (ClipOutput)
    sam3.video.data       DAVIS/MOSE, SA-V and COCO-as-1-frame readers, clip sampling and transforms
    sam3.video.tracker    the models (transformers' Sam2VideoModel / Sam3TrackerVideoModel) and the training forward
    sam3.video.losses     the multi-step multi-mask loss (focal + dice + IoU + object score)
    sam3.video.metrics    J, F and J&F as the DAVIS 2017 evaluation computes them
    sam3.video.train      the training run: optimiser, checkpoints and exact resume, guard, logs, export
    sam3.video.inference  semi-supervised inference over a whole video (first-frame masks in, palette PNGs out)
"""
