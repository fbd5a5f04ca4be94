"""Sections of a job's config (`eval`, `heal`): their defaults, overridden by what a run's
config.json or a user sets, with unknown fields refused by name."""
from __future__ import annotations

import ml_collections


def override_section(defaults: ml_collections.ConfigDict, given, name: str,
                     where: str) -> ml_collections.ConfigDict:
  """`defaults` overridden by the fields `given` (a partial ConfigDict or dict) sets; a field
  that `defaults` lacks is refused with a KeyError naming `name.field` and the file `where` its
  fields are defined in."""
  if given is None:
    return defaults
  values = given.to_dict() if hasattr(given, "to_dict") else dict(given)

  def merge(into, values, prefix):
    for key, value in values.items():
      if key not in into:
        raise KeyError(f"unknown setting {prefix}{key}; the fields and their defaults are in "
                       f"{where}")
      if isinstance(value, dict):
        merge(into[key], value, f"{prefix}{key}.")
      else:
        with into.ignore_type():
          into[key] = value
  merge(defaults, values, f"{name}.")
  return defaults
