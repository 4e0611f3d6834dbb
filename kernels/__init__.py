"""Numba kernels of the appliance: NumPy and Numba only, importable on their own.

Installed as ``appliance_kernels`` (a name that cannot collide in site-packages).
Each public wrapper validates its input and raises ``ValueError``; the compiled
``_kernel`` functions behind them assume valid input.
"""
