"""Small datasets for the library's tests (tests/sam3), made by the pipeline's own generators.

The one bridge from tests/sam3 to pipeline/ (tests/pipeline/test_stage_deps.py checks that it is the only one): the
library tests use the data these commands make (coloured shapes, the demo photos, a resized copy), never the
pipeline's code paths under test. Everything the library tests exercise lives in sam3/.
"""

from pipeline.demo_data import build_demo_dataset
from pipeline.preprocess import preprocess_dataset
from pipeline.shapes_data import build_shapes_dataset

__all__ = ["build_demo_dataset", "build_shapes_dataset", "preprocess_dataset"]
