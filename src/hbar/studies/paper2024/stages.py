"""The stage cache of the paper2024 study: re-exported from :mod:`hbar.studies.stages`
(shared by every study; docs/theory.md sections 10 and 14.6)."""

from hbar.studies.stages import Progress, StageRunner, load_stage, pin_config, read_json, utc_now, write_json

__all__ = ["Progress", "StageRunner", "load_stage", "write_json", "read_json", "pin_config", "utc_now"]
