"""fedclip.exporters: open_clip + LoRA -> ONNX Runtime training bundles (needs torch)."""
