"""Integrations of SemCLIPLoss with training frameworks (import the submodule you need:
`semclip_kernels.integrations.open_clip` needs open_clip_torch and open_clip_train)."""
