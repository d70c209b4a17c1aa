"""Applications built on the `semclip_kernels` library (which never imports them).

- `semclip_train.open_clip`: open_clip's own trainer (`open_clip_train`) with SemCLIPLoss,
  `python -m semclip_train.open_clip` (docs/open_clip.md).
"""
