"""The central trainer: appliances register, upload what they kept, and get rebuilt models that passed a gate.

An extra of the package (``pip install .[trainer]``): the appliance's own install does not need it,
and the daemon imports only ``appliance.trainer.client`` and ``appliance.trainer.records``, which
need nothing beyond the appliance's own dependencies.
"""
