"""Batch labelling: the job's output files (:mod:`.output`), the engine that turns rows into records
(:mod:`.engine`) and the Ray Data engine (:mod:`.ray_engine`). ``mmllm.label`` is the command line."""
