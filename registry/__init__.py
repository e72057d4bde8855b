"""Versioned, verified registries of checkpoints (values, policies) in a folder or object storage.

The layer between `common` and `valuefn`: what the value and the policy registries share (names,
versions, manifests with a sha256 per file, the CURRENT pointer, atomic publish, watching), the two
stores (`registry.local`, `registry.s3`) and the policy kind (`registry.policies`).

    from registry import open_registry
    from registry.policies import PolicyRegistry
    policies = open_registry("s3://bucket/iro/policies", PolicyRegistry)
"""

from registry.base import BaseRegistry, Store
from registry.errors import CheckpointError, RegistryError, RegistryUnavailable
from registry.names import CURRENT, parse_spec, validate_name, vdir
from registry.open import is_object_store, open_registry, open_store

__all__ = ["CURRENT", "BaseRegistry", "CheckpointError", "RegistryError", "RegistryUnavailable", "Store",
           "is_object_store", "open_registry", "open_store", "parse_spec", "validate_name", "vdir"]
