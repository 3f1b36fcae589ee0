"""Whisper itself: loading (bundled CT2, local dirs, hub ids), decoding, checkpoints."""
