"""Edge-LLM's member of peft's `PeftType` enum."""

from __future__ import annotations

from peft.utils.peft_types import PeftType

PEFT_TYPE_NAME = "EDGE_LLM"


def _add_peft_type(name: str) -> PeftType:
    """Add `name` to peft's closed `PeftType` enum; a no-op when it is already there.

    `PeftType` is a `str` Enum that cannot be subclassed or extended through a public API, and
    `register_peft_method` only accepts names that are already members. Members live in the enum's
    member maps and as class attributes; this adds one exactly as `Enum` itself would.
    """
    member = PeftType._value2member_map_.get(name)
    if member is not None:
        return member
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member._sort_order_ = len(PeftType._member_names_)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    type.__setattr__(PeftType, name, member)
    return member


EDGE_LLM_PEFT_TYPE = _add_peft_type(PEFT_TYPE_NAME)
