"""Data validation for `python -m pipeline validate`: one module per job.

- `problems`: the check names, severities and the `Problem` record every check produces.
- `records`: loads a split and flattens its images, annotations and categories into pandas tables of scalar facts.
- `rle`: reads the run lengths of a COCO RLE and says why it does not decode.
- `suites`: the great-expectations rules over those tables, run in one ephemeral context, turned into Problems.
- `paths`: where an image record's file really is (links followed), refusing whatever lies outside the dataset.
- `files`: opens the image files (what great-expectations cannot do).
- `quarantine`: splits each split's records into valid and quarantined from the problems found.
- `output`: writes the clean copy and the quarantine.
- `report`: the report (counts, problems, exit code), its JSON and the human summary.

`pipeline.validate` runs them in that order.

Video datasets (`python -m pipeline vos-validate`, DAVIS/MOSE layout) have their own `vos_*` modules, in the same
roles: `vos_problems` (check names), `vos_layout` (splits and videos found), `vos_files` (frames and palette PNGs
opened), `vos_tables` (frame/annotation/object tables), `vos_suites` (great-expectations over them), `vos_output`
(clean copy, whole-video quarantine) and `vos_report`; `pipeline.vos_validate` runs them.
"""
