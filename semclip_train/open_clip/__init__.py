"""open_clip's trainer with SemCLIPLoss: `python -m semclip_train.open_clip` (docs/open_clip.md).

- `cli`: the command line (open_clip_train's flags plus the SemCLIP ones).
- `data`: the SemCLIP CSV as open_clip_train's training set.
- `patches`: what the command installs into `open_clip_train.main` for one run.
- `grad_cache`: `--semclip-grad-cache`, open_clip_train's epoch loop with a gradient-cached step.

The pieces a custom open_clip loop needs from the library (the loss factory, the grouped-text forward) are
`semclip_kernels.integrations.open_clip`.
"""
