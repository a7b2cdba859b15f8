"""The one base class of every config section, so the validation policy lives in one place."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """Base for config sections: unknown keys are rejected, assignments re-validated, and numbers
    must be finite (a bound such as ``lr > 0`` alone would accept ``inf``)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)
