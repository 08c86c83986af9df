"""Power-cut testing: a crash-simulating FUSE file system and sweeps over its crash states.

- ``model``: the operation log and what survives a power cut at any point of it (pure);
- ``fs``: the FUSE passthrough that records that log and loads a crash state;
- ``sweep``: runs a flow on the mount, then for every cut point checks ``recover``.
"""
