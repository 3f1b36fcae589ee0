"""Audio and text: decoding/resampling, data sets (embedded, folders, HF), WER/CER scoring."""
