"""The rule for user ids, shared by the API, the store's keys and the dataset loaders.

A user id goes into Redis keys, file names and set files (ASCII), so every way a user enters the
service checks it the same way: one that a dataset lets in, the API must be able to read, erase
and export.
"""

from __future__ import annotations

import re

USER_ID_PATTERN = r"^[A-Za-z0-9_.:-]{1,128}$"
USER_ID_RULE = "1-128 characters from A-Z a-z 0-9 _ . : -"
_USER_ID = re.compile(USER_ID_PATTERN)


def is_user_id(user: str) -> bool:
    return _USER_ID.fullmatch(user) is not None
