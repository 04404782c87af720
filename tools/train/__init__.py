"""Training and generation jobs: configs and presets, schedules, checkpoints, metrics logs.

The pieces here are plain functions and dataclasses; ``blocktool train``/``generate``/``plot``
are thin click commands over them.
"""
