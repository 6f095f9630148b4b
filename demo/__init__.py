"""The Gradio demo (`demo/app.py`, the `mmllm demo` verb)."""
