"""The Lua scripts of the read path, and the format of their replies.

On a single Redis the read is one script and one round trip: resolve the active pointer (unless
the version is given), check that the set is sealed and GET the users' values; Redis runs a
script atomically, so a promotion (one HSET of the pointers hash) lands either before or after
it, and a set that is still being written is never read. The value keys depend on the pointer,
so that script cannot declare them. Redis Cluster refuses undeclared keys in another node's
slots, so there the read takes two scripts: RESOLVE_LUA on the registry's slot, then
READ_SET_LUA with the set's keys declared (one slot, one hash tag). A promotion between the two
hands the reader the previous version, which stays sealed and readable for the grace period:
never a half-written set.

ARGV: model or "", version or "", then users (the one-script read) or nothing.
Reply: {0} no default model; {1, model} model has no active version; {2, model, version, state}
set missing ("") or not sealed; {3, model, version, value...}: one value per user, nil for none.
The values go back as they are: a Lua table.concat of them costs Redis more than the GETs
(bench/README.md, "Serving"), and hiredis parses the elements in C.
RESOLVE_LUA replies {3, model, version} when the pointer resolves. Key names match
``keys.SetKeys``.
"""

from __future__ import annotations

from app.store.keys import DEFAULT_MODEL
from app.store.meta import SEALED

_RESOLVE_FRAGMENT = f"""
local model = ARGV[1]
if model == '' then
  model = redis.call('HGET', KEYS[1], '{DEFAULT_MODEL}')
  if not model then return {{0}} end
end
local version = ARGV[2]
if version == '' then
  version = redis.call('HGET', KEYS[1], model)
  if not version then return {{1, model}} end
end
"""


def _read_set_fragment(*, meta_key: str, value_key: str, first: int, last: str) -> str:
    """Lua that checks the set is sealed and replies the values of ``value_key`` for ``i`` in
    ``first..last`` (see the reply above)."""
    return f"""
local state = redis.call('HGET', {meta_key}, 'state')
if state ~= '{SEALED}' then return {{2, model, version, state or ''}} end
local reply = {{3, model, version}}
for i = {first}, {last} do
  reply[4 + i - {first}] = redis.call('GET', {value_key})
end
return reply
"""


# KEYS: the active pointers hash; ARGV: model or "", version or "", then users.
READ_LUA = (
    _RESOLVE_FRAGMENT
    + "local prefix = 'pm:{' .. model .. ':' .. version .. '}'\n"
    + _read_set_fragment(meta_key="prefix .. ':meta'", value_key="prefix .. ':u:' .. ARGV[i]",
                         first=3, last="#ARGV")
)  # fmt: skip
# KEYS: the active pointers hash; ARGV: model or "", version or "".
RESOLVE_LUA = _RESOLVE_FRAGMENT + "return {3, model, version}\n"
# KEYS: the set's meta key, then one value key per user; ARGV: model, version.
READ_SET_LUA = "local model, version = ARGV[1], ARGV[2]\n" + _read_set_fragment(
    meta_key="KEYS[1]", value_key="KEYS[i]", first=2, last="#KEYS"
)
