"""The stages, one module each, every one a function a notebook can call and a subcommand wraps:
`train_vae` -> `encode` -> `train_dit` -> `sample` (-> metrics.fid), with `probes` and
`analysis` reading latents, `report` gathering the artifacts into one table, and
`reproduction` fixing an experiment's protocol and gathering its seeds.
`model_artifact` is the `dit` model folder (written by train-dit and import-dit, read by
sample); `training` and `ema` are what the two trainers share.

May import: everything below it (models, objectives, data, metrics and the plumbing at the
package root); a stage imports another only downstream (train_dit -> sample for previews),
never back.
"""
