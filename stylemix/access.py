"""Who may see and change which LoRA: the one policy the service enforces for every endpoint.

Identity.  Every request carries an owner id chosen by the server: `user_<name>` when app auth
(STYLEMIX_AUTH or a Space login) is on, else the browser's secret token (`new_owner_token`).
A LoRA's `stylemix.json` never stores that id: it stores `owner_key(owner)`, a salted sha256,
because the library listing is shown to everyone and a token is a password.  The salt is fixed,
never drawn per process: app processes sharing one library (replicas) must agree on every owner.

Policy.
- A LoRA with no `owner` (the example LoRAs, files an admin put in `loras/`) belongs to no
  visitor: shared with everyone and read-only in the app.
- An owned LoRA is `private` (only its owner sees and uses it) or `shared` (everyone may use it
  in mixes).  New LoRAs start private.
- Only the owner changes an owned LoRA: rename, delete, replace, trigger word, visibility.

Names are global and first come, first served: recipes, PNG metadata and `<lora:name>` tags
name LoRAs by their plain name, so one name means one LoRA for everyone.  A recipe records each
LoRA's hash, so a LoRA replaced or a name reused later is reported, never silently loaded.
"""

from __future__ import annotations

import hashlib

from stylemix.errors import StyleMixError

PRIVATE, SHARED = "private", "shared"
VISIBILITIES = (PRIVATE, SHARED)
_SALT = b"stylemix-owner-v1:"


class AccessError(StyleMixError):
    """A refusal: the caller may not see or change this."""


def owner_key(owner: str) -> str:
    """What a LoRA records as its owner: a one-way hash of the owner id (never the id itself)."""
    return "o" + hashlib.sha256(_SALT + owner.encode("utf-8")).hexdigest()[:32]


def lora_owner(meta: dict) -> str | None:
    o = meta.get("owner")
    return o if isinstance(o, str) and o else None


def visibility(meta: dict) -> str:
    """`shared` for LoRAs without an owner; an owned LoRA's own setting, private unless it says shared."""
    if lora_owner(meta) is None:
        return SHARED
    return SHARED if meta.get("visibility") == SHARED else PRIVATE


def is_owner(meta: dict, owner: str | None) -> bool:
    o = lora_owner(meta)
    return o is not None and owner is not None and o == owner_key(owner)


def can_see(meta: dict, owner: str | None) -> bool:
    """Listed and usable in mixes: shared LoRAs for everyone, private ones for their owner only."""
    return visibility(meta) == SHARED or is_owner(meta, owner)


def owner_label(meta: dict, owner: str | None) -> str:
    """What the Library table shows: never the owner's id or key."""
    if lora_owner(meta) is None:
        return "built-in"
    return "you" if is_owner(meta, owner) else "another user"


def check_can_change(name: str, meta: dict, owner: str | None, action: str) -> None:
    """Raise one readable refusal unless `owner` owns this LoRA (the caller checked it is visible)."""
    if lora_owner(meta) is None:
        raise AccessError(f"Cannot {action} LoRA {name!r}: it is a built-in shared LoRA, read-only in the app "
                          "(an admin can change it in the loras/ folder).")
    if not is_owner(meta, owner):
        raise AccessError(f"Cannot {action} LoRA {name!r}: it belongs to another user; only its owner can "
                          f"{action} it.")


def check_visibility(value: str) -> str:
    if value not in VISIBILITIES:
        raise StyleMixError(f"Invalid visibility {value!r}: choose private or shared.")
    return value
