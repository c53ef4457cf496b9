"""sam3: fine-tuning library for SAM 3 (promptable concept segmentation) over transformers' `Sam3Model`.

Knows nothing of DVC or Prefect; `pipeline/` drives it with plain values.
"""

__version__ = "0.1.0"
