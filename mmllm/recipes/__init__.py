"""The fine-tuning recipes, one module per task, each with a config holding only what it reads.

``generate`` (LoRA, the model answers label JSON), ``classify`` (LoRA + softmax heads on the
pooled prompt state) and ``fusion`` (pretrained text / image encoders + attribute network, fused,
softmax heads). ``common`` is what all of them share (data config, input checks, the run's start
and end), ``heads_training`` the head loss, dev metrics and calibration of classify and fusion.
``python -m mmllm.finetune`` reads a YAML's ``task`` and runs its recipe.
"""
