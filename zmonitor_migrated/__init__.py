"""zmonitor-migrated: on-device migration daemon for the Z Monitor bedside monitor."""

__version__ = "0.1.0"
