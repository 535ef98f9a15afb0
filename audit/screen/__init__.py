"""Screening (docs/screening.md): a few denoiser calls per prompt, no decode, no PNG, no
embedding; the signals rank prompts, and only the suspects go on to the full audit."""
