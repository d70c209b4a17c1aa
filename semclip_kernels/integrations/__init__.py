"""Integrations of SemCLIPLoss with training frameworks (import the submodule you need:
`semclip_kernels.integrations.open_clip` is for open_clip models; open_clip's own trainer with SemCLIPLoss is
the application `python -m semclip_train.open_clip`)."""
