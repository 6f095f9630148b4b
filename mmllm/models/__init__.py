"""Model variants behind one prediction interface: ``generative`` (VLM + LoRA answering JSON)."""
