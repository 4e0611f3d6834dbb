"""Where the daemon's files live on a device by default (every one can be changed in the config)."""

from pathlib import Path

DEFAULT_CONFIG = Path("/etc/anomaly-appliance/config.toml")
DEFAULT_STATE = Path("/var/lib/anomaly-appliance")
DEFAULT_CACHE = Path("/var/cache/anomaly-appliance")
DEFAULT_SOCKET = Path("/run/anomaly-appliance/control.sock")
