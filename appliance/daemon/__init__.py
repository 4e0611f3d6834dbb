"""The on-device daemon: cameras -> engine -> verdicts -> every output, for months without a restart.

``pipeline.py`` is where the flow reads top to bottom; sources and publishers are plug-ins in
registries keyed by their ``type``, each with its config class beside its code. Nothing here
imports torch.
"""
